"""Checks of a run against the job and the disk, done before any data is read or any weight is loaded.

What needs only the config file is checked by ``miss_ds.run_config.validate``; what needs the model's shapes (r, mode,
TP shards) by building the model on the meta device (``loading.model_on_meta``). This module checks what needs the
job's size or the output directory: the device against the base precision (FP8 tensor cores) and the fused kernels
(a CUDA GPU, a family they are tested on), the TP size against the attention heads, the sequence length against
the model's positions, the output directory (writable, and not holding another run unless the user says so), and a
resumed checkpoint's recorded config against this one: its adapter settings, and what draws a random base.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import IO, Any, Optional

import torch

from ..checkpoint_files import CHECKPOINTS_DIR
from ..data.batch import check_resumable
from ..data.config import DataConfig
from ..families import UnsupportedModel, check_tp
from ..fused_kernels import kernels_problem
from ..config_loader import ABSENT, dotted_value
from ..run_config import ConfigError, RunConfig, draws_random_weights, to_dict

logger = logging.getLogger(__name__)

#: Files, and folders when not empty, whose presence means an output directory holds a run.
RUN_FILES = ("metrics.jsonl", "summary.json", "config.json", CHECKPOINTS_DIR, "tensorboard")
#: Held by the run writing to an output directory (``lock_output_dir``).
LOCK_FILE = ".lock"
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


def check_base_files(cfg: RunConfig) -> None:
    """The base's safetensors files under ``model.path`` are all there and whole (their headers against their sizes:
    ``hf_checkpoint.check_whole``), before the data is built and the model loaded; a run that draws its weights
    reads none."""
    if cfg.model.path is None or cfg.model.random_weights:
        return
    from ..hf_checkpoint import DamagedWeights, HFCheckpoint

    try:
        HFCheckpoint(cfg.model.path).close()
    except (DamagedWeights, FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"model.path={cfg.model.path}: {exc}") from None


def check_tokenizer_fits(tokens: int, tokenizer_dir: str, model_config: Any) -> None:
    """Every token id of the tokenizer (``tokens`` ids, read from ``tokenizer_dir``) must index the model's embedding:
    a larger one fails in the middle of a step (a device-side assert on a GPU) after the whole model is loaded."""
    vocab = getattr(model_config, "vocab_size", None)
    if vocab is not None and tokens > vocab:
        raise ConfigError(f"the tokenizer in {tokenizer_dir} has {tokens} tokens, more than the model's vocab_size="
                          f"{vocab}: ids from {vocab} on would index past its embedding. Use the model's own tokenizer "
                          "(tokenizer: unset reads it from model.path), or one whose added tokens the model has")


def rope_scaling(model_config: Any) -> Optional[str]:
    """The rope type of a model whose positions are scaled (llama3, yarn, linear, dynamic...), else None."""
    params = getattr(model_config, "rope_parameters", None) or {}
    per_layer = params.values() if all(isinstance(v, dict) for v in params.values()) and params else [params]
    scaled = [p.get("rope_type") for p in per_layer if p.get("rope_type", "default") != "default"]
    return scaled[0] if scaled else None


def sample_file(cfg: RunConfig) -> Optional[DataConfig]:
    """The single-source data config whose ``eval_path`` ``eval.samples`` shows rows of: ``data.eval_path``, or the
    first source's; None when the run has no eval file (synthetic data, or an ``eval_fraction`` hold-out)."""
    if cfg.data.synthetic:
        return None
    return next((part for part, _ in cfg.data.per_source() if part.eval_path), None)


def warn_idle_eval_options(cfg: RunConfig) -> None:
    """Warn about eval options this run's data leaves nothing to do for (rank 0). Warned, not refused: they only
    measure or show, and a run's data can change while its config keeps them."""
    data = cfg.data
    if cfg.eval.every_steps and (data.synthetic or not (data.eval_fraction or sample_file(cfg))):
        logger.warning("eval.every_steps=%d: this run has no eval split (no data.eval_path, source eval_path or "
                       "data.eval_fraction), so nothing is evaluated", cfg.eval.every_steps)
    if cfg.eval.samples and sample_file(cfg) is None:
        logger.warning("eval.samples=%d: this run has no eval file to show rows of (%s), so no samples are printed",
                       cfg.eval.samples, "synthetic data" if data.synthetic else "an eval_fraction hold-out is not a "
                       "file" if data.eval_fraction else "no data.eval_path or source eval_path")


def check_output_dir(cfg: RunConfig, resume: Optional[str], overwrite: bool) -> bool:
    """Whether ``output_dir`` can take this run (rank 0), writing nothing: it is, or can be created as, a writable
    directory, and it holds no other run unless the run resumes (``--resume``) or ``overwrite`` is set. Returns
    whether an old run must be moved aside (``overwrite``), which ``claim_output_dir`` does once the run's checks
    have passed, so that a refused run changes nothing."""
    out = Path(cfg.output_dir)
    if overwrite and resume is not None:
        raise ConfigError(f"--overwrite starts over in output_dir={out}, but this run resumes {resume!r} (--resume or "
                          "checkpoint.resume): drop one of the two (--set checkpoint.resume=null to start over)")
    existing = next(path for path in (out, *out.parents) if path.exists())
    if not existing.is_dir():
        raise ConfigError(f"output_dir={out}: {existing} is a file, not a directory: choose another output_dir with "
                          "--set output_dir=...")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir={out} cannot be written ({existing} is not writable): choose a writable "
                          "directory with --set output_dir=...")
    found = sorted(name for name in RUN_FILES
                   if (out / name).is_file() or ((out / name).is_dir() and any((out / name).iterdir())))
    if not found or resume is not None:
        return False
    if not overwrite:
        resume_it = ("continue it with --resume auto" if CHECKPOINTS_DIR in found else
                     "it saved no checkpoint (--resume auto would start it again at step 0)")
        raise ConfigError(f"output_dir={out} already holds a run ({', '.join(found)}): {resume_it}, start over with "
                          "--overwrite (the old run is moved aside, not deleted), or choose another output_dir")
    if Path.cwd().is_relative_to(out.resolve()):
        raise ConfigError(f"--overwrite would move output_dir={out} aside, and the current directory is in it: run "
                          "from another directory, or choose another output_dir")
    return True


def claim_output_dir(out: Path, move_aside: bool) -> tuple[Optional[Path], Optional[IO[str]]]:
    """Create ``out`` for the run's first file (rank 0), after moving the old run there aside when ``move_aside``
    (``check_output_dir``'s answer), and lock it for this process (``lock_output_dir``). Returns where the old run
    went (never deleted) and the lock, to be kept open while the run lives."""
    aside = None
    if move_aside:
        old_lock = lock_output_dir(out)  # a run still writing there would go on writing into the moved directory
        aside = out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        out.rename(aside)
        if old_lock is not None:
            old_lock.close()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"output_dir={out} cannot be created ({exc.strerror or exc}): choose a writable directory "
                          "with --set output_dir=...") from None
    return aside, lock_output_dir(out)


def lock_output_dir(out: Path) -> Optional[IO[str]]:
    """An exclusive lock on ``out/.lock`` (``flock``, released when the process ends, however it ends), so that two
    runs started into one directory do not write their checkpoints and metrics over each other: the second is
    refused, naming the first's process. None, with a warning, where the file system has no locks."""
    handle = open(out / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise ConfigError(f"output_dir={out} is in use by another run (process {holder}): wait for it to end, stop "
                          "it, or choose another output_dir") from None
    except OSError as exc:  # e.g. a network file system mounted without locks
        logger.warning("output_dir=%s cannot be locked (%s): nothing stops another run from writing there too", out,
                       exc.strerror or exc)
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle


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


def check_base_layout(state: dict[str, Any], tp: int, run_config: dict[str, Any], path: Path) -> None:
    """A random base (no ``model.path``, or ``model.random_init``) is drawn from ``seed`` and ``model.config`` per
    TP shard (``loading.materialize_random``): a resume that draws one with another TP layout, or changes one of
    them, builds another base, which the checkpoint's D does not fit. Refused by name, with the settings that resume
    it. A resume that loads its base (``model.path``: a base checkpoint, or the random base the run saved) resumes on
    any TP size: ``checkpoint.check_resumed_base`` checks that base's fingerprint."""
    saved = state.get("config", {})
    if state["tp_size"] != tp and _random_base(run_config["model"]):
        saved_base = (f" (the run saved its random base: model.path={Path(path).parents[1] / 'base'})"
                      if _random_base(saved.get("model", {})) else "")
        raise ValueError(
            f"cannot resume {path} (written with tp_size={state['tp_size']}) with parallel.tp_size={tp}: this config "
            "draws random base weights (model.path null or model.random_init), per tensor-parallel shard, so "
            f"another tp_size builds another base and D would not fit it. Resume with parallel.tp_size="
            f"{state['tp_size']}, or load the base from a checkpoint{saved_base}")
    if not (_random_base(saved.get("model", {})) and _random_base(run_config["model"])):
        return
    drawn_from = ["seed", "model.config"] + (["parallel.tp_grain_size"] if tp > 1 else [])
    changed = [difference for key in drawn_from
               for difference in _differences(key, dotted_value(saved, key), dotted_value(run_config, key))]
    if changed:
        raise ValueError(
            f"cannot resume {path}: its base has random weights (model.path null or model.random_init), drawn from "
            "the seed, model.config and the TP layout, and this config draws another base, which D would not fit ("
            + "; ".join(f"{key}: checkpoint {_shown(old)}, this config {_shown(new)}" for key, old, new in changed)
            + "). Resume with the checkpoint's settings (" + ", ".join(_restore(key, old) for key, old, _ in changed)
            + "), or start a new run in another output_dir")


def _differences(key: str, old: Any, new: Any) -> list[tuple[str, Any, Any]]:
    """The dotted keys under ``key`` whose values differ between ``old`` and ``new`` (nested dicts compared by key)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [found for sub in sorted(old.keys() | new.keys())
                for found in _differences(f"{key}.{sub}", old.get(sub, ABSENT), new.get(sub, ABSENT))]
    return [] if old == new else [(key, old, new)]


def _shown(value: Any) -> str:
    """A compared value as the refusal names it."""
    return "unset" if value is ABSENT else repr(value)


def _restore(key: str, old: Any) -> str:
    """How to give ``key`` its checkpoint value ``old`` back."""
    return f"remove {key}" if old is ABSENT else f"--set {key}={json.dumps(old)}"


def _random_base(model: dict[str, Any]) -> bool:
    """Whether a run config's ``model`` section (a dict, as a checkpoint records it) draws random base weights."""
    return bool(model) and draws_random_weights(model.get("path"), bool(model.get("random_init")))
