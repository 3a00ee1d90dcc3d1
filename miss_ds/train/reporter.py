"""What a run shows and leaves behind on rank 0: the progress bar, per-step metrics and the end-of-run summary."""
from __future__ import annotations

import json
import logging
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any, Optional

import psutil
import torch
from deepspeed.accelerator import get_accelerator
from tqdm import tqdm

from ..flops import frozen_finetune_flops_per_token, peak_flops
from .metrics import MetricsLogger

logger = logging.getLogger(__name__)


class Reporter:
    """Times steps and turns them into throughput: tokens/s over each logging window, and in ``summary.json`` (its
    fields: :meth:`summary`) the run's rate, the median step, MFU, peak memory and time to the first step.

    Every rank times its own steps; only rank 0 (``metrics.enabled``) shows and writes anything.
    """

    def __init__(self, metrics: MetricsLogger, *, total_steps: int, initial_step: int, every_steps: int,
                 progress: bool, tokens_seen: int) -> None:
        self.metrics, self.every_steps, self.total_steps = metrics, every_steps, total_steps
        terminal = sys.stderr.isatty()
        self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", dynamic_ncols=True,
                        disable=not (metrics.enabled and progress and terminal))
        # A log file (Slurm, mpirun, nohup) gets a line per logged step instead: tqdm's carriage returns would make
        # one line of thousands of characters of it.
        self.log_lines = metrics.enabled and progress and not terminal
        self.step_times: list[float] = []
        self.first_step_s = 0.0
        self.start_time, self.start_step, self.start_tokens = time.time(), initial_step, tokens_seen
        self._window = (time.time(), tokens_seen)
        self._step_start = time.time()

    def step_started(self) -> None:
        self._step_start = time.time()

    def step_done(self, step: int, loss: float, lr: float, tokens_seen: int, skipped_batches: int) -> None:
        """Record one optimizer step; log it every ``every_steps`` steps and at the last."""
        now = time.time()
        self.step_times.append(now - self._step_start)
        if len(self.step_times) == 1:
            self.first_step_s = now - psutil.Process().create_time()
        self.bar.update(1)
        if step % self.every_steps and step != self.total_steps:
            return
        window_start, window_tokens = self._window
        tok_s = (tokens_seen - window_tokens) / max(now - window_start, 1e-9)
        self._window = (now, tokens_seen)
        self.metrics.log(step, {"loss": loss, "lr": lr, "tokens_per_s": tok_s, "tokens": tokens_seen,
                                "skipped_batches": skipped_batches})
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
        if self.log_lines:
            logger.info("step %d/%d: loss %.4f, lr %.2e, %s tokens/s", step, self.total_steps, loss, lr,
                        f"{tok_s:,.0f}")

    def close_bar(self) -> None:
        self.bar.close()

    def summary(self, out: Path, *, steps: int, tokens_seen: int, world: int, model_config: Any, seq_len: int,
                device: torch.device, dtype: torch.dtype, extra: dict[str, Any]) -> dict[str, Any]:
        """The run's figures; rank 0 writes them to ``out/summary.json``, plots ``out/loss.png`` and prints them.

        ``steps`` and ``tokens`` are the run's, over every process that trained it (a resumed run included); tokens
        are real (not padding) tokens of every data-parallel rank, as ``metrics.jsonl`` counts them. A resumed run says
        where this process took over: ``resumed_at_step`` and ``resumed_at_tokens`` (0 for a run that started
        fresh). The rates are this process's, in two time bases, named apart:

        - ``seconds``, ``tokens_per_s``: wall time from just before this process's first step to the summary (steps,
          evaluations, checkpoint saves, the end's samples), and the tokens it trained on over it
          (``tokens - resumed_at_tokens``): the job's rate, all GPUs.
        - ``step_s_median``, ``step_tokens_per_s_per_gpu``, ``mfu``: the median optimizer step (the first two, warm-up,
          left out when there are more), the mean tokens of a step over it divided by ``world_size``, and the model
          FLOPs of those tokens against the GPU's dense peak (0 on CPU): one GPU's steady-state rate. Times
          ``world_size`` it is above ``tokens_per_s`` by the time spent outside steps (evaluations, saves, warm-up).

        ``first_step_s`` is from process start to the end of the first step. A figure that cannot be had (no step
        timed) is null: the file is strict JSON, never NaN.
        """
        seconds = round(time.time() - self.start_time, 3)
        tokens = tokens_seen - self.start_tokens  # this process's
        timed = sorted(self.step_times[2:] or self.step_times)
        step_s = timed[len(timed) // 2] if timed else None
        per_gpu = tokens / len(self.step_times) / step_s / world if step_s else None
        mfu = None if per_gpu is None else (per_gpu * frozen_finetune_flops_per_token(model_config, seq_len)
                                            / peak_flops(device, dtype))
        peak = (get_accelerator().max_memory_allocated() if device.type != "cpu"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        summary = {"steps": steps, "tokens": tokens_seen, "resumed_at_step": self.start_step,
                   "resumed_at_tokens": self.start_tokens, "seconds": seconds,
                   "tokens_per_s": round(tokens / max(seconds, 1e-9), 1),
                   "step_s_median": _rounded(step_s, 4), "step_tokens_per_s_per_gpu": _rounded(per_gpu, 1),
                   "mfu": _rounded(mfu, 4),
                   "first_step_s": round(self.first_step_s, 1), "peak_memory_gib": round(peak / 2**30, 3),
                   "peak_host_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2), **extra}
        summary = {key: _finite_or_none(value) for key, value in summary.items()}
        if self.metrics.enabled:
            (out / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=False))
            self.metrics.plot_losses(out / "loss.png")
            print("summary: " + json.dumps(summary, allow_nan=False), flush=True)
        return summary


def _rounded(value: Optional[float], digits: int) -> Optional[float]:
    """``round``, passing None (a figure that cannot be had) through."""
    return None if value is None else round(value, digits)


def _finite_or_none(value: Any) -> Any:
    """``value``, or None for a NaN or infinite float (JSON has neither)."""
    return None if isinstance(value, float) and not math.isfinite(value) else value
