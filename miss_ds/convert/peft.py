"""PEFT MiSS adapters: export a miss_ds adapter for ``PeftModel.from_pretrained``, and import one to train on.

The two formats hold the same tensors: miss_ds's full D of ``<module>`` is PEFT's
``base_model.model.<module>.miss_block`` and a ``modules_to_save`` parameter ``<name>`` is PEFT's
``base_model.model.<name>``; miss_ds's ``mode`` is PEFT's ``init_weights`` (``miss`` -> True,
``mini`` -> "mini", ``bat`` -> "bat").
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from peft import MissConfig as PeftMissConfig
from safetensors.torch import load_file

from ..adapter_io import ADAPTER_CONFIG, AdapterMismatch
from ..config import MissConfig
from ..hf_checkpoint import save_safetensors
from ..layers import D_NAME
from .output import new_output_dir, write_base_fingerprint, write_run_config
from .source import Adapter, is_d_key, known_base, read_adapter, recorded_base

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_WEIGHTS_BIN = "adapter_model.bin"
#: Prefix PEFT gives every saved key of a ``PeftModel`` (adapter name stripped).
PEFT_PREFIX = "base_model.model."
_INIT_WEIGHTS = {"miss": True, "mini": "mini", "bat": "bat"}


def write_peft_adapter(checkpoint: Path | str, output: Path | str, base: Optional[Path | str] = None) -> Path:
    """Write the adapter of ``checkpoint`` as a PEFT MiSS adapter directory ``output``.

    The base (``base``, else the one the adapter records when it is here: ``source.known_base``) is checked
    against the adapter and recorded, absolute, as ``base_model_name_or_path`` (what ``AutoPeftModelForCausalLM``
    loads; ``base_name``). The training run's config is written alongside when known.
    """
    adapter = read_adapter(checkpoint)
    cfg = adapter.config
    peft_config = PeftMissConfig(
        r=cfg.r, mini_r=cfg.mini_r, miss_dropout=cfg.dropout, init_weights=_INIT_WEIGHTS[cfg.mode],
        target_modules=cfg.target_modules, exclude_modules=cfg.exclude_modules, bias="none",
        modules_to_save=list(cfg.modules_to_save) or None, task_type="CAUSAL_LM",
        base_model_name_or_path=base_name(adapter, known_base(adapter, base)))
    stray = [key for key in adapter.tensors if not _held(key, cfg)]
    if stray:
        raise AdapterMismatch(f"{adapter.directory} holds {stray[:3]}, neither MiSS blocks nor parameters of "
                              f"modules_to_save={cfg.modules_to_save}: PEFT would not load them")
    out = new_output_dir(output)
    peft_config.save_pretrained(str(out))
    tensors = {PEFT_PREFIX + key: t.to(torch.float32).contiguous() for key, t in adapter.tensors.items()}
    save_safetensors(tensors, out / PEFT_WEIGHTS)
    write_run_config(out, adapter.run_config)
    write_base_fingerprint(out, adapter.meta.get("base_fingerprint"))
    return out


def base_name(adapter: Adapter, known: Optional[Path]) -> Optional[str]:
    """``base_model_name_or_path`` of a PEFT export: the absolute path of the adapter's base when it is here
    (``known``, from ``known_base``), else the name the adapter records (None when it records none)."""
    if known is not None:
        return str(known.resolve())
    return recorded_base(adapter) or None


def read_peft_adapter(path: Path | str) -> tuple[MissConfig, dict[str, torch.Tensor]]:
    """A PEFT MiSS adapter as the miss_ds config and its tensors: full D keyed ``<module>.miss_block``, plus
    the ``modules_to_save`` parameters by name.

    The result goes to ``adapter_io.load_full_adapter_into`` to start a miss_ds run from the adapter.
    """
    path = Path(path)
    config = read_peft_config(path)
    return config, _read_peft_tensors(path, config)


def read_peft_config(path: Path | str) -> MissConfig:
    """The miss_ds config of the PEFT MiSS adapter in ``path``, checked to hold its weights file (no tensor is
    read): ``AdapterMismatch`` for a config miss_ds cannot take, ``FileNotFoundError`` for missing files."""
    path = Path(path)
    config = miss_config_from_peft(_read_peft_config(path), path / ADAPTER_CONFIG)
    _peft_weights(path)
    return config


def _peft_weights(path: Path) -> Path:
    """The weights file of the PEFT adapter in ``path``: safetensors, else PEFT's older ``.bin``."""
    for name in (PEFT_WEIGHTS, PEFT_WEIGHTS_BIN):
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"{path} has neither {PEFT_WEIGHTS} nor {PEFT_WEIGHTS_BIN}")


def _read_peft_config(path: Path) -> dict[str, Any]:
    file = path / ADAPTER_CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing: not a PEFT adapter directory")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterMismatch(f"{file} is not valid JSON ({exc})") from None
    if "peft_type" not in raw and "miss" in raw and "tp_size" in raw:
        raise AdapterMismatch(f"{file} belongs to a miss_ds adapter, not a PEFT one: use it directly as a miss_ds "
                              "adapter")
    if raw.get("peft_type") != "MISS":
        raise AdapterMismatch(f"{file} describes a PEFT adapter of type {raw.get('peft_type')!r}, not MiSS "
                              "(peft_type 'MISS'): only MiSS adapters can be imported")
    return raw


def miss_config_from_peft(raw: dict[str, Any], source: Path) -> MissConfig:
    """The miss_ds config equivalent to a PEFT MiSS config dict; refuses PEFT options miss_ds lacks."""
    unsupported = {"layers_to_transform": None, "layers_pattern": None, "bias": "none"}
    for field, default in unsupported.items():
        if raw.get(field, default) not in (default, []):
            raise AdapterMismatch(f"{source}: {field}={raw[field]!r} is not supported by miss_ds (needs {default!r})")
    if raw.get("target_modules") is None:
        raise AdapterMismatch(f"{source} has no target_modules: name the adapted modules explicitly")
    init = raw.get("init_weights", True)
    if isinstance(init, bool):
        mode = "miss"  # True (zeros) and False (random) differ only in how PEFT initialises D
    elif init in ("mini", "bat"):
        mode = init
    else:
        raise AdapterMismatch(f"{source}: init_weights={init!r} is not a MiSS variant (true, 'mini' or 'bat')")
    # PEFT ignores dropout in bat mode (bat rewrites the weight); miss_ds rejects it there.
    dropout = 0.0 if mode == "bat" else float(raw.get("miss_dropout", 0.0))
    return MissConfig(r=int(raw["r"]), mode=mode, mini_r=int(raw.get("mini_r", 1)), init_weights=True,
                      dropout=dropout, target_modules=raw["target_modules"], exclude_modules=raw.get("exclude_modules"),
                      modules_to_save=list(raw.get("modules_to_save") or []))


def _read_peft_tensors(path: Path, config: MissConfig) -> dict[str, torch.Tensor]:
    weights = _peft_weights(path)
    state = (load_file(str(weights)) if weights.name == PEFT_WEIGHTS
             else torch.load(weights, map_location="cpu", weights_only=True))
    tensors = {}
    for key, tensor in state.items():
        name = key[len(PEFT_PREFIX):]
        if not key.startswith(PEFT_PREFIX) or not _held(name, config):
            raise AdapterMismatch(f"{path}: '{key}' is neither a MiSS block ('{PEFT_PREFIX}<module>.{D_NAME}') "
                                  f"nor a parameter of modules_to_save={config.modules_to_save}")
        if is_d_key(name):
            _check_d_shape(key, tuple(tensor.shape), config, path)
        tensors[name] = tensor.to(torch.float32)
    if not any(is_d_key(name) for name in tensors):
        raise AdapterMismatch(f"{path} holds no MiSS blocks")
    return tensors


def _held(name: str, config: MissConfig) -> bool:
    """Whether a PEFT MiSS adapter holds tensor ``name``: a MiSS block, or a parameter of ``modules_to_save``."""
    return is_d_key(name) or config.saves(name)


def _check_d_shape(key: str, shape: tuple[int, ...], config: MissConfig, path: Path) -> None:
    r = config.r
    ok = {"miss": len(shape) == 2 and shape[0] == r,
          "mini": shape == (r, config.mini_r),
          "bat": len(shape) == 3 and shape[1:] == (r, r)}[config.mode]
    if not ok:
        raise AdapterMismatch(f"{path}: '{key}' has shape {list(shape)}, which mode={config.mode!r} with r={r}"
                              f"{f', mini_r={config.mini_r}' if config.mode == 'mini' else ''} cannot have")
