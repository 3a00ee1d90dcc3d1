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
from ..atomic import CheckpointError, CheckpointManager, rng_state, set_rng_state
from ..checkpoint_files import ADAPTER_DIR, OPTIMIZER_DIR, RNG_DIR, STATE_FILE, read_state, rng_file
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
    the checks of a resume on another layout. Adam's state is created at once (``ds_compat.ensure_optimizer_state``)
    so that a checkpoint of step 0 has it too. The base's fingerprint is taken once (collective over TP), stored
    with every adapter and checked on resume.
    """

    def __init__(self, root: Path, keep_last: int, layout: ParallelLayout, *, engine: Any, scheduler: Any,
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
    def resume(self, resume: Optional[str]) -> Optional[Path]:
        """Restore every component from the checkpoint ``resume`` names (``auto``: the newest that verifies), on
        this run's layout whatever layout wrote it; returns its path, or None when there is nothing to resume from."""
        path = self._resolve(resume)
        if path is None:
            if resume not in (None, "auto"):
                raise FileNotFoundError(f"--resume {resume}: no such checkpoint")
            return None
        state, model = read_state(path), self.engine.module
        # Whatever the layout: a checkpoint of another base model is refused by name, not by a shape error.
        meta, adapter = adapter_io.read_full_adapter(path / ADAPTER_DIR)
        adapter_io.check_base(meta, model, str(path))
        check_base_layout(state, self.layout.tp, self.run_config, path)
        fingerprint.check(meta.get("base_fingerprint"), lambda positions: fingerprint.read_model(model, positions),
                          str(path), "this run's base")
        masters = adapter_io.local_parts(model, adapter, str(path))
        moments = {m: adapter_io.local_parts(model, adapter_io.read_full_adapter(path / OPTIMIZER_DIR / m)[1],
                                             str(path)) for m in ds_compat.ADAM_MOMENTS}
        for name, param in adapter_io.adapter_parameters(model, self.miss).items():
            ds_compat.set_master(self.engine, param, masters[name])
            ds_compat.set_moments(self.engine, param, {m: moments[m][name] for m in ds_compat.ADAM_MOMENTS})
        ds_compat.set_adam_step(self.engine, state["adam_step"])
        self.scheduler.load_state_dict(state["scheduler"])
        for group, lr in zip(self.engine.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr  # the schedule's state alone does not move the optimizer's rate
        if state["world_size"] == self.layout.world:
            set_rng_state(torch.load(rng_file(path, self.layout.rank), weights_only=False))
        self.data.load_state_dict(state["data"])
        self.train.load_state_dict(state["train"])
        if self.layout.is_main:
            moved = (state["tp_size"], state["world_size"]) != (self.layout.tp, self.layout.world)
            logger.info("resumed from %s at step %d%s", path, self.train.step,
                        f" (written by tp_size={state['tp_size']} on {state['world_size']} ranks)" if moved else "")
        return path

    def _resolve(self, resume: Optional[str]) -> Optional[Path]:
        """The checkpoint to resume from. Rank 0 checks every file's sha256 (sizes alone miss a flipped byte;
        ``auto`` then falls back to an older checkpoint) and the other ranks take its answer, so every rank
        loads the same checkpoint and it is hashed once."""
        if resume is None:
            return None
        answer: list[Optional[str]] = [None, None]  # path, error
        failure: Optional[Exception] = None
        if self.layout.is_main:
            try:
                path = self.manager.resolve(resume, full=True)
                answer[0] = None if path is None else str(path)
            except Exception as exc:  # noqa: BLE001 - the other ranks must hear of it, or they wait forever
                failure, answer[1] = exc, str(exc)
        dist.broadcast_object_list(answer, src=0)
        if failure is not None:
            raise failure
        if answer[1] is not None:
            raise CheckpointError(answer[1])
        return None if answer[0] is None else Path(answer[0])


def check_base_layout(state: dict[str, Any], tp: int, run_config: dict[str, Any], path: Path) -> None:
    """A random base (no ``model.path``) is drawn per TP shard: another TP size builds another base, which the
    checkpoint's D does not fit. Refused by name (a checkpoint of a real base resumes on any TP size)."""
    if state["tp_size"] != tp and (_random_base(state.get("config", {}).get("model", {}))
                                   or _random_base(run_config["model"])):
        raise ValueError(
            f"cannot resume {path} (written with tp_size={state['tp_size']}) with parallel.tp_size={tp}: the base "
            "model has random weights (model.path null or model.random_init), drawn per tensor-parallel shard, so "
            f"another tp_size builds another base and D would not fit it. Resume with parallel.tp_size="
            f"{state['tp_size']}, or train on a base checkpoint (model.path)")


def _random_base(model: dict[str, Any]) -> bool:
    """Whether a run config's ``model`` section builds random base weights (they depend on the TP layout)."""
    return bool(model) and (model.get("path") is None or bool(model.get("random_init")))
