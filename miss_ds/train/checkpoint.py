"""A training checkpoint's on-disk layout, gathered from and restored into the trainer's components.

One complete checkpoint (made atomic by :mod:`miss_ds.train.atomic`)::

    step_00000100/
      engine/              DeepSpeed's optimizer and LR-scheduler state, one file per rank (D itself excluded)
      adapter/             the adapter: D (fp32 masters) per TP rank, modules_to_save (see miss_ds.adapter_io)
      rng/rank00000.pt     each rank's RNG states
      trainer_state.json   the trainer's progress ("train"), the data position ("data"), the layout that wrote
                           it (tp_size, world_size) and the run config
      manifest.json        every file's size and sha256

This module is the only one that knows these names: the trainer saves and resumes through :class:`TrainCheckpoint`,
the conversion tools find the adapter through :meth:`TrainCheckpoint.adapter_dir`.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional, Protocol

import torch
import torch.distributed as dist

from .. import adapter_io
from ..config import MissConfig
from ..distributed import ParallelLayout
from .atomic import MANIFEST, CheckpointError, CheckpointManager, rng_state, set_rng_state, verify
from .state import TrainState

logger = logging.getLogger(__name__)

ENGINE_DIR, ADAPTER_DIR, RNG_DIR, STATE_FILE = "engine", "adapter", "rng", "trainer_state.json"
#: DeepSpeed's tag inside ``engine/`` (one per checkpoint directory, so no "latest" file is needed).
ENGINE_TAG = "state"


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TrainCheckpoint:
    """Saves and restores one run's checkpoints under ``root``; every rank makes one and calls it together.

    Components: the DeepSpeed ``engine`` (D, its optimizer and LR scheduler), the ``train`` state and the ``data``
    iterator (``state_dict``/``load_state_dict``), and each rank's RNG. ``run_config`` (a plain dict) is stored for
    the record and for the checks of a resume on another layout.
    """

    def __init__(self, root: Path, keep_last: int, layout: ParallelLayout, *, engine: Any, scheduler: Any,
                 miss: MissConfig, train: TrainState, data: Stateful, run_config: dict[str, Any]) -> None:
        self.layout, self.engine, self.scheduler, self.miss = layout, engine, scheduler, miss
        self.train, self.data, self.run_config = train, data, run_config
        self.manager = CheckpointManager(root, keep_last, layout.rank, layout.world, dist.barrier, layout.tp)

    # ----------------------------------------------------------------- save
    def save(self) -> Path:
        """A complete checkpoint of the current step (atomic: it is on disk whole, or not at all)."""
        meta = {"tp_size": self.layout.tp, "world_size": self.layout.world, "step": self.train.step}
        return self.manager.save(self.train.step, self._write, meta)

    def _write(self, directory: Path) -> None:
        from deepspeed.utils import safe_get_full_fp32_param

        # Collective calls first, in the same order on every rank.
        self.engine.save_checkpoint(str(directory / ENGINE_DIR), tag=ENGINE_TAG, save_latest=False,
                                    exclude_frozen_parameters=True)
        masters = {}
        for name, param in adapter_io.adapter_parameters(self.engine.module, self.miss).items():
            full = safe_get_full_fp32_param(param)  # the fp32 master (None when DeepSpeed keeps none)
            masters[name] = param if full is None else full
        adapter = directory / ADAPTER_DIR
        adapter.mkdir(parents=True, exist_ok=True)
        if self.layout.dp_rank == 0:
            adapter_io.write_adapter_shard(adapter, masters, self.layout.tp_rank, self.layout.tp)
        rng = directory / RNG_DIR
        rng.mkdir(exist_ok=True)
        torch.save(rng_state(), rng / f"rank{self.layout.rank:05d}.pt")
        if self.layout.is_main:
            adapter_io.write_adapter_config(adapter, self.miss, self.engine.module, self.layout.tp)
            state = {"train": self.train.state_dict(), "data": self.data.state_dict(), "tp_size": self.layout.tp,
                     "world_size": self.layout.world, "config": self.run_config}
            (directory / STATE_FILE).write_text(json.dumps(state, indent=1))

    # ----------------------------------------------------------------- resume
    def resume(self, resume: Optional[str]) -> Optional[Path]:
        """Restore every component from the checkpoint ``resume`` names (``auto``: the newest that verifies);
        returns its path, or None when there is nothing to resume from."""
        path = self._resolve(resume)
        if path is None:
            if resume not in (None, "auto"):
                raise FileNotFoundError(f"--resume {resume}: no such checkpoint")
            return None
        state = self.read_state(path)
        # Whatever the layout: a checkpoint of another base model is refused by name, not by a shape error.
        adapter_io.check_base(adapter_io.read_adapter_config(path / ADAPTER_DIR), self.engine.module, str(path))
        if state["tp_size"] == self.layout.tp and state["world_size"] == self.layout.world:
            self.engine.load_checkpoint(str(path / ENGINE_DIR), tag=ENGINE_TAG, load_module_strict=False,
                                        load_optimizer_states=True, load_lr_scheduler_states=True)
            set_rng_state(torch.load(path / RNG_DIR / f"rank{self.layout.rank:05d}.pt", weights_only=False))
        else:
            self._load_on_another_layout(path, state)
        self.data.load_state_dict(state["data"])
        self.train.load_state_dict(state["train"])
        if self.layout.is_main:
            logger.info("resumed from %s at step %d", path, self.train.step)
        return path

    def _load_on_another_layout(self, path: Path, state: dict[str, Any]) -> None:
        """D carries over (the adapter is independent of the TP layout); the optimizer state starts afresh."""
        if state["tp_size"] != self.layout.tp and (_random_base(state.get("config", {}).get("model", {}))
                                                   or _random_base(self.run_config["model"])):
            raise ValueError(
                f"cannot resume {path} (written with tp_size={state['tp_size']}) with parallel.tp_size="
                f"{self.layout.tp}: the base model has random weights (model.path null or model.random_init), drawn "
                "per tensor-parallel shard, so another tp_size builds another base and D would not fit it. Resume "
                f"with parallel.tp_size={state['tp_size']}, or train on a base checkpoint (model.path)")
        _, full = adapter_io.read_full_adapter(path / ADAPTER_DIR)
        adapter_io.load_full_adapter_into(self.engine.module, full, str(path))
        self.scheduler.last_epoch = state["train"]["step"]
        logger.warning("resuming %s written by tp_size=%d on %d ranks with tp_size=%d on %d ranks: D is loaded, "
                       "optimizer state restarts", path, state["tp_size"], state["world_size"], self.layout.tp,
                       self.layout.world)

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

    # ----------------------------------------------------------------- reading the layout
    @staticmethod
    def read_state(path: Path) -> dict[str, Any]:
        """The ``trainer_state.json`` of checkpoint ``path``."""
        return json.loads((Path(path) / STATE_FILE).read_text())

    @staticmethod
    def adapter_dir(path: Path | str) -> Path:
        """The adapter directory of ``path``: ``path/adapter`` for a training checkpoint, else ``path`` itself.

        A checkpoint with a manifest has its file sizes verified first, so a truncated save is named, not misread.
        """
        path = Path(path)
        inner = path / ADAPTER_DIR
        if (inner / adapter_io.ADAPTER_CONFIG).is_file():
            if (path / MANIFEST).is_file():
                verify(path, full=False)
            return inner
        if (path / adapter_io.ADAPTER_CONFIG).is_file():
            return path
        raise FileNotFoundError(f"{path} is neither a miss_ds adapter directory ({adapter_io.ADAPTER_CONFIG}) nor a "
                                f"training checkpoint with {ADAPTER_DIR}/{adapter_io.ADAPTER_CONFIG}")


def _random_base(model: dict[str, Any]) -> bool:
    """Whether a run config's ``model`` section builds random base weights (they depend on the TP layout)."""
    return bool(model) and (model.get("path") is None or bool(model.get("random_init")))
