"""The training job: build -> train (with eval, checkpoints, metrics) -> close. Used by ``launch/train.py``.

Order of work (torchtitan's): validate the config, start the process group, build the data (rank 0 first),
build the base model, split it for tensor parallelism, add MiSS, wrap D in a DeepSpeed engine, resume, then
run steps until ``train.max_steps`` or a preemption signal.
"""
from __future__ import annotations

import json
import logging
import resource
import time

import psutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import safe_get_full_fp32_param
from tqdm import tqdm
from transformers import AutoTokenizer

from .. import adapter_io, ds_compat, engine as miss_engine, memory_plan
from .atomic import CheckpointError, CheckpointManager, rng_state, set_rng_state
from ..data import SyntheticBatches
from ..distributed import PREEMPTED_EXIT_CODE, init_distributed
from .metrics import MetricsLogger
from .preemption import Preemption
from ..loading import build_model_on_meta, load_sharded_weights, materialize_random
from ..modeling import DTYPES, enable_recompute, hf_config
from ..run_config import RunConfig, to_dict
from .schedule import lr_lambda

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
#: Share of the accelerator's memory that ``recompute_layers: auto`` plans for (the rest: allocator slack, NCCL).
AUTO_MEMORY_FRACTION = 0.85


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. too many non-finite losses in a row)."""


class Trainer:
    """One MiSS fine-tuning run under DeepSpeed; see the module docstring for the order of work."""

    def __init__(self, cfg: RunConfig, resume: Optional[str] = None, preemption: Optional[Preemption] = None) -> None:
        self.cfg = cfg
        self.preemption = preemption or Preemption().install()
        self.info = init_distributed()
        self.rank, self.world = self.info.rank, self.info.world_size
        self.tp = cfg.parallel.tp_size
        if self.world % self.tp:
            raise ValueError(f"parallel.tp_size={self.tp} does not divide the {self.world} ranks of this job")
        self.dp, self.dp_rank, self.tp_rank = self.world // self.tp, self.rank // self.tp, self.rank % self.tp
        self.is_main = self.rank == 0
        self.out = Path(cfg.output_dir)
        self.device = torch.device(get_accelerator().current_device_name())
        torch.manual_seed(cfg.seed)
        tokenizer_dir = None if cfg.data.synthetic else cfg.tokenizer or cfg.model.path
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else None
        self.model_config = hf_config(cfg.model, vocab_size=len(self.tokenizer) if self.tokenizer else None)
        self._build_data()
        self._build_engine()
        self.checkpoints = CheckpointManager(self.out / "checkpoints", cfg.checkpoint.keep_last, self.rank,
                                             self.world, dist.barrier, self.tp)
        self.metrics = MetricsLogger(self.out, enabled=self.is_main, tensorboard=cfg.logging.tensorboard)
        self.step, self.tokens_seen, self.bad_in_row, self.bad_total = 0, 0, 0, 0
        self.step_times: list[float] = []
        self.first_step_at = 0.0
        self._resume(resume if resume is not None else cfg.checkpoint.resume)
        if self.is_main:
            (self.out / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))

    # ----------------------------------------------------------------- build
    def _build_data(self) -> None:
        data = self.cfg.data
        if data.synthetic:
            self.train_ds = self.eval_ds = None
            self.batches = SyntheticBatches(self.model_config.vocab_size, data.seq_len, self.cfg.train.micro_batch_size,
                                            self.dp_rank, seed=data.seed)
            return
        from ..data import BatchIterator, build_datasets

        # Rank 0 tokenises and fills the datasets cache; the others then read it.
        if not self.is_main:
            dist.barrier()
        self.train_ds, self.eval_ds, stats = build_datasets(data, self.tokenizer)
        if self.is_main:
            dist.barrier()
            logger.info("data: %s", stats)
        self._check_splits_fill_a_batch()
        self.batches = BatchIterator(self.train_ds, self.cfg.train.micro_batch_size, self.dp_rank, self.dp,
                                     seed=data.seed)

    def _check_splits_fill_a_batch(self) -> None:
        """Both splits must fill one global batch; for eval this would otherwise fail at the first evaluation,
        after training has run (at the end: before the final checkpoint)."""
        data, micro = self.cfg.data, self.cfg.train.micro_batch_size
        eval_source = (f"data.eval_path={data.eval_path}" if data.eval_path else
                       f"the data.eval_fraction={data.eval_fraction} hold-out of data.train_path={data.train_path}")
        for split, dataset, source in (("train", self.train_ds, f"data.train_path={data.train_path}"),
                                       ("eval", self.eval_ds, eval_source)):
            if dataset is not None and len(dataset) < micro * self.dp:
                raise ValueError(f"{source}: its {len(dataset)} {split} sequences cannot fill one batch of "
                                 f"train.micro_batch_size={micro} x {self.dp} data-parallel ranks; add {split} "
                                 "rows or lower train.micro_batch_size")

    def _build_engine(self) -> None:
        cfg = self.cfg
        self.recompute_layers: Optional[int] = None
        self.checkpoint_bytes_read = 0
        dtype = DTYPES[cfg.model.dtype]
        # Build on meta, split for TP and add MiSS there, then give each rank only its own shards.
        model = build_model_on_meta(self.model_config, dtype)
        self.report = miss_engine.prepare_model(model, cfg.miss, self.tp, cfg.parallel.tp_grain_size)
        if cfg.model.path is not None and not cfg.model.random_init:
            stats = load_sharded_weights(model, cfg.model.path, self.device, dtype, miss_config=cfg.miss)
            self.checkpoint_bytes_read = stats.bytes_read
            logger.info("rank %d read %.2f GiB of %s", self.rank, stats.bytes_read / 2**30, cfg.model.path)
        else:
            materialize_random(model, self.device, dtype, cfg.seed, miss_config=cfg.miss)
        if cfg.model.gradient_checkpointing:
            self.recompute_layers = enable_recompute(model, self._recompute_layers())
        if cfg.init_adapter:
            self._load_init_adapter(model, cfg.init_adapter)
        t = cfg.train
        schedule = lr_lambda(t.schedule, t.warmup_steps, t.max_steps, t.min_lr_ratio)
        self.engine, _, self.scheduler = miss_engine.initialize(
            model, self.deepspeed_config(), tp_size=self.tp,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
        # A plain torch optimizer (ZeRO-0, fp32) has no overflow check: the trainer checks the gradients itself.
        self._grads_unchecked = not ds_compat.checks_overflow(self.engine.optimizer)
        if self.is_main:
            logger.info("%s", self.report)

    def _recompute_layers(self) -> Optional[int]:
        """The configured count, or for ``auto`` the fewest recomputed layers that the memory plan fits."""
        wanted = self.cfg.model.recompute_layers
        if wanted != "auto":
            return wanted
        p, t = self.cfg.parallel, self.cfg.train
        budget = AUTO_MEMORY_FRACTION * get_accelerator().total_memory()
        count = memory_plan.layers_to_recompute(
            memory_plan.shape_of(self.model_config), budget, tp=self.tp, dp=self.dp, zero=p.zero_stage,
            offload=p.offload_optimizer, micro_batch=t.micro_batch_size, seq=self._seq_len(), r=self.cfg.miss.r,
            mode=self.cfg.miss.mode)
        logger.info("recompute_layers=auto: %d of %d layers recompute (plan for %.1f GiB)", count,
                    self.model_config.num_hidden_layers, budget / 2**30)
        return count

    def deepspeed_config(self) -> dict[str, Any]:
        """The DeepSpeed JSON generated from the run config (``deepspeed:`` entries are merged over it)."""
        t, p = self.cfg.train, self.cfg.parallel
        zero: dict[str, Any] = {"stage": p.zero_stage}
        if p.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": self.device.type != "cpu"}
        ds = {"train_micro_batch_size_per_gpu": t.micro_batch_size, "gradient_accumulation_steps": t.grad_accum_steps,
              "optimizer": {"type": "AdamW", "params": {"lr": t.lr, "betas": list(t.betas), "eps": t.eps,
                                                        "weight_decay": t.weight_decay, "torch_adam": True}},
              "gradient_clipping": t.grad_clip, "zero_optimization": zero, "steps_per_print": 10**12,
              "bf16": {"enabled": self.cfg.model.dtype == "bfloat16"}, "wall_clock_breakdown": False}
        return _merge(ds, self.cfg.deepspeed)

    def _load_init_adapter(self, model: torch.nn.Module, path: str) -> None:
        """Start from an existing adapter: a PEFT MiSS adapter or a miss_ds adapter/checkpoint directory."""
        source = Path(path)
        if (source / "adapter_model.safetensors").is_file():
            from ..convert.peft import read_peft_adapter

            _, full = read_peft_adapter(source)
        else:
            adapter_dir = source / "adapter" if (source / "adapter").is_dir() else source
            meta, full = adapter_io.read_full_adapter(adapter_dir)
            adapter_io.check_base(meta, model, str(adapter_dir))
        adapter_io.load_full_adapter_into(model, full, str(source))

    # ----------------------------------------------------------------- run
    def train(self) -> int:
        """Run to ``train.max_steps``; returns the process exit code (0, or PREEMPTED_EXIT_CODE)."""
        t = self.cfg.train
        bar = tqdm(total=t.max_steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=not (self.is_main and self.cfg.logging.progress))
        start, start_tokens = time.time(), self.tokens_seen
        window_t, window_tokens = time.time(), self.tokens_seen
        while self.step < t.max_steps:
            step_start = time.time()
            loss = self._train_step()
            self.step_times.append(time.time() - step_start)
            if len(self.step_times) == 1:
                self.first_step_at = time.time() - psutil.Process().create_time()
            self.step += 1
            bar.update(1)
            if self.step % self.cfg.logging.every_steps == 0 or self.step == t.max_steps:
                now = time.time()
                tok_s = (self.tokens_seen - window_tokens) / max(now - window_t, 1e-9)
                window_t, window_tokens = now, self.tokens_seen
                lr = self.scheduler.get_last_lr()[0]
                self.metrics.log(self.step, {"loss": loss, "lr": lr, "tokens_per_s": tok_s,
                                             "tokens": self.tokens_seen, "skipped_batches": self.bad_total})
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
            if self.cfg.eval.every_steps and self.step % self.cfg.eval.every_steps == 0 and self.step < t.max_steps:
                self.evaluate()
            if self._preempted():
                bar.close()
                self.save()
                logger.warning("rank %d: signal %s received, checkpoint saved at step %d; exiting with %d",
                               self.rank, self.preemption.signal, self.step, PREEMPTED_EXIT_CODE)
                return PREEMPTED_EXIT_CODE
            if self.cfg.checkpoint.every_steps and self.step % self.cfg.checkpoint.every_steps == 0 \
                    and self.step < t.max_steps:
                self.save()
        bar.close()
        eval_loss = self.evaluate()
        self.save()
        self._finish(time.time() - start, self.tokens_seen - start_tokens, eval_loss)
        return 0

    def _train_step(self) -> float:
        """One optimizer step over ``grad_accum_steps`` micro-batches; returns the mean loss over DP ranks.

        A micro-batch with a non-finite loss is skipped before backward. Non-finite gradients (with a finite
        loss) make DeepSpeed skip the optimizer step (``skipped_steps``; for ZeRO-0 fp32, whose plain torch
        optimizer has no such check, ``_optimizer_step`` does it): that discards the whole accumulation
        window, so its losses are dropped too and the window starts again. Both count as skipped batches.
        """
        losses = []
        while len(losses) < self.cfg.train.grad_accum_steps:
            batch = {k: v.to(self.device) for k, v in next(self.batches).items()}
            loss = self.engine(**batch).loss
            if not self._all_finite(loss):
                self._skip_bad_batch("loss")
                continue
            self.engine.backward(loss)
            skipped = self.engine.skipped_steps
            self._optimizer_step()
            # One all-reduce: did any rank's optimizer skip the step, and how many tokens went in.
            stats = torch.stack([torch.tensor(float(self.engine.skipped_steps != skipped), device=self.device),
                                 batch["attention_mask"].sum().float()])
            dist.all_reduce(stats)
            if stats[0].item() > 0:
                losses.clear()
                self._skip_bad_batch("gradients")
                continue
            self.bad_in_row = 0
            losses.append(loss.detach().float())
            self.tokens_seen += int(stats[1].item()) // self.tp
        mean = torch.stack(losses).mean()
        dist.all_reduce(mean)
        return mean.item() / self.world

    def _all_finite(self, *tensors: torch.Tensor) -> bool:
        """Whether every given tensor is finite on every rank."""
        finite = torch.stack([torch.isfinite(t).all() for t in tensors]).all() if tensors else torch.tensor(True)
        bad = (~finite).float().reshape(1).to(self.device)  # one host sync, in .item() below
        dist.all_reduce(bad)
        return bad.item() == 0

    def _optimizer_step(self) -> None:
        """``engine.step()``. DeepSpeed's ZeRO and bf16 optimizers skip a step with non-finite gradients
        themselves (``skipped_steps`` grows, the LR schedule holds); the plain torch optimizer of ZeRO-0 fp32
        has no such check and would write NaN into D. So for it the trainer checks the gradients at the
        accumulation boundary and, if a rank has a non-finite one, has DeepSpeed take its overflow path."""
        if not self._grads_unchecked or not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()
            return
        grads = [p.grad for p in self.engine.module.parameters() if p.requires_grad and p.grad is not None]
        if self._all_finite(*grads):
            self.engine.step()
        else:
            ds_compat.step_without_update(self.engine)

    def _skip_bad_batch(self, what: str) -> None:
        self.bad_in_row += 1
        self.bad_total += 1
        skipped = "micro-batch skipped" if what == "loss" else "optimizer step skipped, its micro-batches dropped"
        logger.warning("step %d: non-finite %s on some rank; %s (%d in a row)", self.step + 1, what, skipped,
                       self.bad_in_row)
        if self.bad_in_row >= self.cfg.train.max_bad_steps:
            raise TrainingStopped(
                f"{self.bad_in_row} micro-batches in a row gave a non-finite loss or gradients (train.max_bad_steps="
                f"{self.cfg.train.max_bad_steps}; the last: non-finite {what}) at step {self.step + 1}: lower "
                "train.lr, check the data, or resume from the last checkpoint")

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        """Mean loss over the held-out split (token-weighted, summed over DP ranks); logged as split 'eval'."""
        if self.eval_ds is None:
            return None
        self.engine.eval()
        total = torch.zeros(2, device=self.device)
        from ..data import eval_batches

        for i, batch in enumerate(eval_batches(self.eval_ds, self.cfg.train.micro_batch_size, self.dp_rank, self.dp)):
            if self.cfg.eval.max_batches and i >= self.cfg.eval.max_batches:
                break
            batch = {k: v.to(self.device) for k, v in batch.items()}
            n = (batch["labels"][:, 1:] != -100).sum()
            total += torch.stack([self.engine(**batch).loss.float() * n, n.float()])
        self.engine.train()
        dist.all_reduce(total)
        loss = (total[0] / total[1].clamp_min(1)).item()
        self.metrics.log(self.step, {"loss": loss}, split="eval")
        return loss

    # ----------------------------------------------------------------- checkpoints
    def save(self) -> Path:
        """A complete checkpoint of this step (atomic: it is on disk whole, or not at all)."""
        meta = {"tp_size": self.tp, "world_size": self.world, "step": self.step}
        return self.checkpoints.save(self.step, self._write_checkpoint, meta)

    def _write_checkpoint(self, directory: Path) -> None:
        # Collective calls first, in the same order on every rank.
        self.engine.save_checkpoint(str(directory / "engine"), tag="state", save_latest=False,
                                    exclude_frozen_parameters=True)
        masters = {}
        for name, param in adapter_io.adapter_parameters(self.engine.module, self.cfg.miss).items():
            full = safe_get_full_fp32_param(param)  # the fp32 master (None when DeepSpeed keeps none)
            masters[name] = param if full is None else full
        adapter = directory / "adapter"
        adapter.mkdir(parents=True, exist_ok=True)
        if self.dp_rank == 0:
            adapter_io.write_adapter_shard(adapter, masters, self.tp_rank, self.tp)
        rng = directory / "rng"
        rng.mkdir(exist_ok=True)
        torch.save(rng_state(), rng / f"rank{self.rank:05d}.pt")
        if self.is_main:
            adapter_io.write_adapter_config(adapter, self.cfg.miss, self.engine.module, self.tp)
            state = {"step": self.step, "tokens_seen": self.tokens_seen, "skipped_batches": self.bad_total,
                     "tp_size": self.tp, "world_size": self.world, "data": self.batches.state_dict(),
                     "config": to_dict(self.cfg)}
            (directory / TRAINER_STATE).write_text(json.dumps(state, indent=1))

    def _resume(self, resume: Optional[str]) -> None:
        path = self._resolve_checkpoint(resume)
        if path is None:
            if resume not in (None, "auto"):
                raise FileNotFoundError(f"--resume {resume}: no such checkpoint")
            dropped = self.metrics.truncate_after(0)  # lines of an earlier attempt that saved no checkpoint
            if dropped:
                logger.warning("starting at step 0: dropped %d lines of an earlier run from %s", dropped,
                               self.metrics.path)
            return
        state = json.loads((path / TRAINER_STATE).read_text())
        # Whatever the layout: a checkpoint of another base model is refused by name, not by a shape error.
        adapter_io.check_base(adapter_io.read_adapter_config(path / "adapter"), self.engine.module, str(path))
        if state["tp_size"] == self.tp and state["world_size"] == self.world:
            self.engine.load_checkpoint(str(path / "engine"), tag="state", load_module_strict=False,
                                        load_optimizer_states=True, load_lr_scheduler_states=True)
            rng_file = path / "rng" / f"rank{self.rank:05d}.pt"
            set_rng_state(torch.load(rng_file, weights_only=False))
        else:
            saved_model = state.get("config", {}).get("model", {})
            if state["tp_size"] != self.tp and (_random_base(saved_model) or _random_base(to_dict(self.cfg)["model"])):
                raise ValueError(
                    f"cannot resume {path} (written with tp_size={state['tp_size']}) with parallel.tp_size={self.tp}: "
                    "the base model has random weights (model.path null or model.random_init), drawn per "
                    "tensor-parallel shard, so another tp_size builds another base and D would not fit it. Resume "
                    f"with parallel.tp_size={state['tp_size']}, or train on a base checkpoint (model.path)")
            # Another layout: D carries over (the adapter is TP-independent); optimizer state starts afresh.
            _, full = adapter_io.read_full_adapter(path / "adapter")
            adapter_io.load_full_adapter_into(self.engine.module, full, str(path))
            self.scheduler.last_epoch = state["step"]
            logger.warning("resuming %s written by tp_size=%d on %d ranks with tp_size=%d on %d ranks: D is "
                           "loaded, optimizer state restarts", path, state["tp_size"], state["world_size"],
                           self.tp, self.world)
        self.batches.load_state_dict(state["data"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.bad_total = state.get("skipped_batches", 0)
        self.metrics.truncate_after(self.step)
        if self.is_main:
            logger.info("resumed from %s at step %d", path, self.step)

    def _resolve_checkpoint(self, resume: Optional[str]) -> Optional[Path]:
        """The checkpoint to resume from. Rank 0 checks every file's sha256 (sizes alone miss a flipped byte;
        ``auto`` then falls back to an older checkpoint) and the other ranks take its answer, so every rank
        loads the same checkpoint and it is hashed once."""
        if resume is None:
            return None
        answer: list[Optional[str]] = [None, None]  # path, error
        failure: Optional[Exception] = None
        if self.is_main:
            try:
                path = self.checkpoints.resolve(resume, full=True)
                answer[0] = None if path is None else str(path)
            except Exception as exc:  # noqa: BLE001 - the other ranks must hear of it, or they wait forever
                failure, answer[1] = exc, str(exc)
        dist.broadcast_object_list(answer, src=0)
        if failure is not None:
            raise failure
        if answer[1] is not None:
            raise CheckpointError(answer[1])
        return None if answer[0] is None else Path(answer[0])

    # ----------------------------------------------------------------- preemption and end
    def _preempted(self) -> bool:
        """Whether any rank got SIGTERM/SIGUSR1 (all ranks agree, so they save together)."""
        flag = torch.tensor([1.0 if self.preemption.requested else 0.0], device=self.device)
        dist.all_reduce(flag)
        return flag.item() > 0

    def _finish(self, seconds: float, tokens: int, eval_loss: Optional[float]) -> None:
        peak = (get_accelerator().max_memory_allocated() if self.device.type != "cpu"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        timed = sorted(self.step_times[2:] or self.step_times)  # the first steps include warm-up
        step_s = timed[len(timed) // 2]
        step_tokens = self.cfg.train.micro_batch_size * self.cfg.train.grad_accum_steps * self.dp * self._seq_len()
        summary = {"steps": self.step, "tokens": tokens, "seconds": round(seconds, 2),
                   "tokens_per_s": round(tokens / max(seconds, 1e-9), 1), "step_s_median": round(step_s, 4),
                   "tokens_per_s_per_gpu": round(step_tokens / step_s / self.world, 1),
                   "mfu": round(self._mfu(step_tokens / step_s / self.world), 4),
                   "first_step_s": round(self.first_step_at, 1), "peak_memory_gib": round(peak / 2**30, 3),
                   "peak_host_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                   "checkpoint_gib_read": round(self.checkpoint_bytes_read / 2**30, 3),
                   "recompute_layers": self.recompute_layers,
                   "world_size": self.world, "tp_size": self.tp, "eval_loss": eval_loss,
                   "skipped_batches": self.bad_total, "trainable_params": self.report.trainable}
        if self.is_main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
            self.metrics.plot_losses(self.out / "loss.png")
            print("summary: " + json.dumps(summary), flush=True)

    def _seq_len(self) -> int:
        return self.cfg.data.seq_len

    def _mfu(self, tokens_per_s_per_gpu: float) -> float:
        """Model FLOPs utilisation of a frozen-base fine-tune; see ``miss_ds.flops``."""
        from ..flops import frozen_finetune_flops_per_token, peak_flops

        return tokens_per_s_per_gpu * frozen_finetune_flops_per_token(self.model_config, self._seq_len()) \
            / peak_flops(self.device, DTYPES[self.cfg.model.dtype])

    def close(self) -> None:
        self.metrics.close()
        self.engine.destroy()


def _random_base(model: dict[str, Any]) -> bool:
    """Whether a run config's ``model`` section builds random base weights (they depend on the TP layout)."""
    return bool(model) and (model.get("path") is None or bool(model.get("random_init")))


def _merge(base: dict, extra: dict) -> dict:
    """Recursive dict merge: ``extra`` wins."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
