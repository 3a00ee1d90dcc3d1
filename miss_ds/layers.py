"""Single-device MiSS linear layer: a frozen weight plus a trainable D."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import functional as MF
from .config import MissConfig


class MissLinear(nn.Module):
    """``y = x W'^T + b`` where W' is W adapted by MiSS; W and b stay frozen, only ``miss_block`` (D) trains.

    The layer takes over the wrapped ``nn.Linear``'s weight and bias parameters (the same tensors, so the
    model's state-dict keys for them do not change) and adds ``miss_block``.
    """

    def __init__(self, base: nn.Linear, config: MissConfig, name: str = "") -> None:
        super().__init__()
        out_features, in_features = base.weight.shape
        MF.check_layer(name, config.mode, config.r, config.mini_r, in_features, out_features)
        self.in_features, self.out_features = in_features, out_features
        self.geometry = MF.MissGeometry(config.mode, config.r, config.mini_r, in_features, out_features)
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.miss_block = nn.Parameter(_new_d(self.geometry, config, self.weight))
        self.dropout = nn.Dropout(config.dropout) if config.dropout else None
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        y = MF.adapted_linear(x, self.weight, self.miss_block, self.geometry, self.dropout)
        return y if self.bias is None else y + self.bias

    @torch.no_grad()
    def merge(self, safe: bool = True) -> None:
        """Fold D into the weight (inference, export). ``safe`` refuses a merge that produces inf/NaN."""
        if self.merged:
            return
        merged = MF.merge(self.weight, self.miss_block, self.geometry)
        if safe and not torch.isfinite(merged).all():
            raise ValueError(f"merging MiSS into a {tuple(self.weight.shape)} weight produced inf/NaN: D is broken")
        self.weight.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the frozen weight from a merged one."""
        if self.merged:
            self.weight.copy_(MF.unmerge(self.weight, self.miss_block, self.geometry))
            self.merged = False

    def merged_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding W' (this layer is left unchanged)."""
        weight = self.weight if self.merged else MF.merge(self.weight, self.miss_block, self.geometry)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device="meta", dtype=self.weight.dtype)
        linear.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return linear

    def extra_repr(self) -> str:
        g = self.geometry
        mini = f", mini_r={g.mini_r}" if g.mode == "mini" else ""
        return f"in={g.in_features}, out={g.out_features}, mode={g.mode}, r={g.r}{mini}, merged={self.merged}"


def _new_d(geometry: MF.MissGeometry, config: MissConfig, weight: torch.Tensor) -> torch.Tensor:
    """D on the weight's device, in fp32 or the weight's dtype as the config asks."""
    dtype = torch.float32 if config.adapter_dtype == "float32" else weight.dtype
    return MF.init_d(geometry, zeros=config.init_weights, dtype=dtype, device=weight.device)
