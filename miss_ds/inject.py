"""Put MiSS adapters into a model: find the targeted linears, wrap them, freeze the rest."""
from __future__ import annotations

import difflib
import logging
import sys
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from .config import MissConfig
from .families import FAMILIES
from .layers import D_NAME, MissLayer
from .registry import factory_for
from .run_config import ConfigError
from .shared_input import link_siblings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainableReport:
    """How many parameters train, counted on this rank (tensor-parallel shards count locally), and the routed MoE
    experts left without an adapter."""

    adapted_modules: int
    trainable: int
    total: int
    experts_not_adapted: int = 0
    """Parameters of routed experts (MoE) that get no MiSS: transformers keeps them as fused 3-D parameters, not
    linears, so neither MiSS here nor PEFT's ``miss`` tuner can wrap them."""
    tp_size: int = 1
    """The model's tensor-parallel size (``engine.prepare_model`` sets it): above 1 the counts are this rank's
    shards, and say so."""

    def __str__(self) -> str:
        pct = 100.0 * self.trainable / max(self.total, 1)
        experts = (f" || routed experts not adapted: {self.experts_not_adapted:,} params (fused 3-D expert weights; "
                   "attention and dense/shared MLPs carry MiSS)" if self.experts_not_adapted else "")
        shards = f" (this rank's shards at TP={self.tp_size})" if self.tp_size > 1 else ""
        return (f"MiSS on {self.adapted_modules} modules: trainable params {self.trainable:,} || "
                f"all params {self.total:,} || trainable {pct:.4f}%{shards}{experts}")


def apply_miss(model: nn.Module, config: MissConfig) -> TrainableReport:
    """Replace every targeted linear of ``model`` in place with its MiSS layer and freeze everything else.

    ``config.target_modules`` unset: the model family's projections (``MissConfig.for_model``). Shape problems are
    raised here, naming the module, before any training starts. (A run checks every entry of the module lists first:
    ``check_entries_match``, through ``engine.prepare_model``.)
    """
    _import_parallel_layers()
    config = config.for_model(getattr(model, "config", None))
    targets = [(name, module) for name, module in model.named_modules() if name and config.matches(name)]
    if not targets:
        sample = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:8]
        less = f" less miss.exclude_modules={config.exclude_modules!r}" if config.exclude_modules else ""
        raise ConfigError(f"miss.target_modules={config.target_modules!r}{less} matches no module; linear modules "
                          f"in this model include {sample}")
    wrapped = 0
    for name, module in targets:
        if isinstance(module, MissLayer):
            raise ValueError(f"module '{name}' already has a MiSS adapter")
        factory = factory_for(module)
        if factory is None:
            raise ConfigError(f"module '{name}' matched miss.target_modules but is a {type(module).__name__}, "
                              "which MiSS cannot wrap; narrow target_modules to linear layers")
        _set_submodule(model, name, factory(module, config, name))
        wrapped += 1
    _link_shared_inputs(model)
    _set_trainable(model, config)
    return TrainableReport(wrapped, *_count(model), experts_not_adapted=_routed_expert_params(model))


def check_entries_match(model: nn.Module, config: MissConfig) -> None:
    """Refuse an entry of miss.target_modules, exclude_modules or modules_to_save that matches no module of
    ``model`` (``MissConfig.unmatched``), naming the closest module names: a typo would otherwise adapt or train
    less than asked, silently. The family's default targets are exempt: a model may lack some of them (Qwen3-MoE
    has no dense MLP). A module both adapted and in ``modules_to_save`` is refused too
    (``_check_adapted_not_saved``)."""
    config = config.for_model(getattr(model, "config", None))
    names = [name for name, _ in model.named_modules() if name]
    _check_adapted_not_saved(names, config)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    defaults = list(FAMILIES[model_type].targets) if model_type in FAMILIES else None
    unmatched = [(key, entry) for key, entry in config.unmatched(names)
                 if not (key == "target_modules" and config.target_modules == defaults)]
    if not unmatched:
        return
    key, entry = unmatched[0]
    named = [name for name in names if name.endswith("." + entry)]
    if isinstance(getattr(config, key), str) and named:
        raise ConfigError(f"miss.{key}={entry!r} is one string, which PEFT reads as one regex over full module names "
                          f"(such as {named[0]!r}), so it matches no module; to name the modules called {entry!r}, "
                          f"give a list: miss.{key}=[{entry}]")
    suffixes = sorted({".".join(parts[i:]) for parts in (n.split(".") for n in names) for i in range(len(parts))})
    close = difflib.get_close_matches(entry, suffixes, n=3)
    hint = (f"closest module names: {', '.join(map(repr, close))}" if close else
            f"module names end with {sorted({n.rpartition('.')[2] for n in names})[:12]}")
    rule = ("a regex must match a module's full name" if isinstance(getattr(config, key), str) else
            "an entry matches every module whose name ends with it" if key == "modules_to_save" else
            "an entry matches a module's full name, or its end after a dot")
    raise ConfigError(f"miss.{key} entry {entry!r} matches no module of this {type(model).__name__} ({rule}); "
                      f"{hint}")


def _check_adapted_not_saved(names: list[str], config: MissConfig) -> None:
    """A module is adapted (D over its frozen weight) or trained in full as a ``modules_to_save`` entry (itself or a
    module around it), not both: training both and exporting one drops the other (the merged and PEFT exports
    differed from the checkpoint)."""
    both = [name for name in names if config.matches(name) and config.saves(f"{name}.weight")]
    if both:
        more = f" (and {len(both) - 1} more modules)" if len(both) > 1 else ""
        raise ConfigError(f"miss.target_modules adapts {both[0]!r}{more}, which miss.modules_to_save="
                          f"{list(config.modules_to_save)!r} trains in full: a module is adapted or trained in full, "
                          "not both. Remove it from one of the two lists")


def miss_layers(model: nn.Module) -> Iterator[tuple[str, MissLayer]]:
    """(name, layer) for every MiSS layer in the model."""
    return ((n, m) for n, m in model.named_modules() if isinstance(m, MissLayer))


def adapter_state_dict(model: nn.Module, config: MissConfig | None = None) -> dict[str, torch.Tensor]:
    """Only what training changed: every D, plus the full parameters of ``modules_to_save``."""
    return {name: p.detach() for name, p in model.named_parameters(remove_duplicate=False)
            if _trains(name, config)}


def distinct_parameters(model: nn.Module) -> Iterator[tuple[list[str], nn.Parameter]]:
    """Every distinct parameter with all its names, in model order. A tied tensor (an LM head sharing the
    embedding) has several; ``named_parameters`` lists it once, under the first."""
    names: dict[int, list[str]] = {}
    params: dict[int, nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
        params[id(p)] = p
    return ((names[pid], p) for pid, p in params.items())


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every MiSS layer with a plain linear holding the merged weight (single-device layers only: a
    tensor-parallel one raises before anything is replaced)."""
    for name, linear in [(name, layer.merged_linear()) for name, layer in miss_layers(model)]:
        _set_submodule(model, name, linear)
    return model


def _link_shared_inputs(model: nn.Module) -> None:
    """Group the MiSS layers that read one input (the family's ``shared_inputs``: q, k, v; gate, up) so that their
    products are computed together; a model of no known family keeps every layer on its own."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        return
    for parent in model.modules():
        for names in FAMILIES[model_type].shared_inputs:
            layers = [getattr(parent, n) for n in names if isinstance(getattr(parent, n, None), MissLayer)]
            link_siblings(layers)


def _import_parallel_layers() -> None:
    """Register the TP layer types of DeepSpeed and Megatron-core, if in use (a model holding them imported them)."""
    if "deepspeed.module_inject.layers" in sys.modules:
        from .parallel import autotp  # noqa: F401
    if "megatron.core.tensor_parallel" in sys.modules:
        from .parallel import megatron  # noqa: F401


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _trains(param_name: str, config: MissConfig | None) -> bool:
    """D, and the parameters of ``modules_to_save``."""
    return param_name.endswith("." + D_NAME) or (config is not None and config.saves(param_name))


def _set_trainable(model: nn.Module, config: MissConfig) -> None:
    """D and ``modules_to_save`` train; a tied tensor trains if any of its names does."""
    for names, p in distinct_parameters(model):
        train = any(_trains(n, config) for n in names)
        if train and len(names) > 1:
            logger.warning("%s are one tied tensor: modules_to_save=%s trains all of them", names,
                           list(config.modules_to_save))
        p.requires_grad_(train)


def _routed_expert_params(model: nn.Module) -> int:
    """Frozen parameters of the routed experts of an MoE family (0 for other models)."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in FAMILIES or FAMILIES[config.model_type].experts is None:
        return 0
    return sum(p.numel() for name, p in model.named_parameters() if ".experts." in name and not p.requires_grad)


def _count(model: nn.Module) -> tuple[int, int]:
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total
