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

``miss_ds.train.checkpoint`` writes and restores it; the conversion tools, ``init_adapter`` loading and the trainer's
preflight read it through the functions here.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from .adapter_io import ADAPTER_CONFIG
from .atomic import MANIFEST, verify

ADAPTER_DIR, OPTIMIZER_DIR, RNG_DIR, STATE_FILE = "adapter", "optimizer", "rng", "trainer_state.json"


def rng_file(checkpoint: Path, rank: int) -> Path:
    return checkpoint / RNG_DIR / f"rank{rank:05d}.pt"


def read_state(checkpoint: Path | str) -> dict[str, Any]:
    """The ``trainer_state.json`` of a training checkpoint."""
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())


def run_config_of(adapter: Path | str) -> Optional[dict[str, Any]]:
    """The run config recorded with the adapter directory ``adapter`` when it sits in a training checkpoint."""
    state = Path(adapter).parent / STATE_FILE
    return read_state(state.parent).get("config") if state.is_file() else None


def adapter_dir(path: Path | str) -> Path:
    """The adapter directory of ``path``: ``path/adapter`` for a training checkpoint, else ``path`` itself.

    A checkpoint with a manifest has its file sizes verified first, so a truncated save is named, not misread.
    """
    path = Path(path)
    inner = path / ADAPTER_DIR
    if (inner / ADAPTER_CONFIG).is_file():
        if (path / MANIFEST).is_file():
            verify(path, full=False)
        return inner
    if (path / ADAPTER_CONFIG).is_file():
        return path
    raise FileNotFoundError(f"{path} is neither a miss_ds adapter directory ({ADAPTER_CONFIG}) nor a training "
                            f"checkpoint with {ADAPTER_DIR}/{ADAPTER_CONFIG}")
