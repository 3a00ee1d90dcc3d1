"""The base model's Hugging Face config for a run: a local checkpoint's, or one built from fields (random weights)."""
from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.util
import inspect
import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional, Protocol

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers import CONFIG_MAPPING, PretrainedConfig
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from . import recompute
from .families import UnsupportedModel, family_of
from .config import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
#: An attention kernel on the Hugging Face Hub: ``org/name``, optionally ``@revision`` and ``:function``.
HUB_KERNEL = re.compile(r"^[^/:@]+/[^/:@]+(@[^/:@]+)?(:[^/:@]+)?$")
#: Attention implementations and the flag a transformers model class declares its support with.
ATTENTION_FLAGS = {"sdpa": "_supports_sdpa", "flash_attention_2": "_supports_flash_attn",
                   "flash_attention_3": "_supports_flash_attn", "flex_attention": "_supports_flex_attn"}
#: FlashAttention implementations: the module transformers runs each with, what provides it and how to install it.
FLASH_ATTENTION_PACKAGES = {
    "flash_attention_2": ("flash_attn", "the flash-attn package", "pip install flash-attn"),
    "flash_attention_3": ("flash_attn_interface", "FlashAttention-3 (its flash_attn_interface module)",
                          "build it from the flash-attention repository's hopper/ directory"),
}


class ModelSection(Protocol):
    """What :func:`hf_config` reads of a run config's ``model`` section (``run_config.ModelConfig``, which reads the
    model's config through this module when it is loaded)."""

    path: Optional[str]
    config: dict[str, Any]
    attn_implementation: Optional[str]


def hf_config(cfg: ModelSection, vocab_size: int | None = None,
              where: Optional[Callable[[str], str]] = None) -> PretrainedConfig:
    """The model's config: ``path``'s config.json with ``config`` overrides, or ``config`` alone (model_type required).

    The config class's own constructor builds it from all the fields at once, so the fields it derives follow the
    given ones (Llama's head_dim is hidden_size / num_attention_heads unless set). A field the class does not know
    is refused with the nearest valid name, a family miss_ds does not support by name, and the attention
    implementation is the family's default (``sdpa`` where transformers supports it, else ``eager``) unless set.
    ``where(key)`` says where a run config key was set (``config_loader.Origins.of``): given, a refusal of a ``model.``
    key starts with it; a problem of ``path``'s own config.json names that file.
    """
    def at(key: str) -> str:
        return f"{where(key)}: " if where is not None else ""

    overrides = dict(cfg.config)
    fields: dict[str, Any] = _checkpoint_fields(cfg.path) if cfg.path is not None else {}
    model_type = _model_type(cfg, overrides.pop("model_type", None), fields.pop("model_type", None), at)
    config_class = CONFIG_MAPPING[model_type]
    if cfg.path is None and vocab_size is not None and "vocab_size" not in overrides:
        overrides["vocab_size"] = vocab_size
    try:
        config = config_class.from_dict(copy.deepcopy({**fields, **overrides}))
    except (TypeError, ValueError, ArithmeticError, StrictDataclassError) as exc:  # the fields' values, checked
        whole = (str(Path(cfg.path) / "config.json") if cfg.path is not None and not overrides else
                 f"{at('model.config')}'model.config'")
        raise ConfigError(_invalid_fields(config_class, exc, overrides, at, whole)) from None
    _check_fields(config_class, fields, overrides, at)
    config.use_cache = False
    if cfg.path is not None:  # recorded by every adapter as its base (adapter_io.base_summary), found by convert
        config._name_or_path = str(Path(cfg.path).resolve())
    config._attn_implementation = attention_implementation(config, cfg.attn_implementation,
                                                           at("model.attn_implementation"))
    return config


def _model_type(cfg: ModelSection, given: Any, stored: Any, at: Callable[[str], str]) -> str:
    """The model type: ``model.config``'s (``given``), else the checkpoint's config.json's (``stored``); refused,
    naming where it was set, when missing, unknown to transformers or of a family miss_ds does not support."""
    file = Path(cfg.path or "") / "config.json"
    model_type, origin = (given, at("model.config.model_type")) if given is not None else (stored, f"{file}: ")
    if model_type is None and cfg.path is None:
        raise ConfigError(f"{at('model.config')}'model.config' needs 'model_type' (e.g. llama) when model.path is null")
    if model_type is None:
        raise ConfigError(f"{file} has no 'model_type': add it there, or set model.config.model_type (e.g. llama)")
    if model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING), n=1)
        raise ConfigError(f"{origin}model_type={model_type!r} is not a transformers model type"
                          + (f"; did you mean {close[0]!r}?" if close else ""))
    try:
        family_of(SimpleNamespace(model_type=model_type))
    except UnsupportedModel as exc:
        raise ConfigError(f"{origin}{exc}") from None
    return model_type


def _checkpoint_fields(path: str) -> dict[str, Any]:
    """The fields of checkpoint directory ``path``'s config.json, as transformers reads them; a file that is not a
    JSON object is refused, naming it."""
    file = Path(path) / "config.json"
    try:
        data = json.loads(file.read_text())
    except OSError as exc:
        raise ConfigError(f"{file} cannot be read ({exc.strerror or exc}): model.path={path} must be a Hugging Face "
                          "checkpoint directory") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ConfigError(f"{file} is not valid JSON ({exc}): fix or re-save the checkpoint's config") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file} holds a JSON {type(data).__name__}, not an object of config fields")
    return PretrainedConfig.get_config_dict(path)[0]


def _invalid_fields(config_class: type, exc: BaseException, overrides: dict[str, Any],
                    at: Callable[[str], str], whole: str) -> str:
    """Why the fields do not make a ``config_class``: transformers' reason, located at the first ``model.config`` key
    it mentions (by name, or with spaces for underscores), else at ``whole`` (model.config, or the checkpoint's
    config.json when nothing overrides it)."""
    cause = " ".join(str(exc.__cause__ or exc).split()) or type(exc).__name__
    named = [key for key in overrides if re.search(rf"\b({re.escape(key)}|{re.escape(key.replace('_', ' '))})\b",
                                                    cause, re.IGNORECASE)]
    if named:
        key = f"model.config.{named[0]}"
        return f"{at(key)}'{key}' is {overrides[named[0]]!r}, which makes no valid {config_class.__name__}: {cause}"
    return f"{whole} does not make a valid {config_class.__name__}: {cause}"


def _check_fields(config_class: type, fields: dict[str, Any], overrides: dict[str, Any],
                  at: Callable[[str], str]) -> None:
    """Refuse an override the config class neither declares nor consumes (a typo would otherwise be kept as a stray
    attribute while the model silently takes the default). Legacy names the constructor converts (``rope_theta``,
    ``rope_scaling``, GPT-NeoX's ``rotary_pct``) change the built config, and so count as known."""
    known = {f.name for f in dataclasses.fields(config_class)} | set(config_class.attribute_map) \
        | set(inspect.signature(config_class.__init__).parameters) - {"self", "kwargs"}

    def built(values: dict[str, Any]) -> dict[str, Any]:  # constructors may edit the dicts they are given
        return config_class(**copy.deepcopy(values)).to_dict()

    for key in sorted(set(overrides) - known):
        without = {**fields, **{k: v for k, v in overrides.items() if k != key}}
        if {k: v for k, v in built({**without, key: overrides[key]}).items() if k != key} == built(without):
            close = difflib.get_close_matches(key, sorted(k for k in known if not k.startswith("_")), n=1)
            hint = f"; did you mean 'model.config.{close[0]}'?" if close else ""
            raise ConfigError(f"{at(f'model.config.{key}')}unknown field 'model.config.{key}' for "
                              f"{config_class.__name__}{hint}")


def attention_implementation(config: PretrainedConfig, requested: Optional[str], origin: str = "") -> str:
    """``requested``, or the family's default: ``sdpa`` where the model class supports it, else ``eager``. A known
    implementation the class does not support is refused, naming the family and what works (after ``origin``, where
    the request was made)."""
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    supported = ["eager"] + [name for name, flag in ATTENTION_FLAGS.items() if getattr(model_class, flag, False)]
    if requested is None:
        return "sdpa" if "sdpa" in supported else "eager"
    if "/" in requested:
        return _hub_kernel(requested, supported, origin)
    if requested in ATTENTION_FLAGS and requested not in supported:
        family = family_of(config)
        why = f" ({family.attention_note})" if family.attention_note else ""
        raise ConfigError(f"{origin}model.attn_implementation={requested!r}: {family.name} does not support it in "
                          f"transformers{why}; use one of {supported}, or leave it unset for the default")
    _check_flash_attention_package(requested, supported, origin)
    return requested


def _check_flash_attention_package(requested: str, supported: list[str], origin: str) -> None:
    """Refuse a FlashAttention implementation (``FLASH_ATTENTION_PACKAGES``) whose module is not installed, unless
    the ``kernels`` package is, from which transformers then takes the Hub's build: transformers itself fails only
    when the model is built, after the data."""
    if requested not in FLASH_ATTENTION_PACKAGES:
        return
    module, package, install = FLASH_ATTENTION_PACKAGES[requested]
    if importlib.util.find_spec(module) is not None or importlib.util.find_spec("kernels") is not None:
        return
    raise ConfigError(f"{origin}model.attn_implementation={requested!r} needs {package}, which is not installed: "
                      f"{install} (or pip install kernels, with which transformers fetches it from the Hugging Face "
                      f"Hub), or use one of {[name for name in supported if name not in FLASH_ATTENTION_PACKAGES]}")


def _hub_kernel(requested: str, supported: list[str], origin: str) -> str:
    """``requested``, an attention kernel on the Hugging Face Hub (``org/name[@revision][:function]``, as
    transformers' ``is_kernel`` reads it), once its form and the ``kernels`` package that loads it are checked."""
    if not HUB_KERNEL.match(requested):
        raise ConfigError(f"{origin}model.attn_implementation={requested!r} is neither one of {supported} nor a Hub "
                          "kernel 'org/name' (optionally '@revision', ':function'), e.g. "
                          "'kernels-community/flash-attn3'")
    if importlib.util.find_spec("kernels") is None:
        raise ConfigError(f"{origin}model.attn_implementation={requested!r} is a Hub attention kernel, which "
                          "transformers loads with the kernels package: pip install kernels (on offline nodes the "
                          f"kernel must be in the Hub cache), or use one of {supported}")
    return requested


def enable_recompute(model: nn.Module, layers: int | None) -> int:
    """Activation checkpointing on the first ``layers`` decoder layers (all when None); returns how many.

    Recomputing a layer trades its stored activations for a second forward pass in backward; when memory
    allows, leaving the last layers stored makes a step faster (tools/plan_memory.py says how many fit).
    A recomputed layer keeps MiSS's aggregations agg(x) from its first forward (:mod:`miss_ds.recompute`).
    """
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={
        "use_reentrant": False, "context_fn": recompute.checkpoint_contexts})
    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    count = len(blocks) if layers is None else max(0, min(layers, len(blocks)))
    for block in blocks[count:]:
        block.gradient_checkpointing = False
    return count
