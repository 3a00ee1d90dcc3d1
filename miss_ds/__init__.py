"""miss_ds: MiSS (Matrix Shard Sharing) fine-tuning for DeepSpeed, with tensor-parallel-aware adapters.

Single device::

    from miss_ds import MissConfig, apply_miss
    report = apply_miss(model, MissConfig(r=64))          # only D trains

Tensor parallel (DeepSpeed AutoTP layers)::

    from miss_ds.parallel.autotp import shard_model
    shard_model(model, tp_group); apply_miss(model, MissConfig(r=64))
"""
from __future__ import annotations

import importlib
from typing import Any

#: Public name -> submodule. Imported on first use, so that ``miss_ds.train.preemption`` (the first import of
#: launch/train.py, whose signal handler must be in place within milliseconds) does not pull in torch.
_EXPORTS = {"MissConfig": "config", "MissShapeError": "functional", "MissLinear": "layers",
            "load_full_adapter_into": "adapter_io",
            **{name: "inject" for name in ("apply_miss", "adapter_state_dict", "merge_and_unload", "miss_layers")}}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'miss_ds' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
