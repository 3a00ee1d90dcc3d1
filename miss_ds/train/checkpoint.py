"""A training checkpoint, gathered from and restored into the trainer's components (the layout of its directory:
``miss_ds.checkpoint_files``).

Everything is stored at full (TP-independent) shapes, so a checkpoint resumes on any layout: more or fewer
data-parallel ranks, another TP size, both. D is small, so gathering its moments at save and re-splitting them at
load costs little.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional, Protocol

import torch
import torch.distributed as dist

from .. import adapter_io, ds_compat, fingerprint
from ..config import MissConfig
from ..distributed import ParallelLayout
from ..atomic import CheckpointError, CheckpointManager, read_manifest, rng_state, set_rng_state, step_dir_name
from ..checkpoint_files import ADAPTER_DIR, OPTIMIZER_DIR, RNG_DIR, STATE_FILE, read_state, rng_file
from ..run_config import ConfigError
from .schedule import schedule_change
from .state import TrainState

logger = logging.getLogger(__name__)


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TrainCheckpoint:
    """Saves and restores one run's checkpoints under ``root``; every rank makes one and calls it together.

    Components: the DeepSpeed ``engine`` (D, its fp32 masters and Adam state), the LR ``scheduler``, the ``train``
    state and the ``data`` iterator (``state_dict``/``load_state_dict``), and each rank's RNG (restored when the
    rank count is the same; it only drives dropout). ``run_config`` (a plain dict) is stored for the record and for
    the checks of a resume (another layout, another base, another LR schedule). Adam's state is created at once
    (``ds_compat.ensure_optimizer_state``) so that a checkpoint of step 0 has it too. The base's fingerprint is taken
    once (collective over TP) and stored with every adapter; a resume checks it first (:func:`check_resumed_base`).

    A resume, in the trainer's order: :func:`find_checkpoint` (rank 0, every file's sha256) and
    ``preflight.check_resume_matches`` (the recorded config against this one) before the model is built;
    :func:`check_resumed_base` once it is materialised, before its random base is saved; then :meth:`resume`.
    """

    def __init__(self, root: Path, keep_last: Optional[int], layout: ParallelLayout, *, engine: Any, scheduler: Any,
                 miss: MissConfig, train: TrainState, data: Stateful, run_config: dict[str, Any]) -> None:
        self.layout, self.engine, self.scheduler, self.miss = layout, engine, scheduler, miss
        self.train, self.data, self.run_config = train, data, run_config
        self.manager = CheckpointManager(root, keep_last, layout.rank, layout.world, dist.barrier, layout.tp)
        self.base_fingerprint = fingerprint.of_model(engine.module)
        ds_compat.ensure_optimizer_state(engine)

    # ----------------------------------------------------------------- save
    def save(self) -> Path:
        """A complete checkpoint of the current step (atomic: it is on disk whole, or not at all)."""
        meta = {"tp_size": self.layout.tp, "world_size": self.layout.world, "step": self.train.step}
        return self.manager.save(self.train.step, self._write, meta)

    def _write(self, directory: Path) -> None:
        # Collective calls first (gathering ZeRO partitions), in the same order on every rank.
        params = adapter_io.adapter_parameters(self.engine.module, self.miss)
        tensors: dict[str, dict[str, torch.Tensor]] = {ADAPTER_DIR: {}, **{m: {} for m in ds_compat.ADAM_MOMENTS}}
        for name, param in params.items():
            tensors[ADAPTER_DIR][name] = ds_compat.get_master(self.engine, param)
            for moment, value in ds_compat.get_moments(self.engine, param).items():
                tensors[moment][name] = value
        for part, values in tensors.items():
            target = directory / (part if part == ADAPTER_DIR else f"{OPTIMIZER_DIR}/{part}")
            target.mkdir(parents=True, exist_ok=True)
            if self.layout.dp_rank == 0:
                adapter_io.write_adapter_shard(target, values, self.layout.tp_rank, self.layout.tp)
            if self.layout.is_main:
                adapter_io.write_adapter_config(target, self.miss, self.engine.module, self.layout.tp,
                                                self.base_fingerprint)
        (directory / RNG_DIR).mkdir(exist_ok=True)
        torch.save(rng_state(), rng_file(directory, self.layout.rank))
        if self.layout.is_main:
            state = {"train": self.train.state_dict(), "data": self.data.state_dict(),
                     "scheduler": self.scheduler.state_dict(), "adam_step": ds_compat.adam_step(self.engine),
                     "tp_size": self.layout.tp, "world_size": self.layout.world, "config": self.run_config}
            (directory / STATE_FILE).write_text(json.dumps(state, indent=1))

    # ----------------------------------------------------------------- resume
    def resume(self, path: Path) -> None:
        """Restore every component from the checkpoint at ``path``, on this run's layout whatever layout wrote it.
        ``path`` comes from :func:`find_checkpoint` and has passed :func:`check_resumed_base`."""
        state, model = read_state(path), self.engine.module
        _, adapter = adapter_io.read_full_adapter(path / ADAPTER_DIR)
        masters = adapter_io.local_parts(model, adapter, str(path))
        moments = {m: adapter_io.local_parts(model, adapter_io.read_full_adapter(path / OPTIMIZER_DIR / m)[1],
                                             str(path)) for m in ds_compat.ADAM_MOMENTS}
        for name, param in adapter_io.adapter_parameters(model, self.miss).items():
            ds_compat.set_master(self.engine, param, masters[name])
            ds_compat.set_moments(self.engine, param, {m: moments[m][name] for m in ds_compat.ADAM_MOMENTS})
        ds_compat.set_adam_step(self.engine, state["adam_step"])
        self._resume_schedule(state)
        if state["world_size"] == self.layout.world:
            set_rng_state(torch.load(rng_file(path, self.layout.rank), weights_only=False))
        self.data.load_state_dict(state["data"])
        self.train.load_state_dict(state["train"])
        if self.layout.is_main:
            moved = (state["tp_size"], state["world_size"]) != (self.layout.tp, self.layout.world)
            logger.info("resumed from %s at step %d%s", path, self.train.step,
                        f" (written by tp_size={state['tp_size']} on {state['world_size']} ranks)" if moved else "")

    def _resume_schedule(self, state: dict[str, Any]) -> None:
        """Take the schedule's step count from the checkpoint and keep this run's peak rate (``train.lr``: the
        schedule's saved state would bring back the checkpoint's); rank 0 warns when the schedule changes."""
        peak = list(self.scheduler.base_lrs)
        self.scheduler.load_state_dict(state["scheduler"])
        self.scheduler.base_lrs = peak
        for group, lr in zip(self.engine.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr  # the schedule's state alone does not move the optimizer's rate
        change = schedule_change(state.get("config", {}).get("train", {}), self.run_config["train"],
                                 state["scheduler"]["last_epoch"])
        if change is not None and self.layout.is_main:
            logger.warning("resuming at step %d: %s", state["train"]["step"], change)


def find_checkpoint(root: Path, resume: Optional[str]) -> Optional[Path]:
    """The checkpoint ``resume`` names (``auto``: the newest under ``root`` that verifies, else None), every file's
    sha256 checked (sizes alone miss a flipped byte). Bad input, so a ConfigError that names the path and the complete
    checkpoints beside it; so is ``auto`` when checkpoints exist but none verifies (starting over would drop the run's
    metrics). Rank 0 calls it, before any model memory is spent."""
    manager = CheckpointManager(root)
    try:
        path = manager.resolve(resume, full=True)
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from None
    found = manager.checkpoints()
    if path is None and resume == "auto" and found:
        raise ConfigError(f"--resume auto: none of the {len(found)} checkpoints in {root} verifies (the warnings above "
                          "say why), and starting over would drop this run's metrics. Resume one that you repaired by "
                          "its path, or start over with --overwrite instead of --resume (the run is moved aside, not "
                          "deleted)")
    return path


def check_no_newer_checkpoints(root: Path, path: Path, step: int) -> None:
    """Resuming checkpoint ``path`` (of ``step``) must not overwrite this run's later checkpoints under ``root``: the
    resumed run would save over them as it passes their steps (and drop their metrics lines). ``--resume auto``
    takes the newest that verifies, so only what is newer and does not verify is left behind it; an older checkpoint
    named by its path is refused while newer ones are there (rank 0, before anything is written)."""
    newer = [p.name for p in CheckpointManager(root).checkpoints()
             if p.name > step_dir_name(step) and p.resolve() != path.resolve()]
    if newer:
        raise ConfigError(f"--resume {path} (step {step}): {root} holds later checkpoints ({', '.join(newer)}) that "
                          "this run would overwrite as it trains past them, dropping their metrics. Resume the newest "
                          "(--resume auto), move the later ones out of the way first, or continue from this "
                          f"checkpoint in another output_dir (--set output_dir=... --resume {path})")


def checkpoint_bytes(path: Path) -> int:
    """Bytes of the files of checkpoint ``path`` (rank 0 reads them all: :func:`find_checkpoint` hashes them)."""
    return sum(entry["size"] for entry in read_manifest(path)["files"])


def check_resumed_base(path: Path, model: Any) -> None:
    """The checkpoint at ``path`` was trained on the base of ``model`` (materialised, before anything is saved): the
    same base config and the same fingerprint, else a ConfigError naming what differs and what to do. Every rank
    calls it (the fingerprint is read over the TP group)."""
    meta = adapter_io.read_adapter_config(path / ADAPTER_DIR)
    try:
        adapter_io.check_base(meta, model, str(path))
        fingerprint.check(meta.get("base_fingerprint"), lambda positions: fingerprint.read_model(model, positions),
                          str(path), "this run's base")
    except ValueError as exc:  # OtherBaseError is one
        raise ConfigError(f"cannot resume: {exc}. Resume with the base and model settings of the run that wrote it "
                          f"(its {STATE_FILE} records them), or start a new run in another output_dir") from None
