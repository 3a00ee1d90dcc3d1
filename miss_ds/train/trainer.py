"""The training job: build, then a short loop over stateful components. Used by ``launch/train.py``.

Order of work (torchtitan's), cheap checks first: validate the config, start the process group, check the tokenizer
against the vocabulary, the device against the base precision and the kernels, the TP size, the output directory and
the base's weight files (``preflight``), find the checkpoint to resume (rank 0 checks every file's sha256) and check
its recorded config against this one and against the run's later checkpoints (a checkpoint already at
``train.max_steps`` ends the run here: nothing to do, nothing written), build the model on the meta device with its TP
split and MiSS (every shape error surfaces here, before any data is read), build the data (rank 0 first) and check it
against the checkpoint's data position, load this rank's weights (with ``model.base_precision: fp8`` quantising each
MiSS layer's shard as it loads: ``quantize.BaseQuantizer``), check the checkpoint's base fingerprint against them, save
a random base (``random_base``), put ``model.kernels``' fused kernels in place (``fused_kernels``), wrap D in a
DeepSpeed engine (``miss_ds.engine``), resume (``TrainCheckpoint``), then run steps until ``train.max_steps`` or a
preemption signal (or Ctrl-C). Rank 0 locks the output directory when it creates it (``preflight.lock_output_dir``),
for the life of the process. Every step that can fail on one rank alone ends in ``distributed.agree``, so all ranks
stop together. The components: the engine (D, optimizer, LR schedule), the data iterator, the ``TrainState``, the
``StepRunner`` (one optimizer step) with its ``NonFiniteGuard``, the ``TrainCheckpoint`` and the ``Reporter``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional, TypeVar

import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from transformers import AutoTokenizer

from .. import engine as miss_engine, memory_plan
from ..checkpoint_files import CHECKPOINTS_DIR, read_state
from ..data import SyntheticBatches
from ..distributed import PREEMPTED_EXIT_CODE, ParallelLayout, agree, any_rank, init_distributed
from ..functional import MissShapeError
from ..fused_kernels import apply_kernels
from ..loading import materialize_model, model_on_meta
from ..model_shape import ModelShape
from ..modeling import DTYPES, enable_recompute, hf_config
from ..quantize import BaseQuantizer
from ..random_base import save_random_base, will_save
from ..run_config import ConfigError, ModelConfig, RunConfig, to_dict
from ..watchdog import PeerWatchdog
from .checkpoint import (TrainCheckpoint, check_no_newer_checkpoints, check_resumed_base, checkpoint_bytes,
                         find_checkpoint)
from .guard import NonFiniteGuard, TrainingStopped
from .metrics import MetricsLogger
from .preemption import Preemption
from .preflight import (check_base_files, check_base_precision, check_kernels, check_model_fits_run, check_output_dir,
                        check_resume_matches, check_tokenizer_fits, claim_output_dir, sample_file,
                        warn_idle_eval_options)
from .reporter import Reporter
from .schedule import lr_lambda
from .state import TrainState
from .step import StepRunner

logger = logging.getLogger(__name__)

__all__ = ["Trainer", "TrainingStopped"]

T = TypeVar("T")


class Trainer:
    """One MiSS fine-tuning run under DeepSpeed; see the module docstring for the order of work."""

    def __init__(self, cfg: RunConfig, resume: Optional[str] = None, preemption: Optional[Preemption] = None,
                 overwrite: bool = False) -> None:
        self.cfg = cfg
        self.preemption = preemption or Preemption().install()
        info = init_distributed()
        self.layout = ParallelLayout(info.rank, info.world_size, cfg.parallel.tp_size)
        PeerWatchdog(cfg.parallel.peer_timeout_s).start()
        self.out = Path(cfg.output_dir)
        self.move_aside = False  # rank 0's check_output_dir: whether --overwrite moves an old run aside
        self.output_lock = None  # rank 0's lock on output_dir (preflight.lock_output_dir), held while the run lives
        self.device = torch.device(get_accelerator().current_device_name())
        check_base_precision(cfg.model.base_precision, self.device)
        resume = resume if resume is not None else cfg.checkpoint.resume
        torch.manual_seed(cfg.seed)
        # Every step that can fail on one rank alone ends in ``agree``: all ranks stop together.
        agree("reading the tokenizer and model config", self._read_model_config)
        check_model_fits_run(self.model_config, self.layout.tp, self.layout.world, cfg.data.seq_len)
        check_kernels(cfg.model.kernels, self.model_config, self.device)
        if self.layout.is_main:
            warn_idle_eval_options(cfg)
        found = _from_main_rank(agree("checking the output directory and the checkpoint to resume",
                                      lambda: self._check_output_dir(resume, overwrite)))
        self.resume_from = None if found is None else Path(found[0])
        self.resumed_data = None if found is None else found[2]  # the checkpoint's data position
        self.state = TrainState()
        # A checkpoint at train.max_steps leaves nothing to do: nothing is built, and no file is written.
        self.finished_at = found[1] if found is not None and found[1] >= cfg.train.max_steps else None
        if self.finished_at is None:
            self._build()
        else:
            self.state.step = self.finished_at

    def _build(self) -> None:
        """Build the model, the data and the engine, and resume (the module docstring has the order)."""
        cfg = self.cfg
        model, self.report = agree("building the model on the meta device", self._model_on_meta)
        self._build_data()
        # An FP8 base is quantised layer by layer as it loads, unless its bf16 values must be saved first.
        quantizer = BaseQuantizer(model) if cfg.model.base_precision == "fp8" else None
        saves_base = cfg.model.random_weights and will_save(model)
        loaded = quantizer.loaded if quantizer is not None and not saves_base else None
        base_bytes = agree("loading the model", lambda: materialize_model(model, cfg, self.device, loaded))
        if cfg.init_adapter:
            from ..convert.init_adapter import load_init_adapter  # imports PEFT: only when it is needed

            agree("loading init_adapter", lambda: load_init_adapter(model, cfg.init_adapter))
        if self.resume_from is not None:  # before the random base is saved: a refused resume writes nothing
            agree("checking the checkpoint's base", lambda: check_resumed_base(self.resume_from, model))
        agree("creating the output directory", self._claim_output_dir)  # the run's checks passed: its first file
        if cfg.model.random_weights:  # drawn per TP shard and stored nowhere else: exports need it
            agree("saving the random base", lambda: save_random_base(model, self.out, self.tokenizer, self.layout,
                                                                     resuming=self.resume_from is not None))
        if quantizer is not None:
            agree("quantising the base to FP8", quantizer.finish)
        kernels = apply_kernels(model, cfg.model.kernels)
        if kernels and self.layout.is_main:
            logger.info("%s", kernels)
        self.recompute_layers = (enable_recompute(model, self._recompute_layers())
                                 if cfg.model.gradient_checkpointing else None)
        t = cfg.train
        schedule = lr_lambda(t.schedule, t.warmup_steps, t.max_steps, t.min_lr_ratio)
        self.engine, _, self.scheduler = miss_engine.initialize(
            model, miss_engine.deepspeed_config(cfg, self.device.type), tp_size=self.layout.tp,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
        self.guard = NonFiniteGuard(self.engine, self.device, t.max_bad_steps, self.state)
        self.run_step = StepRunner(self.engine, lambda: next(self.batches), self.layout, self.device,
                                   t.grad_accum_steps, self.guard)
        self.checkpoint = TrainCheckpoint(self.out / CHECKPOINTS_DIR, cfg.checkpoint.keep_last, self.layout,
                                          engine=self.engine, scheduler=self.scheduler, miss=cfg.miss,
                                          train=self.state, data=self.batches, run_config=to_dict(cfg))
        self.metrics = MetricsLogger(self.out, enabled=self.layout.is_main, tensorboard=cfg.logging.tensorboard)
        agree("resuming", self._resume)
        resumed_bytes = 0 if self.resume_from is None else checkpoint_bytes(self.resume_from)
        self.checkpoint_bytes_read = base_bytes + resumed_bytes
        if self.layout.is_main:
            (self.out / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))

    @property
    def step(self) -> int:
        return self.state.step

    # ----------------------------------------------------------------- build
    def _read_model_config(self) -> None:
        cfg = self.cfg
        tokenizer_dir = None if cfg.data.synthetic else cfg.tokenizer or cfg.model.path
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else None
        self.model_config = hf_config(cfg.model, vocab_size=len(self.tokenizer) if self.tokenizer else None)
        if self.tokenizer is not None:
            check_tokenizer_fits(len(self.tokenizer), tokenizer_dir, self.model_config)
        cfg.miss = cfg.miss.for_model(self.model_config)  # the family's targets when unset, recorded explicitly

    def _model_on_meta(self) -> tuple:
        try:
            return model_on_meta(self.cfg, self.model_config, self.layout.tp)
        except MissShapeError as exc:  # r, mode or TP split that the model's shapes cannot carry: bad input
            raise ConfigError(str(exc)) from None

    def _check_output_dir(self, resume: Optional[str], overwrite: bool) -> Optional[tuple[str, int, dict]]:
        """Rank 0: check the output directory (and whether --overwrite moves an old run aside) and the base's weight
        files, check that ``init_adapter`` reads whole, find the checkpoint to resume (every file's sha256 checked)
        and check it against this config; returns its path, step and data position. Bad input raises ConfigError
        before any model memory is spent and before anything of the run is written."""
        if not self.layout.is_main:
            return None
        self.move_aside = check_output_dir(self.cfg, resume, overwrite)
        check_base_files(self.cfg)
        if self.cfg.init_adapter:
            from ..convert.init_adapter import check_init_adapter  # imports PEFT: only when it is needed

            check_init_adapter(self.cfg.init_adapter)
        path = find_checkpoint(self.out / CHECKPOINTS_DIR, resume)
        if path is None:
            return None
        state = read_state(path)
        check_resume_matches(self.cfg, path, state, self.layout.tp, self.layout.dp)
        if resume != "auto":
            check_no_newer_checkpoints(self.out / CHECKPOINTS_DIR, path, state["train"]["step"])
        return str(path), state["train"]["step"], state["data"]

    def _claim_output_dir(self) -> None:
        if not self.layout.is_main:
            return
        aside, self.output_lock = claim_output_dir(self.out, self.move_aside)
        if aside is not None:
            logger.warning("--overwrite: the run that was in %s is now in %s", self.out, aside)

    def _build_data(self) -> None:
        data, micro = self.cfg.data, self.cfg.train.micro_batch_size
        # Flash attention (transformers' test: "flash" in the name) finds packed examples in the position ids of
        # one-row batches only. The implementation the model runs (model.attn_implementation unset: the family's).
        self.one_row = data.pack and "flash" in self.model_config._attn_implementation
        self.padding_fraction = 0.0
        if data.synthetic:
            self.eval_sets = []
            self.batches = SyntheticBatches(self.model_config.vocab_size, data.seq_len, micro, self.layout.dp_rank,
                                            self.layout.dp, seed=data.seed)
            return
        from ..data import BatchIterator, build_datasets, split_eval_sets
        from ..data.errors import read_data

        def build() -> tuple:
            return read_data(lambda: build_datasets(data, self.tokenizer))

        # Rank 0 tokenises and fills the datasets cache; the others then read it.
        first = agree("building the data", lambda: build() if self.layout.is_main else None)
        built = agree("reading the data", lambda: first if self.layout.is_main else build())
        train_ds, eval_ds, stats = built
        self.eval_sets = split_eval_sets(eval_ds, stats.eval_sets, self.cfg.eval.max_batches * micro)
        self.padding_fraction = stats.train.padding_fraction
        agree("checking the data", lambda: self._check_train_fills_a_batch(train_ds))
        self.batches = BatchIterator(train_ds, micro, self.layout.dp_rank, self.layout.dp, seed=data.seed,
                                     one_row=self.one_row, accum_steps=self.cfg.train.grad_accum_steps)
        if self.resumed_data is not None:  # data that changed since the checkpoint: refused before the weights load
            agree("checking the data against the checkpoint", self._check_data_resumes)

    def _check_data_resumes(self) -> None:
        """Take the checkpoint's data position now (``TrainCheckpoint.resume`` takes it again): the iterator refuses
        a position of other data (another seed, another number of sequences)."""
        try:
            self.batches.load_state_dict(self.resumed_data)
        except ValueError as exc:
            raise ConfigError(f"{self.resume_from}: {exc}. Resume with the data files and data settings it was "
                              f"trained with, or start a new run from its adapter (init_adapter: {self.resume_from}) "
                              "in another output_dir") from None

    def _check_train_fills_a_batch(self, train_ds) -> None:
        """The train split must fill one global batch (the eval split need not: ``eval_batches`` fills its last
        micro-batches with rows that take no loss)."""
        data, t, dp = self.cfg.data, self.cfg.train, self.layout.dp
        source = "data.sources" if data.sources else f"data.train_path={data.train_path}"
        if len(train_ds) < t.micro_batch_size * t.grad_accum_steps * dp:
            raise ConfigError(f"{source}: its {len(train_ds)} train sequences cannot fill one batch of "
                              f"train.micro_batch_size={t.micro_batch_size} x train.grad_accum_steps="
                              f"{t.grad_accum_steps} x {dp} data-parallel ranks; add train rows or lower "
                              "train.micro_batch_size or train.grad_accum_steps")

    def _recompute_layers(self) -> Optional[int]:
        """The configured count, or for ``auto`` the fewest recomputed layers that the memory plan fits."""
        wanted = self.cfg.model.recompute_layers
        if wanted != "auto":
            return wanted
        p, t, miss = self.cfg.parallel, self.cfg.train, self.cfg.miss
        gpu_bytes = get_accelerator().total_memory()
        count = memory_plan.auto_recompute_layers(
            ModelShape.from_config(self.model_config), gpu_bytes, tp=self.layout.tp, dp=self.layout.dp,
            zero=p.zero_stage, offload=p.offload_optimizer, micro_batch=t.micro_batch_size, seq=self.cfg.data.seq_len,
            r=miss.r, mode=miss.mode, mini_r=miss.mini_r, base_precision=self.cfg.model.base_precision,
            kernels=self.cfg.model.kernels)
        logger.info("recompute_layers=auto: %d of %d layers recompute (plan for %.1f GiB)", count,
                    self.model_config.num_hidden_layers, memory_plan.AUTO_MEMORY_FRACTION * gpu_bytes / 2**30)
        return count

    def _resume(self) -> None:
        """Restore every component from the checkpoint found at start, or start at step 0 (dropping metrics lines of
        an earlier attempt of this run that saved no checkpoint)."""
        if self.resume_from is None:
            dropped = self.metrics.truncate_after(0)  # lines of an earlier attempt that saved no checkpoint
            if dropped:
                logger.warning("starting at step 0: dropped %d lines of an earlier run from %s", dropped,
                               self.metrics.path)
        else:
            self.checkpoint.resume(self.resume_from)
            self.metrics.truncate_after(self.state.step)

    # ----------------------------------------------------------------- run
    def train(self) -> int:
        """Run to ``train.max_steps``; returns the process exit code (0, or PREEMPTED_EXIT_CODE)."""
        t = self.cfg.train
        if self.finished_at is not None:
            if self.layout.is_main:
                logger.warning("%s is at step %d: the run already finished (train.max_steps=%d), nothing to do and no "
                               "file changed; raise train.max_steps to continue it", self.resume_from,
                               self.finished_at, t.max_steps)
            return 0
        reporter = Reporter(self.metrics, total_steps=t.max_steps, initial_step=self.state.step,
                            every_steps=self.cfg.logging.every_steps, progress=self.cfg.logging.progress,
                            tokens_seen=self.state.tokens_seen)
        while self.state.step < t.max_steps:
            reporter.step_started()
            lr = self.scheduler.get_last_lr()[0]  # this step's rate: the scheduler moves on within the step
            result = self.run_step()
            self.state.step += 1
            self.state.tokens_seen += result.tokens
            reporter.step_done(self.state.step, result.loss, lr, self.state.tokens_seen, self.state.skipped_batches)
            if self._due(self.cfg.eval.every_steps):
                self.evaluate()
            if self._preempted():
                reporter.close_bar()
                self.checkpoint.save()
                got = (f"{self.preemption.name} received" if self.preemption.signal is not None
                       else "another rank received a preemption signal")
                logger.warning("rank %d: %s, checkpoint saved at step %d; exiting with %d", self.layout.rank, got,
                               self.state.step, PREEMPTED_EXIT_CODE)
                return PREEMPTED_EXIT_CODE
            if self._due(self.cfg.checkpoint.every_steps):
                self.checkpoint.save()
        reporter.close_bar()
        eval_loss = self.evaluate()
        self.checkpoint.save()
        self._show_samples()
        self._finish(reporter, eval_loss)
        return 0

    def _due(self, every: int) -> bool:
        """Whether a periodic action (eval, checkpoint) falls on this step; the last step has its own."""
        return bool(every) and self.state.step % every == 0 and self.state.step < self.cfg.train.max_steps

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        """Mean loss over every sequence of the eval sets (``eval_sets``), token-weighted over all ranks; logged
        as ``loss`` of split 'eval', and with several sets (``data.sources``) each set's as ``loss/<name>``."""
        if not self.eval_sets:
            return None
        from ..data import eval_batches, loss_tokens

        self.engine.eval()
        totals = torch.zeros(len(self.eval_sets), 2, device=self.device)  # per set: loss summed over tokens, tokens
        micro = self.cfg.train.micro_batch_size
        for total, (_, sequences) in zip(totals, self.eval_sets):
            for batch in eval_batches(sequences, micro, self.layout.dp_rank, self.layout.dp, one_row=self.one_row):
                batch = {k: v.to(self.device) for k, v in batch.items()}
                n = loss_tokens(batch)  # 0 in a batch of filler rows, whose mean loss is NaN
                loss_sum = torch.where(n > 0, self.engine(**batch).loss.float() * n, 0.0)
                total += torch.stack([loss_sum, n.float()])
        self.engine.train()
        dist.all_reduce(totals)
        losses = (totals[:, 0] / totals[:, 1].clamp_min(1)).tolist()
        overall = totals.sum(0)
        loss = (overall[0] / overall[1].clamp_min(1)).item()
        per_set = {f"loss/{name}": value for (name, _), value in zip(self.eval_sets, losses)}
        self.metrics.log(self.state.step, {"loss": loss, **(per_set if len(per_set) > 1 else {})}, split="eval")
        return loss

    @torch.no_grad()
    def _show_samples(self) -> None:
        """Print the first ``eval.samples`` rows of the first eval file (``preflight.sample_file``) with the model's
        greedy answers (all ranks generate: a TP model needs its whole group)."""
        data = sample_file(self.cfg)
        if not self.cfg.eval.samples or data is None:
            return
        from ..infer.examples import read_examples
        from ..infer.generate import answer, format_samples

        examples = read_examples(data.eval_path, data, self.cfg.eval.samples, self.tokenizer.chat_template)
        self.engine.eval()
        answers = answer(self.engine.module, self.tokenizer, examples, data, max_new_tokens=data.seq_len)
        self.engine.train()
        if self.layout.is_main:
            print(f"the model's answers to {len(examples)} rows of {data.eval_path}:\n"
                  + format_samples(examples, answers), flush=True)

    def _preempted(self) -> bool:
        """Whether any rank got SIGTERM/SIGUSR1 (all ranks agree, so they save together)."""
        return any_rank(self.preemption.requested, self.device)

    def _finish(self, reporter: Reporter, eval_loss: Optional[float]) -> None:
        """Write summary.json: the Reporter's figures (see ``Reporter.summary``) and the run's own."""
        model = self.cfg.model
        reporter.summary(self.out, steps=self.state.step, tokens_seen=self.state.tokens_seen, world=self.layout.world,
                         model_config=self.model_config, seq_len=self.cfg.data.seq_len, device=self.device,
                         dtype=DTYPES[model.dtype],
                         extra={"checkpoint_gib_read": round(self.checkpoint_bytes_read / 2**30, 3),
                                "recompute_layers": self.recompute_layers, "world_size": self.layout.world,
                                "tp_size": self.layout.tp, "base_precision": base_precision(model),
                                "kernels": model.kernels, "eval_loss": eval_loss,
                                "skipped_batches": self.state.skipped_batches,
                                "padding_fraction": self.padding_fraction,
                                "trainable_params": self.report.trainable})

    def close(self) -> None:
        if self.finished_at is None:  # a finished run built nothing
            self.metrics.close()
            self.engine.destroy()


def base_precision(model: ModelConfig) -> str:
    """What the frozen base is held in: ``fp8`` (``model.base_precision``), else ``model.dtype`` (bf16 or fp32)."""
    if model.base_precision == "fp8":
        return "fp8"
    return {"bfloat16": "bf16", "float32": "fp32"}[model.dtype]


def _from_main_rank(answer: T) -> T:
    """Rank 0's ``answer`` on every rank (so that every rank resumes the checkpoint rank 0 verified)."""
    box = [answer]
    dist.broadcast_object_list(box, src=0)
    return box[0]
