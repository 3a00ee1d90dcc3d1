"""Fused kernels for the model's own layers (``model.kernels: liger``): Liger Kernel's Triton RMSNorm, rotary
embedding, SwiGLU (GeGLU for Gemma) and fused linear cross-entropy in place of transformers' eager PyTorch code.

Why: with the frozen GEMMs fast (FP8 base, docs/scale.md), what is left of a step is mostly the model's unfused
elementwise work (the norms' fp32 round trips, rotate-half's copies, SiLU and the product of gate and up, the fp32
logits of the loss), which every pass reads and writes at memory bandwidth. Why a library: Liger Kernel
(``pip install liger-kernel``) is what fast fine-tuning stacks use for exactly these, kept up with transformers'
model code family by family; miss_ds's own kernels are only the MiSS and FP8 ones. The MiSS layers are untouched:
Liger's MLP and attention call the projections as modules, which are MiSS layers (or their TP shards).

Which families take them is :attr:`miss_ds.families.Family.liger` (each is tested against transformers' code on
a GPU: ``tests/test_fused_kernels_gpu.py``). Liger's Triton kernels need a CUDA GPU: anything else is refused
before the model is built.
"""
from __future__ import annotations

import importlib.util
import sys
from typing import Any, Optional

from torch import nn

from .families import FAMILIES

#: What ``liger`` replaces, as Liger's per-family functions name it (each takes the ones its family has).
LIGER_PARTS = {"rope": True, "rms_norm": True, "swiglu": True, "geglu": True, "layer_norm": True,
               "fused_linear_cross_entropy": True, "cross_entropy": False}


def kernels_problem(kernels: str, model_type: Optional[str], device_type: str) -> Optional[str]:
    """Why ``model.kernels`` cannot be used for this model type on this device; None if it can."""
    if kernels == "hf":
        return None
    family = FAMILIES.get(model_type)
    if family is None or not family.liger:
        tested = ", ".join(t for t, f in FAMILIES.items() if f.liger)
        return (f"model.kernels=liger has no tested kernels for model_type {model_type!r} (tested: {tested}): set "
                "model.kernels=hf")
    if device_type != "cuda":
        return (f"model.kernels=liger runs Triton kernels, which need a CUDA GPU; this run's device is {device_type}: "
                "set model.kernels=hf")
    if importlib.util.find_spec("liger_kernel") is None:
        return ("model.kernels=liger needs the liger-kernel package, which is not installed: pip install -c "
                "constraints.txt -e '.[liger]' (or pip install liger-kernel), or set model.kernels=hf")
    return None


def apply_kernels(model: nn.Module, kernels: str) -> Optional[str]:
    """Put ``kernels``' versions of the model's norms, rotary embedding, MLP activation and loss in place (on the
    instance; Liger also swaps the family's module-level functions, so models of this family built later in the
    same process use them too). Returns what was done, for the log; None for ``hf``."""
    if kernels == "hf":
        return None
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    modeling = sys.modules[type(model).__module__]
    rope = getattr(modeling, "apply_rotary_pos_emb", None)
    before = {name: _forward_of(module) for name, module in model.named_modules()}
    _apply_liger_kernel_to_instance(model=model, **LIGER_PARTS)
    changed = sorted({type(module).__name__ for name, module in model.named_modules()
                      if _forward_of(module) is not before.get(name)})
    if getattr(modeling, "apply_rotary_pos_emb", None) is not rope:
        changed.append("apply_rotary_pos_emb")
    return f"Liger kernels on {model.config.model_type}: {', '.join(changed)} replaced"


def _forward_of(module: nn.Module) -> Any:
    """The function a module's forward runs (an instance attribute set by Liger, else the class's)."""
    bound = module.__dict__.get("forward")
    return getattr(bound, "__func__", bound) if bound is not None else type(module).forward
