"""Run ``miss_ds.train.trainer.Trainer`` in this process, one scenario after another, with faults no config can cause.

    python tests/dist/reliability_trainer.py --scenarios '[{"name": "nan", "overrides": [...], ...}, ...]'

One process, one rank (``init_distributed`` starts a one-rank gloo group); a subprocess of the tests because
the process group and the exported RANK/MASTER_PORT variables are process-wide. Scenario keys:

    name        key of its outcome
    overrides   ``--set`` entries over configs/tiny-cpu.yaml (output_dir among them)
    resume      as ``--resume`` (optional)
    nan_loss    1-based indices of training forward calls whose loss is made NaN
    nan_grad    indices of calls whose loss stays finite but back-propagates NaN gradients
    copy        [src, dst]: copy a directory tree first (damage a copy, not the original)
    truncate    a glob pattern (``**`` allowed) matching one file to cut to half its size, after ``copy``
    flip        such a pattern of one file in which to invert one byte in the middle (same size), after ``copy``
    stale_metrics  write this many train lines into <output_dir>/metrics.jsonl first, as an attempt killed
                before its first checkpoint leaves them

Prints ``RESULT {name: outcome}``; an outcome has ``error_type`` and ``error`` (None when training finished),
``step`` reached, ``d_finite`` (every trainable tensor finite at the end), ``shm_left`` (whether this rank's
/dev/shm all-reduce segment still has a name once the Trainer is built), and ``log``: the messages of
miss_ds's loggers (INFO and up) and of any other logger (WARNING and up).
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import shutil
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from miss_ds.distributed import exit_process  # noqa: E402
from miss_ds.ds_compat import cpu_shm_segment  # noqa: E402
from miss_ds.run_config import load_config  # noqa: E402
from miss_ds.train.trainer import Trainer  # noqa: E402

CONFIG = ROOT / "configs" / "tiny-cpu.yaml"


class _NanGrad(torch.autograd.Function):
    """Identity forward; NaN gradient backward (a finite loss with non-finite gradients)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class _Log(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}")


def _inject(trainer: Trainer, nan_loss: set[int], nan_grad: set[int]) -> None:
    """Wrap the engine's forward so chosen training micro-batches return a NaN loss or NaN gradients."""
    forward, calls = trainer.engine.forward, [0]

    def wrapped(*args, **kwargs):
        out = forward(*args, **kwargs)
        if trainer.engine.module.training:
            calls[0] += 1
            if calls[0] in nan_loss:
                out.loss = out.loss * float("nan")
            elif calls[0] in nan_grad:
                out.loss = _NanGrad.apply(out.loss)
        return out

    trainer.engine.forward = wrapped


def _shm_segment() -> Path:
    """This rank's segment of DeepSpeed's CPU all-reduce (named by the rendezvous the process group used)."""
    return cpu_shm_segment(os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"), 0)


def _one_file(pattern: str) -> Path:
    """The one file ``pattern`` matches (a damage scenario that hits no file, or several, is a broken test)."""
    matches = glob.glob(pattern, recursive=True)
    if len(matches) != 1:
        raise ValueError(f"{len(matches)} files match {pattern}, not one: {matches}")
    return Path(matches[0])


def _prepare(scenario: dict) -> None:
    if "copy" in scenario:
        src, dst = scenario["copy"]
        shutil.copytree(src, dst)
    if "truncate" in scenario:
        path = _one_file(scenario["truncate"])
        os.truncate(path, path.stat().st_size // 2)
    if "flip" in scenario:
        path = _one_file(scenario["flip"])
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    if "stale_metrics" in scenario:
        out = Path(next(o.split("=", 1)[1] for o in scenario["overrides"] if o.startswith("output_dir=")))
        out.mkdir(parents=True)
        lines = [{"step": step, "split": "train", "time": 0.0, "loss": 99.0}
                 for step in range(1, scenario["stale_metrics"] + 1)]
        (out / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def run(scenario: dict, log: _Log) -> dict:
    log.messages.clear()
    _prepare(scenario)
    outcome: dict = {"error_type": None, "error": None, "step": None, "d_finite": None, "shm_left": None}
    trainer = None
    try:
        cfg = load_config(CONFIG, ["logging.progress=false", "logging.tensorboard=false", *scenario["overrides"]])
        trainer = Trainer(cfg, resume=scenario.get("resume"))
        outcome["shm_left"] = _shm_segment().exists()
        _inject(trainer, set(scenario.get("nan_loss", ())), set(scenario.get("nan_grad", ())))
        outcome["exit"] = trainer.train()
    except Exception as exc:  # noqa: BLE001 - reported to the test
        outcome.update(error_type=type(exc).__name__, error=str(exc), traceback=traceback.format_exc()[-3000:])
    if trainer is not None:
        outcome["step"] = trainer.step
        outcome["d_finite"] = all(bool(torch.isfinite(p).all()) for p in trainer.engine.module.parameters()
                                  if p.requires_grad)
        trainer.close()
    outcome["log"] = list(log.messages)
    return outcome


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenarios", required=True, help="JSON list of scenarios (see the module docstring)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("miss_ds").setLevel(logging.INFO)
    log = _Log()
    logging.getLogger().addHandler(log)
    results = {s["name"]: run(s, log) for s in json.loads(args.scenarios)}
    print("RESULT " + json.dumps(results), flush=True)
    exit_process(0)


if __name__ == "__main__":
    main()
