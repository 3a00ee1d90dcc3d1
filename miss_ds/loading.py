"""Per-rank loading of big models: build on meta, split and adapt on meta, then read only this rank's shards.

    model = build_model_on_meta(config, dtype)          # no memory for weights
    shard_model(model, tp_group); apply_miss(model, miss)  # still on meta: shapes of this rank's shards
    stats = load_sharded_weights(model, base_dir, device, dtype, miss_config=miss)

A tensor-parallel weight is read as slices of the safetensors file (column layers: dim 0 of weight and
bias, one range per fused part; row layers: dim 1 of the weight, the bias whole), so no rank ever holds a full
split weight. Tensors the checkpoint names otherwise are found through the model family's key mapping
(``miss_ds.families``: GPT-NeoX's ``embed_out``, Mixtral's ``block_sparse_moe``), and routed MoE experts, which
transformers keeps fused as (experts, out, in) while checkpoints hold one 2-D weight per expert and projection,
are assembled from this rank's slices of those. (transformers' own ``conversion_mapping`` does that conversion
on whole tensors, reading every expert in full before any split, so it is not used here.) Parameters are filled
in place (``torch.utils.swap_tensors``): tied weights stay tied and the attributes DeepSpeed set on its TP
parameters survive. Buffers the checkpoint does not hold (rotary ``inv_freq``, Gemma's ``embed_scale``) are
recomputed by the model's own ``_init_weights``.
"""
from __future__ import annotations

import logging
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from .adapter_io import load_full_adapter_into
from .config import MissConfig
from .engine import prepare_model
from .families import Family, family_of
from .hf_checkpoint import HFCheckpoint
from .inject import TrainableReport, distinct_parameters, miss_layers
from .layers import D_NAME, MissLayer, Span
from .modeling import DTYPES
from .run_config import RunConfig

logger = logging.getLogger(__name__)


@dataclass
class LoadStats:
    """What one rank read from the checkpoint for its parameters (bytes as stored, before any cast)."""

    bytes_read: int = 0
    tensors_sliced: int = 0


def build_model_on_meta(config: PretrainedConfig, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """``AutoModelForCausalLM.from_config`` on the meta device: the module tree without any weight memory.

    Build in the dtype you will load: ``apply_miss`` picks D's dtype from the weights' (adapter_dtype='model').
    """
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


@torch.no_grad()
def load_sharded_weights(model: nn.Module, checkpoint_dir: Path | str, device: torch.device | str,
                         dtype: torch.dtype, *, miss_config: Optional[MissConfig] = None,
                         adapter: Optional[dict[str, torch.Tensor]] = None,
                         loaded: Optional[Callable[[str], None]] = None) -> LoadStats:
    """Materialise every meta parameter and buffer of ``model`` on ``device`` from a safetensors checkpoint.

    Base parameters are cast to ``dtype``. D keeps the dtype ``apply_miss`` gave it and is initialised as
    ``miss_config.init_weights`` says (zeros without a config; a random D draws from the global RNG like
    ``apply_miss``), then, with ``adapter`` (full tensors by parameter name, as ``adapter_io.read_full_adapter``
    or ``convert.peft.read_peft_adapter`` return them), set from it along with any ``modules_to_save`` parameters.
    ``loaded(name)`` is called as each base parameter is materialised (``quantize.BaseQuantizer.loaded``).
    """
    stats = LoadStats()
    family = family_of(model.config)
    with HFCheckpoint(checkpoint_dir) as ckpt:
        for names, param in base_parameters(model):
            split = split_of(model, names[0])
            value = _read(ckpt, _stored(ckpt, family, model.config, names), names[0], tuple(param.shape), split)
            stats.bytes_read += value.numel() * value.element_size()
            stats.tensors_sliced += split is not None
            # copy=True: a tensor read from safetensors may share the file's memory map; parameters must own theirs.
            _swap_in(param, value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype,
                                     copy=True))
            if loaded is not None:
                loaded(names[0])
        _materialize_buffers(model, device, ckpt)
    _materialize_d(model, device, zeros=True if miss_config is None else miss_config.init_weights)
    if adapter is not None:
        load_full_adapter_into(model, adapter, "adapter")
    _check_materialized(model)
    return stats


@torch.no_grad()
def materialize_random(model: nn.Module, device: torch.device | str, dtype: torch.dtype, seed: int, *,
                       miss_config: Optional[MissConfig] = None, loaded: Optional[Callable[[str], None]] = None
                       ) -> None:
    """Random weights for benchmarks, like HF's init: matrices N(0, initializer_range), norm weights 1, biases 0.

    Each parameter draws from its own generator seeded by (seed, name, shard offset): replicated parameters are
    equal on every rank, TP shards differ, and each rank allocates only its own shards. D is initialised from
    the global RNG reseeded with ``seed`` (as ``apply_miss`` draws it), so it is equal on every rank too.
    ``loaded(name)`` is called as each base parameter is materialised (``quantize.BaseQuantizer.loaded``).
    """
    std = getattr(model.config, "initializer_range", None) or 0.02
    for names, param in base_parameters(model):
        split = split_of(model, names[0])
        offset = split.ranges[0][0] if split is not None and split.ranges else 0
        value = torch.empty(param.shape, device=device, dtype=dtype if param.is_floating_point() else param.dtype)
        if value.dim() >= 2:
            generator = torch.Generator(device=value.device)
            generator.manual_seed(zlib.crc32(f"{seed}:{names[0]}:{offset}".encode()))
            value.normal_(0.0, std, generator=generator)
        elif names[0].endswith("bias"):
            value.zero_()
        else:
            value.fill_(1)
        _swap_in(param, value)
        if loaded is not None:
            loaded(names[0])
    _materialize_buffers(model, device, None)
    torch.manual_seed(seed)
    _materialize_d(model, device, zeros=True if miss_config is None else miss_config.init_weights)
    _check_materialized(model)


def base_parameters(model: nn.Module) -> Iterator[tuple[list[str], nn.Parameter]]:
    """Every distinct non-D parameter with all its names (tied parameters have several), in model order."""
    return ((names, p) for names, p in distinct_parameters(model) if not names[0].endswith("." + D_NAME))


def split_of(model: nn.Module, param_name: str) -> Optional[Span]:
    """Where this rank's shard of ``param_name`` sits in the full tensor; None for a replicated parameter.

    The owner is a MiSS layer, a DeepSpeed AutoTP layer MiSS did not wrap (an excluded projection), or a module
    whose split parameters ``tp_spans`` lists (``miss_ds.parallel.internals``: OLMo2's q/k norms, routed experts).
    """
    module_name, _, attr = param_name.rpartition(".")
    module = model.get_submodule(module_name)
    if isinstance(module, MissLayer):
        return module.sharding.span(attr)
    if hasattr(module, "tp_spans"):
        return module.tp_spans.get(attr)
    if "deepspeed.module_inject.layers" in sys.modules:  # only a model holding DeepSpeed's TP layers imported it
        from .parallel.autotp import sharding_of

        sharding = sharding_of(module)
        return None if sharding is None else sharding.span(attr)
    return None


@dataclass(frozen=True)
class _Stored:
    """Where a parameter is in the checkpoint: ``keys[expert][part]``. A tensor stored whole has one key; a routed
    expert parameter is every expert's parts concatenated along out, the experts stacked (``stacked``)."""

    keys: list[list[str]]
    stacked: bool = False


def _stored(ckpt: HFCheckpoint, family: Family, config: PretrainedConfig, names: list[str]) -> _Stored:
    """Where the parameter called ``names`` (all its tied names) is stored: under the module tree's name, the
    family's checkpoint name for it, or per expert."""
    experts = family.expert_file_keys(names[0], config)
    if experts is not None:
        return _Stored(experts, stacked=True)
    for name in names:
        for key in (name, family.file_key(name)):
            if key in ckpt.key_file:
                return _Stored([[key]])
    tied = f" (nor its tied aliases {names[1:]})" if len(names) > 1 else ""
    raise KeyError(f"{ckpt.directory} has no tensor for parameter '{names[0]}'{tied}")


def _read(ckpt: HFCheckpoint, stored: _Stored, name: str, local_shape: tuple[int, ...],
          split: Optional[Span]) -> torch.Tensor:
    """Read the parameter ``name`` (only this rank's ranges of a split one), checking the stored shapes first."""
    want = list(local_shape)
    if split is not None:
        want[split.dim] = split.full
    shapes = [[list(ckpt.shape(key)) for key in parts] for parts in stored.keys]
    first = shapes[0]
    got = first[0] if not stored.stacked else [len(shapes), sum(s[0] for s in first), *first[0][1:]]
    if got != want or any(s != first for s in shapes) or any(s[1:] != first[0][1:] for s in first):
        where = stored.keys[0][0] + (f" ... {stored.keys[-1][-1]}" if stored.stacked else "")
        raise ValueError(f"'{where}' in {ckpt.directory} has shape {got if got != want else shapes}, the model "
                         f"expects {want} for '{name}': was the checkpoint saved from a model with this config?")
    if not stored.stacked:
        return _read_ranges(ckpt, stored.keys[0], split)
    inner = None if split is None else Span(split.dim - 1, split.ranges, split.full)
    return torch.stack([_read_ranges(ckpt, parts, inner) for parts in stored.keys])


def _read_ranges(ckpt: HFCheckpoint, parts: list[str], split: Optional[Span]) -> torch.Tensor:
    """The tensors ``parts`` concatenated along dim 0, or only ``split``'s ranges of that concatenation."""
    if split is None:
        return torch.cat([ckpt.read(key) for key in parts]) if len(parts) > 1 else ckpt.read(parts[0])
    offsets, pieces = [0], []
    for key in parts:
        offsets.append(offsets[-1] + ckpt.shape(key)[0])
    for start, stop in split.ranges:
        if split.dim != 0:
            pieces.append(torch.cat([ckpt.read(key, split.dim, start, stop) for key in parts]))
            continue
        for key, lo, hi in zip(parts, offsets, offsets[1:]):
            if start < hi and stop > lo:
                pieces.append(ckpt.read(key, 0, max(start, lo) - lo, min(stop, hi) - lo))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, split.dim)


def _swap_in(tensor: torch.Tensor, value: torch.Tensor) -> None:
    """Give the meta ``tensor`` the data of ``value`` while keeping its identity and Python attributes."""
    replacement = nn.Parameter(value, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) \
        else value
    attributes = dict(tensor.__dict__)
    torch.utils.swap_tensors(tensor, replacement)
    tensor.__dict__.update(attributes)


def _materialize_buffers(model: nn.Module, device: torch.device | str, ckpt: Optional[HFCheckpoint]) -> None:
    """Buffers: read those the checkpoint holds; recompute the others (rotary ``inv_freq``, Gemma's ``embed_scale``)
    with the model's own ``_init_weights``, the module's parameters marked as initialised (transformers' flag) so
    that only its buffers are written."""
    for module_name, module in model.named_modules():
        meta = {n: b for n, b in module.named_buffers(recurse=False) if b is not None and b.is_meta}
        if not meta:
            continue
        keys = {name: f"{module_name}.{name}" if module_name else name for name in meta}
        stored = {name: key for name, key in keys.items() if ckpt is not None and key in ckpt.key_file}
        for name, buffer in meta.items():
            value = torch.empty(buffer.shape, dtype=buffer.dtype, device=device)
            setattr(module, name, value.fill_(float("nan")) if value.is_floating_point() else value)
        for name, key in stored.items():
            getattr(module, name).copy_(ckpt.read(key))
        if len(stored) < len(meta):
            _recompute_buffers(model, module)
        for name in set(meta) - set(stored):
            value = getattr(module, name)
            if not value.is_floating_point() or value.isnan().any():
                raise KeyError(f"buffer '{keys[name]}' is on the meta device, not in the checkpoint and not recomputed "
                               f"by {type(model).__name__}._init_weights")


def _recompute_buffers(model: nn.Module, module: nn.Module) -> None:
    """``model._init_weights(module)`` writing only buffers: the module's own parameters carry transformers'
    ``_is_hf_initialized`` flag meanwhile, which its init functions respect."""
    params = list(module.parameters(recurse=False))
    for p in params:
        p._is_hf_initialized = True
    try:
        model._init_weights(module)
    finally:
        for p in params:
            del p._is_hf_initialized


def _materialize_d(model: nn.Module, device: torch.device | str, zeros: bool) -> None:
    """Every D on ``device`` in its own dtype, drawn as ``apply_miss`` draws it."""
    for _, layer in miss_layers(model):
        if layer.miss_block.is_meta:
            _swap_in(layer.miss_block, layer.draw_d(zeros=zeros, dtype=layer.miss_block.dtype, device=device))


def _check_materialized(model: nn.Module) -> None:
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, tensor in items:
            if tensor is not None and tensor.is_meta:
                raise RuntimeError(f"{kind} '{name}' is still on the meta device after loading")


def model_on_meta(cfg: RunConfig, model_config: PretrainedConfig, tp: int) -> tuple[nn.Module, TrainableReport]:
    """The run's model without memory: built on meta, split for TP and given MiSS there. Every shape problem (r,
    mode, TP shards) is raised here, before any data is read or weight loaded."""
    model = build_model_on_meta(model_config, DTYPES[cfg.model.dtype])
    return model, prepare_model(model, cfg.miss, tp, cfg.parallel.tp_grain_size)


def materialize_model(model: nn.Module, cfg: RunConfig, device: torch.device,
                      loaded: Optional[Callable[[str], None]] = None) -> int:
    """Give a model from ``model_on_meta`` this rank's weights: its shards of ``model.path``, or random ones, calling
    ``loaded(name)`` as each base parameter is materialised. Returns the bytes read from the checkpoint."""
    dtype = DTYPES[cfg.model.dtype]
    bytes_read = 0
    if not cfg.model.random_weights:
        bytes_read = load_sharded_weights(model, cfg.model.path, device, dtype, miss_config=cfg.miss,
                                          loaded=loaded).bytes_read
        logger.info("read %.2f GiB of %s", bytes_read / 2**30, cfg.model.path)
    else:
        materialize_random(model, device, dtype, cfg.seed, miss_config=cfg.miss, loaded=loaded)
    return bytes_read
