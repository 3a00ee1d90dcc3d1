"""What a run shows and leaves behind on rank 0: the progress bar, per-step metrics and the end-of-run summary."""
from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any

import psutil
import torch
from deepspeed.accelerator import get_accelerator
from tqdm import tqdm

from ..flops import frozen_finetune_flops_per_token, peak_flops
from .metrics import MetricsLogger


class Reporter:
    """Times steps and turns them into throughput: tokens/s over each logging window, the median step, MFU, peak
    memory and time to the first step (from process start) in ``summary.json``.

    Every rank times its own steps; only rank 0 (``metrics.enabled``) shows and writes anything.
    """

    def __init__(self, metrics: MetricsLogger, *, total_steps: int, initial_step: int, every_steps: int,
                 progress: bool, tokens_seen: int) -> None:
        self.metrics, self.every_steps, self.total_steps = metrics, every_steps, total_steps
        self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", dynamic_ncols=True,
                        disable=not (metrics.enabled and progress))
        self.step_times: list[float] = []
        self.first_step_s = 0.0
        self.start_time, self.start_tokens = time.time(), tokens_seen
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

    def close_bar(self) -> None:
        self.bar.close()

    def summary(self, out: Path, *, steps: int, tokens_seen: int, tokens_per_step: int, world: int, model_config: Any,
                seq_len: int, device: torch.device, dtype: torch.dtype, extra: dict[str, Any]) -> dict[str, Any]:
        """The run's figures; rank 0 writes them to ``out/summary.json``, plots ``out/loss.png`` and prints them.

        Tokens/s over the run counts every step including warm-up; per GPU it is taken from the median step
        (the first two steps, warm-up, are left out when there are more).
        """
        seconds = round(time.time() - self.start_time, 3)
        tokens = tokens_seen - self.start_tokens
        timed = sorted(self.step_times[2:] or self.step_times or [float("nan")])
        step_s = timed[len(timed) // 2]
        per_gpu = tokens_per_step / step_s / world
        peak = (get_accelerator().max_memory_allocated() if device.type != "cpu"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        summary = {"steps": steps, "tokens": tokens, "seconds": seconds,
                   "tokens_per_s": round(tokens / max(seconds, 1e-9), 1), "step_s_median": round(step_s, 4),
                   "tokens_per_s_per_gpu": round(per_gpu, 1),
                   "mfu": round(per_gpu * frozen_finetune_flops_per_token(model_config, seq_len)
                                / peak_flops(device, dtype), 4),
                   "first_step_s": round(self.first_step_s, 1), "peak_memory_gib": round(peak / 2**30, 3),
                   "peak_host_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2), **extra}
        if self.metrics.enabled:
            (out / "summary.json").write_text(json.dumps(summary, indent=1))
            self.metrics.plot_losses(out / "loss.png")
            print("summary: " + json.dumps(summary), flush=True)
        return summary
