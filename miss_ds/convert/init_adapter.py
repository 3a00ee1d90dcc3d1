"""Start a run from an existing adapter (``init_adapter``): a PEFT MiSS adapter, or a miss_ds adapter or training
checkpoint (its files checked against the checkpoint's sha256, ``checkpoint_files.adapter_dir``), checked against the
run's base."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from .. import adapter_io, fingerprint
from ..atomic import CheckpointError
from ..checkpoint_files import adapter_dir
from ..run_config import ConfigError
from .peft import PEFT_WEIGHTS, read_peft_adapter


def check_init_adapter(path: Path | str) -> None:
    """Refuse an ``init_adapter`` that cannot be read whole (not an adapter, or a checkpoint whose adapter files do
    not match their sha256) with a ConfigError naming it: the trainer calls it before any model memory is spent."""
    source = Path(path)
    if (source / PEFT_WEIGHTS).is_file():
        return
    try:
        adapter_dir(source)
    except (CheckpointError, FileNotFoundError) as exc:
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
    if (source / PEFT_WEIGHTS).is_file():
        _, full = read_peft_adapter(source)
    else:
        directory = adapter_dir(source)
        meta, full = adapter_io.read_full_adapter(directory)
        adapter_io.check_base(meta, model, str(directory))
        # Starting from an adapter of another base can be meant (a new version of the base): warned, not refused.
        fingerprint.check(meta.get("base_fingerprint"), lambda positions: fingerprint.read_model(model, positions),
                          str(directory), "this run's base", strict=False)
    adapter_io.load_full_adapter_into(model, full, str(source))
