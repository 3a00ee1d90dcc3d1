"""Checks of a run against the job and the disk, done before any data is read or any weight is loaded.

What needs only the config file is checked by ``miss_ds.run_config.validate``; what needs the model's shapes (r, mode,
TP shards) by building the model on the meta device (``loading.model_on_meta``). This module checks what needs the
job's size or the output directory: the TP size against the attention heads, the output directory (writable, and not
holding another run unless the user says so), and a resumed checkpoint's adapter settings against the config's.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Optional

from ..data.batch import check_resumable
from ..run_config import ConfigError, RunConfig, to_dict
from .atomic import CheckpointManager
from .checkpoint import STATE_FILE, check_base_layout

#: Files, and folders when not empty, whose presence means an output directory holds a run.
RUN_FILES = ("metrics.jsonl", "summary.json", "config.json", "checkpoints", "tensorboard")
#: MissConfig fields that shape D or decide which tensors the adapter holds: a resume must keep them.
ADAPTER_FIELDS = ("r", "mode", "mini_r", "target_modules", "exclude_modules", "modules_to_save", "adapter_dtype")


def check_tp_fits_heads(model_config: Any, tp: int, world: int) -> None:
    """Attention is split by heads: the TP size must divide the query heads and the key/value heads."""
    heads = model_config.num_attention_heads
    kv = getattr(model_config, "num_key_value_heads", None) or heads
    if heads % tp == 0 and kv % tp == 0:
        return
    fits = [t for t in range(1, world + 1) if world % t == 0 and heads % t == 0 and kv % t == 0]
    raise ConfigError(f"parallel.tp_size={tp} does not divide the model's {heads} attention heads and {kv} key/value "
                      f"heads: each TP rank needs whole heads. Use parallel.tp_size in {fits} (on {world} ranks)")


def prepare_output_dir(cfg: RunConfig, resume: Optional[str], overwrite: bool) -> Optional[Path]:
    """Make sure ``output_dir`` can take this run (rank 0): create it, check that it is writable, and refuse one that
    holds another run unless the run resumes (``--resume``) or ``overwrite`` is set, in which case the old run is
    moved aside (returned), never deleted."""
    out = Path(cfg.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"output_dir={out} cannot be written ({exc.strerror or exc}): choose a writable directory "
                          "with --set output_dir=...") from None
    found = sorted(name for name in RUN_FILES
                   if (out / name).is_file() or ((out / name).is_dir() and any((out / name).iterdir())))
    if not found or resume is not None:
        return None
    if not overwrite:
        raise ConfigError(f"output_dir={out} already holds a run ({', '.join(found)}): continue it with --resume auto, "
                          "start over with --overwrite (the old run is moved aside, not deleted), or choose another "
                          "output_dir")
    aside = out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    out.rename(aside)
    out.mkdir()
    return aside


def check_resume_matches(cfg: RunConfig, resume: Optional[str], tp: int, dp: int) -> None:
    """A resumed checkpoint must hold the adapter this config builds (same r, mode, targets...), fit this run's base
    on this layout, and stop where this layout's micro-steps can start: checked on the checkpoint's recorded state
    (rank 0, sizes-only verification; the full check comes with the resume)."""
    if resume is None:
        return
    path = CheckpointManager(Path(cfg.output_dir) / "checkpoints").resolve(resume, full=False)
    if path is None or not (path / STATE_FILE).is_file():
        return
    state = json.loads((path / STATE_FILE).read_text())
    try:
        check_base_layout(state, tp, to_dict(cfg), path)
        check_resumable(state["data"], cfg.train.micro_batch_size * dp)
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}" if str(path) not in str(exc) else str(exc)) from None
    saved = state.get("config", {}).get("miss", {})
    ours = cfg.miss.to_dict()
    changed = [f"miss.{k}: checkpoint {saved[k]!r}, config {ours[k]!r}" for k in ADAPTER_FIELDS
               if k in saved and _normal(saved[k]) != _normal(ours[k])]
    if changed:
        raise ConfigError(f"cannot resume {path}: it was trained with other adapter settings ({'; '.join(changed)}). "
                          "Resume with the checkpoint's settings, or start a new run in another output_dir")


def _normal(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
