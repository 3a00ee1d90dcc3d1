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
    """Where a DeepSpeed AutoTP layer's weight shard sits: per part of the split dimension (one part, or the parts
    of a fused projection) the shard sizes in rank order, this rank, the full shape."""

    parts: tuple[tuple[int, ...], ...]
    rank: int
    full_shape: tuple[int, int]
    group: Any


def autotp_split(layer: nn.Module) -> AutoTPSplit:
    """The split of a DeepSpeed ``LinearLayer`` / ``LinearAllreduce`` / ``SubParamLinearLayer`` (attributes their
    constructors set: ``_partition_sizes``, or per sub-parameter ``_subparam_shard_widths``)."""
    widths = getattr(layer, "_subparam_shard_widths", None)
    parts = (tuple(layer._partition_sizes),) if widths is None else tuple(tuple(w) for w in widths)
    return AutoTPSplit(parts, layer.tp_index, tuple(layer._orig_weight_shape), layer.mp_group)


# ----------------------------------------------------------------------------------------------- ZeRO and optimizer
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


# ----------------------------------------------------------------------------------------------- optimizer state
# A checkpoint that another layout can resume holds, per trainable parameter, its fp32 master and Adam moments at
# the parameter's own (TP-local) shape, and Adam's step count. Where they live depends on DeepSpeed's optimizer:
# ZeRO-1/2 (and BF16_Optimizer) partition them over data-parallel ranks behind ``param._hp_mapping`` (gathered and
# scattered by DeepSpeed's public ``safe_*`` helpers, collectives over the DP group); FP16_UnfusedOptimizer (ZeRO-0
# with bf16 on CPU) keeps an fp32 copy per parameter in ``fp32_groups``; ZeRO-0 in fp32 is a plain torch optimizer
# whose parameters are the model's.
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


def _inner(engine: Any) -> torch.optim.Optimizer:
    """The torch optimizer that holds the state (DeepSpeed's wrappers keep it in ``.optimizer``)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _unfused_master(engine: Any, param: torch.Tensor) -> Optional[torch.Tensor]:
    """FP16_UnfusedOptimizer's fp32 copy of ``param``, else None."""
    for bit16, fp32 in zip(getattr(engine.optimizer, "fp16_groups", ()), getattr(engine.optimizer, "fp32_groups", ())):
        for p, master in zip(bit16, fp32):
            if p is param:
                return master
    return None


def get_master(engine: Any, param: torch.Tensor) -> torch.Tensor:
    """The fp32 master of a trainable parameter (collective over the DP group under ZeRO)."""
    from deepspeed.utils import safe_get_full_fp32_param

    if hasattr(param, "_hp_mapping"):
        return safe_get_full_fp32_param(param)
    master = _unfused_master(engine, param)
    return (param if master is None else master).detach().float()


def set_master(engine: Any, param: torch.Tensor, value: torch.Tensor) -> None:
    """Set a trainable parameter and its fp32 master (the optimizer updates the master, then copies it over)."""
    from deepspeed.utils import safe_set_full_fp32_param

    with torch.no_grad():
        if hasattr(param, "_hp_mapping"):
            safe_set_full_fp32_param(param, value.to(torch.float32))
        else:
            master = _unfused_master(engine, param)
            if master is not None:
                master.copy_(value)
        param.copy_(value)


def ensure_optimizer_state(engine: Any) -> None:
    """Before the first step: create Adam's state now (torch creates it lazily at the first step) so a saved state
    can be written into it and a checkpoint taken before the first step has one, by a step of the inner optimizer
    with zero gradients and learning rate 0 (no parameter moves, the moments stay zero); then set Adam's step count
    to 0. FP16_UnfusedOptimizer (ZeRO-0 under bf16) has already made that state itself, by a step on zero gradients
    at the full learning rate, and left the count at 1: Adam's bias correction would then count a step that never
    was, and the first real update would be 0.74 lr instead of lr (``tests/test_train.py``). (Its one
    weight decay of the trainable weights at the full learning rate is not undone: D starts at zero.)"""
    inner = _inner(engine)
    if not any(inner.state.get(p) for group in inner.param_groups for p in group["params"]):
        saved = [(group["lr"], [p.grad for p in group["params"]]) for group in inner.param_groups]
        for group in inner.param_groups:
            group["lr"] = 0.0
            for p in group["params"]:
                p.grad = torch.zeros_like(p) if p.grad is None else p.grad.zero_()
        inner.step()
        for group, (lr, grads) in zip(inner.param_groups, saved):
            group["lr"] = lr
            for p, grad in zip(group["params"], grads):
                p.grad = grad
    set_adam_step(engine, 0)
    _link_state(engine)


def _link_state(engine: Any) -> None:
    """Point ZeRO's per-parameter views at the (now existing) optimizer state."""
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        link()


def get_moments(engine: Any, param: torch.Tensor) -> dict[str, torch.Tensor]:
    """Adam's moments of a trainable parameter at its own shape, fp32 (collective over the DP group under ZeRO)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    if hasattr(param, "_hp_mapping"):
        _link_state(engine)
        return {key: safe_get_full_optimizer_state(param, key) for key in ADAM_MOMENTS}
    master = _unfused_master(engine, param)
    state = _inner(engine).state[param if master is None else master]
    return {key: state[key].detach().float() for key in ADAM_MOMENTS}


def set_moments(engine: Any, param: torch.Tensor, moments: dict[str, torch.Tensor]) -> None:
    """Write Adam's moments of a trainable parameter (after :func:`ensure_optimizer_state`)."""
    from deepspeed.utils import safe_set_full_optimizer_state

    with torch.no_grad():
        if hasattr(param, "_hp_mapping"):
            for key in ADAM_MOMENTS:
                safe_set_full_optimizer_state(param, moments[key].to(torch.float32), key)
            return
        master = _unfused_master(engine, param)
        state = _inner(engine).state[param if master is None else master]
        for key in ADAM_MOMENTS:
            state[key].copy_(moments[key])


def adam_step(engine: Any) -> int:
    """Adam's step count (the same for every parameter: each optimizer step updates all of them)."""
    steps = {int(s["step"]) for s in _inner(engine).state.values() if "step" in s}
    return steps.pop() if len(steps) == 1 else 0


def set_adam_step(engine: Any, step: int) -> None:
    for state in _inner(engine).state.values():
        if "step" in state:
            state["step"] = torch.full_like(state["step"], step) if torch.is_tensor(state["step"]) else step
