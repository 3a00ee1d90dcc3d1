"""The training job: build, then a short loop over stateful components. Used by ``launch/train.py``.

Order of work (torchtitan's): validate the config, start the process group, build the data (rank 0 first), build
this rank's model (``miss_ds.loading.build_model``: meta, TP split, MiSS, this rank's shards), wrap D in a DeepSpeed
engine (``miss_ds.engine``), resume (``TrainCheckpoint``), then run steps until ``train.max_steps`` or a preemption
signal. The components: the engine (D, optimizer, LR schedule), the data iterator, the ``TrainState``, the
``NonFiniteGuard``, the ``TrainCheckpoint`` and the ``Reporter``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from transformers import AutoTokenizer

from .. import engine as miss_engine, memory_plan
from ..data import SyntheticBatches, count_tokens
from ..distributed import PREEMPTED_EXIT_CODE, ParallelLayout, init_distributed
from ..loading import build_model
from ..modeling import DTYPES, hf_config
from ..run_config import RunConfig, to_dict
from .checkpoint import TrainCheckpoint
from .guard import NonFiniteGuard, TrainingStopped
from .metrics import MetricsLogger
from .preemption import Preemption
from .reporter import Reporter
from .schedule import lr_lambda
from .state import TrainState

logger = logging.getLogger(__name__)

__all__ = ["Trainer", "TrainingStopped"]


class Trainer:
    """One MiSS fine-tuning run under DeepSpeed; see the module docstring for the order of work."""

    def __init__(self, cfg: RunConfig, resume: Optional[str] = None, preemption: Optional[Preemption] = None) -> None:
        self.cfg = cfg
        self.preemption = preemption or Preemption().install()
        info = init_distributed()
        self.layout = ParallelLayout(info.rank, info.world_size, cfg.parallel.tp_size)
        self.out = Path(cfg.output_dir)
        self.device = torch.device(get_accelerator().current_device_name())
        torch.manual_seed(cfg.seed)
        tokenizer_dir = None if cfg.data.synthetic else cfg.tokenizer or cfg.model.path
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else None
        self.model_config = hf_config(cfg.model, vocab_size=len(self.tokenizer) if self.tokenizer else None)
        self._build_data()
        built = build_model(cfg, self.model_config, self.layout.tp, self.device, self._recompute_layers())
        self.report, self.recompute_layers, self.checkpoint_bytes_read = built.report, built.recompute_layers, \
            built.bytes_read
        t = cfg.train
        schedule = lr_lambda(t.schedule, t.warmup_steps, t.max_steps, t.min_lr_ratio)
        self.engine, _, self.scheduler = miss_engine.initialize(
            built.model, miss_engine.deepspeed_config(cfg, self.device.type), tp_size=self.layout.tp,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
        if self.layout.is_main:
            logger.info("%s", self.report)
        self.state = TrainState()
        self.guard = NonFiniteGuard(self.engine, self.device, t.max_bad_steps, self.state)
        self.checkpoint = TrainCheckpoint(self.out / "checkpoints", cfg.checkpoint.keep_last, self.layout,
                                          engine=self.engine, scheduler=self.scheduler, miss=cfg.miss,
                                          train=self.state, data=self.batches, run_config=to_dict(cfg))
        self.metrics = MetricsLogger(self.out, enabled=self.layout.is_main, tensorboard=cfg.logging.tensorboard)
        self._resume(resume if resume is not None else cfg.checkpoint.resume)
        if self.layout.is_main:
            (self.out / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))

    @property
    def step(self) -> int:
        return self.state.step

    # ----------------------------------------------------------------- build
    def _build_data(self) -> None:
        data, micro = self.cfg.data, self.cfg.train.micro_batch_size
        # Flash attention (transformers' test: "flash" in the name) finds packed examples in the position ids of
        # one-row batches only.
        self.one_row = data.pack and "flash" in self.cfg.model.attn_implementation
        self.padding_fraction = 0.0
        if data.synthetic:
            self.eval_ds = None
            self.batches = SyntheticBatches(self.model_config.vocab_size, data.seq_len, micro, self.layout.dp_rank,
                                            seed=data.seed)
            return
        from ..data import BatchIterator, build_datasets

        # Rank 0 tokenises and fills the datasets cache; the others then read it.
        if not self.layout.is_main:
            dist.barrier()
        train_ds, self.eval_ds, stats = build_datasets(data, self.tokenizer)
        if self.layout.is_main:
            dist.barrier()
            logger.info("data: %s", stats)
        self.padding_fraction = stats.train.padding_fraction
        self._check_splits_fill_a_batch(train_ds)
        self.batches = BatchIterator(train_ds, micro, self.layout.dp_rank, self.layout.dp, seed=data.seed,
                                     one_row=self.one_row)

    def _check_splits_fill_a_batch(self, train_ds) -> None:
        """Both splits must fill one global batch; for eval this would otherwise fail at the first evaluation,
        after training has run (at the end: before the final checkpoint)."""
        data, micro, dp = self.cfg.data, self.cfg.train.micro_batch_size, self.layout.dp
        train_source = "data.sources" if data.sources else f"data.train_path={data.train_path}"
        eval_source = ("the eval_path and eval_fraction of data.sources" if data.sources else
                       f"data.eval_path={data.eval_path}" if data.eval_path else
                       f"the data.eval_fraction={data.eval_fraction} hold-out of data.train_path={data.train_path}")
        for split, dataset, source in (("train", train_ds, train_source), ("eval", self.eval_ds, eval_source)):
            if dataset is not None and len(dataset) < micro * dp:
                raise ValueError(f"{source}: its {len(dataset)} {split} sequences cannot fill one batch of "
                                 f"train.micro_batch_size={micro} x {dp} data-parallel ranks; add {split} "
                                 "rows or lower train.micro_batch_size")

    def _recompute_layers(self) -> Optional[int]:
        """The configured count, or for ``auto`` the fewest recomputed layers that the memory plan fits."""
        wanted = self.cfg.model.recompute_layers
        if wanted != "auto":
            return wanted
        p, t = self.cfg.parallel, self.cfg.train
        budget = memory_plan.AUTO_MEMORY_FRACTION * get_accelerator().total_memory()
        count = memory_plan.layers_to_recompute(
            memory_plan.shape_of(self.model_config), budget, tp=self.layout.tp, dp=self.layout.dp, zero=p.zero_stage,
            offload=p.offload_optimizer, micro_batch=t.micro_batch_size, seq=self.cfg.data.seq_len,
            r=self.cfg.miss.r, mode=self.cfg.miss.mode)
        logger.info("recompute_layers=auto: %d of %d layers recompute (plan for %.1f GiB)", count,
                    self.model_config.num_hidden_layers, budget / 2**30)
        return count

    def _resume(self, resume: Optional[str]) -> None:
        if self.checkpoint.resume(resume) is None:
            dropped = self.metrics.truncate_after(0)  # lines of an earlier attempt that saved no checkpoint
            if dropped:
                logger.warning("starting at step 0: dropped %d lines of an earlier run from %s", dropped,
                               self.metrics.path)
        else:
            self.metrics.truncate_after(self.state.step)

    # ----------------------------------------------------------------- run
    def train(self) -> int:
        """Run to ``train.max_steps``; returns the process exit code (0, or PREEMPTED_EXIT_CODE)."""
        t = self.cfg.train
        reporter = Reporter(self.metrics, total_steps=t.max_steps, initial_step=self.state.step,
                            every_steps=self.cfg.logging.every_steps, progress=self.cfg.logging.progress,
                            tokens_seen=self.state.tokens_seen)
        while self.state.step < t.max_steps:
            reporter.step_started()
            loss = self._train_step()
            self.state.step += 1
            reporter.step_done(self.state.step, loss, self.scheduler.get_last_lr()[0], self.state.tokens_seen,
                               self.state.skipped_batches)
            if self._due(self.cfg.eval.every_steps):
                self.evaluate()
            if self._preempted():
                reporter.close_bar()
                self.checkpoint.save()
                logger.warning("rank %d: signal %s received, checkpoint saved at step %d; exiting with %d",
                               self.layout.rank, self.preemption.signal, self.state.step, PREEMPTED_EXIT_CODE)
                return PREEMPTED_EXIT_CODE
            if self._due(self.cfg.checkpoint.every_steps):
                self.checkpoint.save()
        reporter.close_bar()
        eval_loss = self.evaluate()
        self.checkpoint.save()
        self._finish(reporter, eval_loss)
        return 0

    def _due(self, every: int) -> bool:
        """Whether a periodic action (eval, checkpoint) falls on this step; the last step has its own."""
        return bool(every) and self.state.step % every == 0 and self.state.step < self.cfg.train.max_steps

    def _train_step(self) -> float:
        """One optimizer step over ``grad_accum_steps`` micro-batches; returns the mean loss over DP ranks.

        Skipped micro-batches (see ``NonFiniteGuard``) are replaced by the next ones; an optimizer step skipped for
        non-finite gradients discards its whole accumulation window, so its losses are dropped too.
        """
        losses = []
        while len(losses) < self.cfg.train.grad_accum_steps:
            batch = {k: v.to(self.device) for k, v in next(self.batches).items()}
            loss = self.engine(**batch).loss
            if not self.guard.all_finite(loss):
                self.guard.bad("loss")
                continue
            self.engine.backward(loss)
            skipped = self.guard.step()
            # One all-reduce: did any rank's optimizer skip the step, and how many tokens went in.
            stats = torch.stack([torch.tensor(float(skipped), device=self.device), count_tokens(batch).float()])
            dist.all_reduce(stats)
            if stats[0].item() > 0:
                losses.clear()
                self.guard.bad("gradients")
                continue
            self.guard.good()
            losses.append(loss.detach().float())
            self.state.tokens_seen += int(stats[1].item()) // self.layout.tp
        mean = torch.stack(losses).mean()
        dist.all_reduce(mean)
        return mean.item() / self.layout.world

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        """Mean loss over the held-out split (token-weighted, summed over DP ranks); logged as split 'eval'."""
        if self.eval_ds is None:
            return None
        from ..data import eval_batches

        self.engine.eval()
        total = torch.zeros(2, device=self.device)
        micro = self.cfg.train.micro_batch_size
        for i, batch in enumerate(eval_batches(self.eval_ds, micro, self.layout.dp_rank, self.layout.dp,
                                               one_row=self.one_row)):
            if self.cfg.eval.max_batches and i >= self.cfg.eval.max_batches:
                break
            batch = {k: v.to(self.device) for k, v in batch.items()}
            n = (batch["labels"][:, 1:] != -100).sum()
            total += torch.stack([self.engine(**batch).loss.float() * n, n.float()])
        self.engine.train()
        dist.all_reduce(total)
        loss = (total[0] / total[1].clamp_min(1)).item()
        self.metrics.log(self.state.step, {"loss": loss}, split="eval")
        return loss

    def _preempted(self) -> bool:
        """Whether any rank got SIGTERM/SIGUSR1 (all ranks agree, so they save together)."""
        flag = torch.tensor([1.0 if self.preemption.requested else 0.0], device=self.device)
        dist.all_reduce(flag)
        return flag.item() > 0

    def _finish(self, reporter: Reporter, eval_loss: Optional[float]) -> None:
        t = self.cfg.train
        tokens_per_step = t.micro_batch_size * t.grad_accum_steps * self.layout.dp * self.cfg.data.seq_len
        reporter.summary(self.out, steps=self.state.step, tokens_seen=self.state.tokens_seen,
                         tokens_per_step=tokens_per_step, world=self.layout.world, model_config=self.model_config,
                         seq_len=self.cfg.data.seq_len, device=self.device, dtype=DTYPES[self.cfg.model.dtype],
                         extra={"checkpoint_gib_read": round(self.checkpoint_bytes_read / 2**30, 3),
                                "recompute_layers": self.recompute_layers, "world_size": self.layout.world,
                                "tp_size": self.layout.tp, "eval_loss": eval_loss,
                                "skipped_batches": self.state.skipped_batches,
                                "padding_fraction": self.padding_fraction,
                                "trainable_params": self.report.trainable})

    def close(self) -> None:
        self.metrics.close()
        self.engine.destroy()
