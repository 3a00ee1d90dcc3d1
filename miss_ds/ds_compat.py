"""Every DeepSpeed internal miss_ds relies on, in one place, with the DeepSpeed versions it was checked against.

Public DeepSpeed APIs (``deepspeed.initialize``, ``deepspeed.comm``, ``safe_get_full_*``, the engine's checkpoint
calls) are used directly where they are needed. What is private (underscored names, undocumented attributes of
DeepSpeed's classes, module-level registries, file and segment names) goes through this module, so that a DeepSpeed
upgrade is checked here and nowhere else. ``setup.py`` bounds DeepSpeed to :data:`CHECKED_VERSIONS`.
"""
from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

logger = logging.getLogger(__name__)

#: DeepSpeed releases whose internals below were read and tested (setup.py's install range).
CHECKED_VERSIONS = (">=0.19.8", "<0.20")
_MIN, _BELOW = (0, 19, 8), (0, 20)


def check_version() -> None:
    """Warn once when the installed DeepSpeed is outside :data:`CHECKED_VERSIONS`."""
    import deepspeed

    found = tuple(int(p) for p in deepspeed.__version__.split("+")[0].split(".")[:3] if p.isdigit())
    if not _MIN <= found < _BELOW:
        logger.warning("DeepSpeed %s is outside the versions miss_ds was checked against (%s): its internals "
                       "(miss_ds/ds_compat.py) may have changed", deepspeed.__version__, ",".join(CHECKED_VERSIONS))


# ----------------------------------------------------------------------------------------------- tensor parallelism
def init_tp_group(tp_size: int) -> Any:
    """Build DeepSpeed's TP x DP mesh (TP groups: ranks ``[k*tp, (k+1)*tp)``) and return this rank's TP group.

    ``deepspeed.initialize`` with ``tensor_parallel.autotp_size`` builds the same mesh later; building it first lets
    the model be split before the engine exists.
    """
    from deepspeed.utils import groups

    groups._init_tp_mesh_device(tensor_model_parallel_size=tp_size)
    return groups.get_tensor_model_parallel_group()


def autotp_meta(model_config: Any, grain: int) -> Any:
    """DeepSpeed's AutoTP shard metadata for a model config, in training mode (uneven and head-aligned splits)."""
    from deepspeed.module_inject.layers import set_autotp_mode
    from deepspeed.module_inject.tp_shard import AutoTPMeta

    set_autotp_mode(training=True)
    return AutoTPMeta.from_model_config(model_config, tp_grain_size=grain)


def autotp_shard_sizes(full: int, tp_size: int, meta: Any, name: str) -> list[int]:
    """How DeepSpeed's AutoTP splits ``full`` features of module ``name`` over ``tp_size`` ranks."""
    from deepspeed.module_inject.tp_shard import get_shard_size_list

    return list(get_shard_size_list(full, tp_size, meta, name))


def mark_tp_split(model: nn.Module) -> None:
    """Tell ``deepspeed.initialize`` that the model is split already, so that it does not split it again."""
    model.ds_autotp_parsed = True


@dataclass(frozen=True)
class AutoTPSplit:
    """Where a DeepSpeed AutoTP layer's weight shard sits: shard sizes in rank order, this rank, the full shape."""

    sizes: tuple[int, ...]
    rank: int
    full_shape: tuple[int, int]
    group: Any


def autotp_split(layer: nn.Module) -> AutoTPSplit:
    """The split of a DeepSpeed ``LinearLayer`` / ``LinearAllreduce`` (attributes its constructor sets)."""
    return AutoTPSplit(tuple(layer._partition_sizes), layer.tp_index, tuple(layer._orig_weight_shape), layer.mp_group)


# ----------------------------------------------------------------------------------------------- ZeRO and optimizer
def full_numel(param: torch.Tensor) -> int:
    """Elements of a parameter, also when ZeRO-3 has partitioned it (then ``numel()`` is 0 on this rank)."""
    return param.ds_numel if hasattr(param, "ds_numel") else param.numel()


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """Shape of a parameter, also when ZeRO-3 has partitioned it."""
    return tuple(getattr(param, "ds_shape", param.shape))


def checks_overflow(optimizer: Any) -> bool:
    """Whether the engine's optimizer skips steps with non-finite gradients itself (ZeRO and bf16 wrappers do;
    the plain torch optimizer of ZeRO-0 in fp32 does not)."""
    return hasattr(optimizer, "overflow")


def step_without_update(engine: Any) -> None:
    """``engine.step()`` taking DeepSpeed's overflow path: gradients clipped and cleared, ``skipped_steps`` counted,
    the LR schedule held, and no parameter update (for optimizers without their own overflow check)."""
    optimizer = engine.optimizer
    step = optimizer.step
    optimizer.overflow, optimizer.step = True, lambda *args, **kwargs: None
    try:
        engine.step()
    finally:
        optimizer.overflow, optimizer.step = False, step


# ----------------------------------------------------------------------------------------------- communication
def tally_comms(record: Callable[[str, int, Any], None]) -> None:
    """Call ``record(op, logged_bytes, group)`` for every collective DeepSpeed's comms logger records.

    The logger records an op's name and size but not its process group: wrapping the function that sizes each logged
    op notes the group, and wrapping ``comms_logger.append`` passes both on. Needs ``comms_logger.enabled``.
    """
    import deepspeed.comm.comm as ds_comm

    msg_size, append = ds_comm.get_msg_size_from_args, ds_comm.comms_logger.append
    last_group: list[Any] = [None]

    def noting_group(func: Callable, *args: Any, **kwargs: Any) -> int:
        last_group[0] = inspect.signature(func).bind_partial(*args, **kwargs).arguments.get("group")
        return msg_size(func, *args, **kwargs)

    def appended(raw_name: str, record_name: str, latency: float, size: int) -> None:
        append(raw_name, record_name, latency, size)
        record(raw_name, size, last_group[0])

    ds_comm.get_msg_size_from_args, ds_comm.comms_logger.append = noting_group, appended


def skip_cpu_shm_op() -> None:
    """Do not build DeepSpeed's shared-memory all-reduce op (a C++ build of about 25 s on the first run).

    A one-process CPU job has nothing to all-reduce, so the build is pure start-up cost. DeepSpeed builds the op
    when its communication backend starts, for every op its ``__compatible_ops__`` registry marks usable.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def cpu_shm_segment(master_addr: Optional[str], master_port: int | str, rank: int | str) -> Path:
    """The /dev/shm segment DeepSpeed's CPU all-reduce maps for one rank (``rank`` may be a glob pattern)."""
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{master_addr}_{master_port}_{rank}"
