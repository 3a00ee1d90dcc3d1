"""The on-disk adapter: D tensors per tensor-parallel rank plus what reassembling and resharding them needs.

Layout of an adapter directory (inside every training checkpoint, and what the export tools read)::

    adapter_config.json          MiSS config, tp_size, base-model summary, base fingerprint (miss_ds.fingerprint),
                                 and per-tensor layout:
                                 {"<module>.miss_block": {"dim": 0 | 1 | null, "sizes": [...], "full_shape": [...]}}
                                 (plus "parts", each fused part's sizes, for the D of a fused projection)
    tp00-of-02.safetensors       the tensors held by TP rank 0 (fp32), keyed by parameter name
    tp01-of-02.safetensors       ... one file per TP rank

The tensors are every D plus the parameters of ``modules_to_save`` (trained in full, replicated over TP).
``dim`` null means replicated over the TP group (every file holds the whole tensor).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from safetensors.torch import load_file
from torch import nn

from .config import MissConfig
from .fingerprint import Fingerprint
from .hf_checkpoint import save_safetensors
from .inject import adapter_state_dict, miss_layers
from .layers import D_NAME, DLayout

ADAPTER_CONFIG = "adapter_config.json"
FORMAT_VERSION = 1


def shard_file(tp_rank: int, tp_size: int) -> str:
    return f"tp{tp_rank:02d}-of-{tp_size:02d}.safetensors"


def base_summary(model: nn.Module) -> dict[str, Any]:
    """What identifies the base model an adapter belongs to (checked when loading)."""
    cfg = getattr(model, "config", None)
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "num_local_experts", "num_experts", "shared_expert_intermediate_size",
            "vocab_size")
    summary = {k: getattr(cfg, k) for k in keys if cfg is not None and hasattr(cfg, k)}
    summary["name_or_path"] = getattr(cfg, "_name_or_path", "") if cfg is not None else ""
    return summary


def adapter_parameters(model: nn.Module, config: MissConfig) -> dict[str, nn.Parameter]:
    """The parameters an adapter holds, by name: every D, then the parameters of ``modules_to_save``."""
    names = set(adapter_state_dict(model, config))
    return {n: p for n, p in model.named_parameters(remove_duplicate=False) if n in names}


def layouts(model: nn.Module, config: MissConfig) -> dict[str, dict[str, Any]]:
    """Per adapter tensor: how this run splits it over TP ranks, and its full shape."""
    out = {}
    for name, p in adapter_parameters(model, config).items():
        out[name] = {**DLayout().to_json(), "full_shape": list(p.shape)}
    for name, layer in miss_layers(model):
        out[f"{name}.{D_NAME}"] = {**layer.d_layout.to_json(), "full_shape": list(layer.full_geometry.d_shape)}
    return out


def write_adapter_config(directory: Path, config: MissConfig, model: nn.Module, tp_size: int,
                         base_fingerprint: Optional[Fingerprint] = None) -> None:
    """Write adapter_config.json, with ``target_modules`` resolved (the family's default when the config leaves it
    unset); ``base_fingerprint`` identifies the base D was trained on (``fingerprint.of_model`` of the training
    model; None: unknown)."""
    config = config.for_model(getattr(model, "config", None))
    meta = {"format_version": FORMAT_VERSION, "miss": config.to_dict(), "tp_size": tp_size,
            "base_model": base_summary(model),
            "base_fingerprint": None if base_fingerprint is None else base_fingerprint.to_json(),
            "layouts": layouts(model, config)}
    (directory / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=1))


def write_adapter_shard(directory: Path, tensors: dict[str, torch.Tensor], tp_rank: int, tp_size: int) -> None:
    """Write this TP rank's D tensors (callers pass fp32 masters), one file per TP rank."""
    save_safetensors({k: v.detach().to(torch.float32).contiguous().cpu() for k, v in tensors.items()},
                     directory / shard_file(tp_rank, tp_size))


class AdapterMismatch(ValueError):
    """An adapter that is malformed, or does not fit the base or config it is applied to (keys, shapes, base model,
    mode): bad input, which the tools report in one line."""


def read_adapter_config(directory: Path) -> dict[str, Any]:
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: not a miss_ds adapter directory (or an incomplete one)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterMismatch(f"{path} is not valid JSON ({exc}): the adapter is corrupt") from None


def read_full_adapter(directory: Path, keys: Optional[Iterable[str]] = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """The adapter config and every D reassembled to its full shape, whatever TP size wrote it."""
    directory = Path(directory)
    meta = read_adapter_config(directory)
    tp_size = meta["tp_size"]
    shards = []
    for rank in range(tp_size):
        path = directory / shard_file(rank, tp_size)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the adapter was written with tp_size={tp_size}")
        shards.append(load_file(str(path)))
    full = {}
    for key in (keys if keys is not None else meta["layouts"]):
        layout = meta["layouts"].get(key)
        if layout is None:
            raise AdapterMismatch(f"{directory / ADAPTER_CONFIG} has no layout for '{key}'")
        missing = [r for r, s in enumerate(shards) if key not in s]
        if missing:
            raise AdapterMismatch(f"'{key}' is missing from {directory / shard_file(missing[0], tp_size)}")
        tensor = DLayout.from_json(layout).join([s[key] for s in shards])
        if list(tensor.shape) != layout["full_shape"]:
            raise AdapterMismatch(f"'{key}' reassembles to {list(tensor.shape)}, adapter_config.json says "
                                  f"{layout['full_shape']}: the adapter files are inconsistent")
        full[key] = tensor
    return meta, full


def check_base(meta: dict[str, Any], model: nn.Module, source: str) -> None:
    """Refuse an adapter trained on a different base model (shape fields must agree)."""
    ours = base_summary(model)
    diffs = [f"{k}: adapter {v} vs model {ours[k]}" for k, v in meta.get("base_model", {}).items()
             if k != "name_or_path" and k in ours and ours[k] != v]
    if diffs:
        raise AdapterMismatch(f"{source} was trained on another base model ({'; '.join(diffs)})")


def local_parts(model: nn.Module, full: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """This rank's part of every full adapter tensor, by parameter name: each layer's own part of D (its TP shard),
    and the replicated ``modules_to_save`` parameters whole. Checks names and shapes, naming ``source``."""
    layers = dict(miss_layers(model))
    params = dict(model.named_parameters(remove_duplicate=False))
    parts = {}
    for name, layer in layers.items():
        key = f"{name}.{D_NAME}"
        if key not in full:
            raise AdapterMismatch(f"{source} has no D for '{key}': trained with other target_modules?")
        want = list(layer.full_geometry.d_shape)
        if list(full[key].shape) != want:
            raise AdapterMismatch(f"{source}: '{key}' has shape {list(full[key].shape)}, this model needs {want}: "
                                  "different r or mode?")
        parts[key] = layer.shard_d(full[key])
    for key in sorted(set(full) - set(parts)):  # modules_to_save, replicated
        if key not in params or tuple(params[key].shape) != tuple(full[key].shape):
            raise AdapterMismatch(f"{source} holds '{key}' {list(full[key].shape)}, which this model does not have "
                                  "with that shape: wrong base model or config?")
        parts[key] = full[key]
    return parts


def load_full_adapter_into(model: nn.Module, full: dict[str, torch.Tensor], source: str = "adapter") -> None:
    """Copy full adapter tensors (``adapter_state_dict`` of a single-device model, or ``read_full_adapter``'s) into
    a model with MiSS applied, possibly TP-split: each layer keeps its own part of D. Names and shapes are checked
    first (``AdapterMismatch`` naming ``source``)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for key, local in local_parts(model, full, source).items():
            params[key].copy_(local)
