"""Checks of a run against the job and the disk, done before any data is read or any weight is loaded.

What needs only the config file is checked by ``miss_ds.run_config.validate``; what needs the model's shapes (r, mode,
TP shards) by building the model on the meta device (``loading.model_on_meta``). This module checks what needs the
job's size or the output directory: the device against the base precision (FP8 tensor cores) and the fused kernels
(a CUDA GPU, a family they are tested on), the TP size against the attention heads, the sequence length against
the model's positions, the output directory (writable, and not holding another run unless the user says so), and a
resumed checkpoint's adapter settings against the config's.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Optional

import torch

from ..data.batch import check_resumable
from ..families import UnsupportedModel, check_tp
from ..fused_kernels import kernels_problem
from ..run_config import ConfigError, RunConfig, to_dict
from .checkpoint import check_base_layout

logger = logging.getLogger(__name__)

#: Files, and folders when not empty, whose presence means an output directory holds a run.
RUN_FILES = ("metrics.jsonl", "summary.json", "config.json", "checkpoints", "tensorboard")
#: FP8 tensor cores: NVIDIA compute capability 8.9 (Ada) and newer (Hopper 9.0, Blackwell 10.0 and 12.0).
FP8_MIN_CAPABILITY = (8, 9)
#: MissConfig fields that shape D or decide which tensors the adapter holds: a resume must keep them.
ADAPTER_FIELDS = ("r", "mode", "mini_r", "target_modules", "exclude_modules", "modules_to_save", "adapter_dtype")


def check_base_precision(base_precision: str, device: torch.device) -> None:
    """``model.base_precision: fp8`` on a device without FP8 tensor cores is refused (ConfigError), before the model
    is built."""
    if base_precision != "fp8":
        return
    capability = name = None
    if device.type == "cuda":
        capability, name = torch.cuda.get_device_capability(device), torch.cuda.get_device_name(device)
    problem = fp8_device_problem(device.type, capability, name)
    if problem is not None:
        raise ConfigError(problem)


def fp8_device_problem(device_type: str, capability: Optional[tuple[int, int]], name: Optional[str]) -> Optional[str]:
    """Why a device (its type, and a CUDA GPU's compute capability and name) cannot run an FP8 base; None if it
    can."""
    if device_type == "cuda" and tuple(capability) >= FP8_MIN_CAPABILITY:
        return None
    have = (f"this GPU ({name}) has compute capability {capability[0]}.{capability[1]}" if device_type == "cuda"
            else f"this run's device is {device_type}, not a CUDA GPU")
    need = ".".join(map(str, FP8_MIN_CAPABILITY))
    return (f"model.base_precision=fp8 needs an NVIDIA GPU with FP8 tensor cores (compute capability {need} or "
            f"newer: L4/L40/RTX 4090, H100/H200, B200); {have}. Set model.base_precision=bf16 (the default), or run "
            "on such a GPU")


def check_kernels(kernels: str, model_config: Any, device: torch.device) -> None:
    """``model.kernels`` that this model's family or this device cannot run is refused (ConfigError), before the
    model is built."""
    problem = kernels_problem(kernels, getattr(model_config, "model_type", None), device.type)
    if problem is not None:
        raise ConfigError(problem)


def check_model_fits_run(model_config: Any, tp: int, world: int, seq_len: int) -> None:
    """The model against the job: the TP size against its attention heads (``families.check_tp``: every rank needs a
    whole key/value head; uneven head counts are fine), and ``data.seq_len`` against its maximum positions (longer
    is an error, or a warning when the model has rope scaling, which is meant to stretch them)."""
    try:
        check_tp(model_config, tp, world)
    except UnsupportedModel as exc:
        raise ConfigError(str(exc)) from None
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit is None or seq_len <= limit:
        return
    scaling = rope_scaling(model_config)
    if scaling is None:
        raise ConfigError(f"data.seq_len={seq_len} is longer than the model's max_position_embeddings={limit} and "
                          f"it has no rope scaling: use data.seq_len <= {limit}")
    logger.warning("data.seq_len=%d is longer than max_position_embeddings=%d; relying on the model's %r rope "
                   "scaling", seq_len, limit, scaling)


def rope_scaling(model_config: Any) -> Optional[str]:
    """The rope type of a model whose positions are scaled (llama3, yarn, linear, dynamic...), else None."""
    params = getattr(model_config, "rope_parameters", None) or {}
    per_layer = params.values() if all(isinstance(v, dict) for v in params.values()) and params else [params]
    scaled = [p.get("rope_type") for p in per_layer if p.get("rope_type", "default") != "default"]
    return scaled[0] if scaled else None


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


def check_resume_matches(cfg: RunConfig, path: Path, state: dict[str, Any], tp: int, dp: int) -> None:
    """The checkpoint at ``path`` (found and verified by ``checkpoint.find_checkpoint``), whose recorded ``state``
    is given, must hold the adapter this config builds (same r, mode, targets...), fit this run's base on this
    layout, and stop where this layout's micro-steps can start (rank 0, before the model is built)."""
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
