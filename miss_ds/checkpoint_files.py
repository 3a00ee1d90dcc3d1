"""What is where in a training checkpoint directory: the one owner of its names.

    step_00000100/
      adapter/               the adapter: D's fp32 masters per TP rank, modules_to_save (see miss_ds.adapter_io)
      optimizer/exp_avg/     Adam's first and second moments of the same tensors, in the adapter's layout
      optimizer/exp_avg_sq/
      rng/rank00000.pt       each rank's RNG states
      trainer_state.json     the trainer's progress ("train"), the data position ("data"), the LR schedule
                             ("scheduler"), Adam's step count, the layout that wrote it (tp_size, world_size) and the
                             run config
      manifest.json          every file's size and sha256 (miss_ds.atomic)

``miss_ds.train.checkpoint`` writes and restores it; the trainer's resume check, the conversion tools, ``init_adapter``
loading and the inference tools' model sources (``miss_ds.infer.source``) read it through the names here.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from .adapter_io import ADAPTER_CONFIG
from .atomic import MANIFEST, CheckpointError, verify

ADAPTER_DIR, OPTIMIZER_DIR, RNG_DIR, STATE_FILE = "adapter", "optimizer", "rng", "trainer_state.json"
#: Where a run on a random base keeps that base, beside ``checkpoints/`` in its output_dir (``miss_ds.random_base``).
BASE_DIR = "base"
#: Where a run keeps its checkpoints in its output_dir.
CHECKPOINTS_DIR = "checkpoints"


def rng_file(checkpoint: Path, rank: int) -> Path:
    return checkpoint / RNG_DIR / f"rank{rank:05d}.pt"


def read_state(checkpoint: Path | str) -> dict[str, Any]:
    """The ``trainer_state.json`` of a training checkpoint; CheckpointError naming it if it is unreadable."""
    file = Path(checkpoint) / STATE_FILE
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file} is unreadable ({exc}): not a complete training checkpoint") from None


def run_config_of(adapter: Path | str) -> Optional[dict[str, Any]]:
    """The run config recorded with the adapter directory ``adapter`` when it sits in a training checkpoint."""
    state = Path(adapter).parent / STATE_FILE
    return read_state(state.parent).get("config") if state.is_file() else None


def adapter_dir(path: Path | str) -> Path:
    """The adapter directory of ``path``: ``path/adapter`` for a training checkpoint, else ``path`` itself.

    The adapter of a training checkpoint (given as the checkpoint or as its ``adapter/``) is read only once its files
    and ``trainer_state.json`` match the manifest's sha256 (CheckpointError naming the file otherwise): a flipped byte
    keeps the size, and D would be loaded wrong without a word.
    """
    path = Path(path)
    inner = path / ADAPTER_DIR
    if (inner / ADAPTER_CONFIG).is_file():
        _verify_adapter(path)
        return inner
    if (path / ADAPTER_CONFIG).is_file():
        if path.name == ADAPTER_DIR:
            _verify_adapter(path.parent)
        return path
    raise FileNotFoundError(f"{path} is neither a miss_ds adapter directory ({ADAPTER_CONFIG}) nor a training "
                            f"checkpoint with {ADAPTER_DIR}/{ADAPTER_CONFIG}")


def _is_training_checkpoint(path: Path) -> bool:
    """Whether ``path`` was written as a training checkpoint (it has a manifest or a trainer state)."""
    return (path / MANIFEST).is_file() or (path / STATE_FILE).is_file()


def _verify_adapter(checkpoint: Path) -> None:
    """Check the sha256 of what an adapter reader reads in ``checkpoint``: the adapter files and the trainer state
    (the run config). A directory with neither manifest nor trainer state is a bare adapter copy: nothing to check."""
    if not _is_training_checkpoint(checkpoint):
        return
    verify(checkpoint, full=True, only=[ADAPTER_DIR, STATE_FILE])
