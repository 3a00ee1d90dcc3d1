"""Start a run from an existing adapter (``init_adapter``): a PEFT MiSS adapter (safetensors or PEFT's older
``.bin``), or a miss_ds adapter or training checkpoint (its files checked against the checkpoint's sha256,
``checkpoint_files.adapter_dir``), checked against the run's base."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from .. import adapter_io, fingerprint
from ..atomic import CheckpointError
from ..checkpoint_files import adapter_dir
from ..layers import D_NAME
from ..run_config import ConfigError
from .output import read_base_fingerprint
from .peft import read_peft_adapter, read_peft_config
from .source import is_peft_adapter

logger = logging.getLogger(__name__)


def check_init_adapter(path: Path | str) -> None:
    """Refuse an ``init_adapter`` that cannot be read whole (not an adapter, or a checkpoint whose adapter files do
    not match their sha256) with a ConfigError naming it: the trainer calls it before any model memory is spent."""
    source = Path(path)
    try:
        if is_peft_adapter(source):
            read_peft_config(source)
        else:
            adapter_dir(source)
    except (CheckpointError, FileNotFoundError, adapter_io.AdapterMismatch) as exc:
        raise ConfigError(f"init_adapter={path}: {exc}") from None


def load_init_adapter(model: nn.Module, path: Path | str) -> None:
    """Set D (and modules_to_save) of a built model from an existing adapter (``init_adapter``): a PEFT MiSS adapter
    or a miss_ds adapter or training checkpoint, checked against the model's base. An adapter that does not fit
    (another base's shapes, other targets, r or mode) is a ConfigError naming it."""
    try:
        _load(model, Path(path))
    except adapter_io.AdapterMismatch as exc:
        raise ConfigError(f"init_adapter={path}: {exc}") from None


def _load(model: nn.Module, source: Path) -> None:
    if is_peft_adapter(source):
        _, full = read_peft_adapter(source)
        recorded = read_base_fingerprint(source)  # a miss-ds-convert export records it; PEFT's own adapters do not
        if recorded is not None:
            fingerprint.check(recorded, lambda positions: fingerprint.read_model(model, positions), str(source),
                              "this run's base", strict=False)
    else:
        directory = adapter_dir(source)
        meta, full = adapter_io.read_full_adapter(directory)
        adapter_io.check_base(meta, model, str(directory))
        # Starting from an adapter of another base can be meant (a new version of the base): warned, not refused.
        fingerprint.check(meta.get("base_fingerprint"), lambda positions: fingerprint.read_model(model, positions),
                          str(directory), "this run's base", strict=False)
    _check_trains_what_it_loads(model, full, source)
    adapter_io.load_full_adapter_into(model, full, str(source))
    logger.info("init_adapter: D of %d layers%s from %s", sum(key.endswith(D_NAME) for key in full),
                "".join(f", {key}" for key in full if not key.endswith(D_NAME)), source)


def _check_trains_what_it_loads(model: nn.Module, full: dict[str, torch.Tensor], source: Path) -> None:
    """Refuse an adapter whose trained modules (``modules_to_save``) this run would hold frozen: they would shape
    every step, yet its checkpoints would not save them (an export would carry the base's instead)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    frozen = [key for key in full if not key.endswith(D_NAME) and key in params and not params[key].requires_grad]
    if frozen:
        raise ConfigError(f"init_adapter={source} holds trained {frozen[:3]}, which this run's miss.modules_to_save "
                          "does not train: its checkpoints would not save them. Add their modules to "
                          "miss.modules_to_save, or start from an adapter without them")
