"""miss_ds: MiSS (Matrix Shard Sharing) fine-tuning for DeepSpeed, with tensor-parallel-aware adapters.

Single device::

    from miss_ds import MissConfig, apply_miss
    report = apply_miss(model, MissConfig(r=64))          # only D trains

Tensor parallel (DeepSpeed AutoTP layers)::

    from miss_ds.parallel.autotp import shard_model
    shard_model(model, tp_group); apply_miss(model, MissConfig(r=64))
"""
from .config import MissConfig
from .functional import MissShapeError
from .inject import adapter_state_dict, apply_miss, load_adapter_state_dict, merge_and_unload, miss_layers
from .layers import MissLinear

__all__ = ["MissConfig", "MissShapeError", "MissLinear", "apply_miss", "adapter_state_dict",
           "load_adapter_state_dict", "merge_and_unload", "miss_layers"]
__version__ = "0.1.0"
