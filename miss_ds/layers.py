"""The MiSS layer: a frozen linear weight (or this rank's shard of it) plus a trainable D.

:class:`MissLayer` carries everything every MiSS layer has: the full and the local geometry, how the frozen
weight is split over the tensor-parallel group (:class:`Sharding`), how the local D relates to the full D
(:class:`DLayout`), D's initialisation, merging and the forward pass. :class:`MissLinear` is the single-device
case (one shard, no group); the column- and row-parallel layers (:mod:`miss_ds.parallel.layers`) add only what
differs: where their shard sits, which D they split, and their communication. Both the weight's split and D's are
a :class:`Split`: one contiguous range per rank, or, for a fused projection (Phi-3's ``qkv_proj``), one range of
each fused part per rank. The frozen weight can be replaced by an FP8 copy of it (:meth:`MissLayer.to_fp8`,
``model.base_precision: fp8``): the layer then trains against that copy and refuses to merge into it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from . import functional as MF
from .config import MissConfig
from .fp8 import FP8Weight

if TYPE_CHECKING:
    from .shared_input import SharedInput

#: Parameter name of D in every MiSS layer (PEFT's name, so adapter keys line up with PEFT's).
D_NAME = "miss_block"

Style = Literal["none", "column", "row"]


@dataclass(frozen=True)
class Split:
    """How one dimension of a tensor is divided over the ranks of a group.

    ``parts`` holds, for each part of the dimension in order, that part's shard sizes in rank order. A plain split
    has one part. A fused projection (Phi-3's ``qkv_proj`` = [q; k; v]) has one part per fused projection, each
    split as that projection alone would be: a rank holds its shard of every part, concatenated in part order (the
    layout Megatron and DeepSpeed give a fused QKV), so its shard is a list of ranges of the full dimension.
    """

    parts: tuple[tuple[int, ...], ...] = ()

    @classmethod
    def contiguous(cls, sizes: Sequence[int]) -> Split:
        """One contiguous range per rank, of ``sizes`` in rank order."""
        return cls((tuple(sizes),))

    @property
    def ranks(self) -> int:
        return len(self.parts[0]) if self.parts else 0

    @property
    def sizes(self) -> tuple[int, ...]:
        """What each rank holds, in rank order."""
        return tuple(sum(part[rank] for part in self.parts) for rank in range(self.ranks))

    @property
    def full(self) -> int:
        return sum(sum(part) for part in self.parts)

    def ranges(self, rank: int) -> tuple[tuple[int, int], ...]:
        """The ``(start, stop)`` ranges of the full dimension that ``rank`` holds, in the order it holds them."""
        out, offset = [], 0
        for part in self.parts:
            start = offset + sum(part[:rank])
            if part[rank]:
                out.append((start, start + part[rank]))
            offset += sum(part)
        return tuple(out)

    def scaled(self, unit: int) -> Split:
        """The same split counted in units of ``unit`` features (``bat``'s r x r blocks)."""
        return Split(tuple(tuple(size // unit for size in part) for part in self.parts))

    def take(self, full: torch.Tensor, dim: int, rank: int) -> torch.Tensor:
        """Rank ``rank``'s shard of ``full`` (a view when it is one range)."""
        pieces = [full.narrow(dim, start, stop - start) for start, stop in self.ranges(rank)]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)

    def join(self, shards: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
        """The full tensor from every rank's shard (the inverse of :meth:`take`)."""
        return assemble([(shard, Span(dim, self.ranges(rank), self.full)) for rank, shard in enumerate(shards)])


@dataclass(frozen=True)
class Span:
    """Where a shard sits in its full tensor: the ``ranges`` of ``full`` along ``dim`` it holds, in order."""

    dim: int
    ranges: tuple[tuple[int, int], ...]
    full: int

    def local(self, index: int) -> Optional[int]:
        """Where the full tensor's ``index`` along ``dim`` sits in this shard; None when the shard does not hold it."""
        offset = 0
        for start, stop in self.ranges:
            if start <= index < stop:
                return offset + index - start
            offset += stop - start
        return None


def assemble(shards: Sequence[tuple[torch.Tensor, "Span"]]) -> torch.Tensor:
    """The full tensor from every rank's shard and its span (fused parts and uneven splits included)."""
    first, span = shards[0]
    shape = list(first.shape)
    shape[span.dim] = span.full
    full = first.new_empty(shape)
    for shard, span in shards:
        offset = 0
        for start, stop in span.ranges:
            full.narrow(span.dim, start, stop - start).copy_(shard.narrow(span.dim, offset, stop - start))
            offset += stop - start
    return full


@dataclass(frozen=True)
class Sharding:
    """How a linear's frozen weight is split over its tensor-parallel group.

    ``column``: along out (dim 0 of weight and bias). ``row``: along in (dim 1 of the weight; the bias is added
    after the all-reduce, so every rank holds all of it). ``none``: not split.
    """

    style: Style = "none"
    split: Split = Split()
    rank: int = 0
    group: Optional[ProcessGroup] = None

    @property
    def sizes(self) -> tuple[int, ...]:
        """The features along the split dimension each rank holds, in rank order (empty when not split)."""
        return self.split.sizes

    @property
    def offset(self) -> int:
        """Index of this rank's first feature along the split dimension."""
        ranges = self.split.ranges(self.rank)
        return ranges[0][0] if ranges else 0

    def span(self, attr: str) -> Optional[Span]:
        """Where this rank's ``weight`` or ``bias`` sits in the full tensor; None when the rank holds all of it."""
        if self.style == "none" or (self.style == "row" and attr == "bias"):
            return None
        return Span(dim=0 if self.style == "column" else 1, ranges=self.split.ranges(self.rank), full=self.split.full)


@dataclass(frozen=True)
class DLayout:
    """How a layer's local D relates to the full D: split along ``dim`` as ``split`` says, or whole on every rank
    (``dim`` None)."""

    dim: Optional[int] = None
    split: Optional[Split] = None

    @property
    def replicated(self) -> bool:
        return self.dim is None

    @property
    def sizes(self) -> Optional[tuple[int, ...]]:
        return None if self.split is None else self.split.sizes

    def part(self, full: torch.Tensor, rank: int) -> torch.Tensor:
        """Rank ``rank``'s part of ``full`` (``full`` itself when replicated)."""
        return full if self.dim is None else self.split.take(full, self.dim, rank)

    def join(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """The full D from every rank's part, in rank order."""
        return parts[0] if self.dim is None else self.split.join(parts, self.dim)

    def to_json(self) -> dict:
        """The adapter file's form: ``{"dim": 0 | 1 | None, "sizes": [...] | None}`` with what each rank holds, plus
        ``"parts"`` (each part's sizes in rank order) for the D of a fused projection."""
        out = {"dim": self.dim, "sizes": None if self.split is None else list(self.split.sizes)}
        if self.split is not None and len(self.split.parts) > 1:
            out["parts"] = [list(part) for part in self.split.parts]
        return out

    @classmethod
    def from_json(cls, layout: dict) -> DLayout:
        if layout["dim"] is None:
            return cls()
        parts = layout.get("parts") or [layout["sizes"]]
        return cls(layout["dim"], Split(tuple(tuple(part) for part in parts)))


class MissLayer(nn.Module):
    """``y = x W'^T + b`` where W' is W adapted by MiSS; W and b stay frozen, only ``miss_block`` (D) trains.

    The layer takes over the base layer's weight and bias parameters (the same tensors, so the model's state-dict
    keys for them do not change) and adds ``miss_block``. This class is the single-device case; subclasses split
    the weight (``style``) and override ``_local_geometry``, ``_d_layout`` and ``product`` (their communication).
    """

    style: Style = "none"

    def __init__(self, weight: nn.Parameter, bias: Optional[nn.Parameter], *, config: MissConfig, name: str,
                 full_shape: tuple[int, int], split: Split = Split(), tp_rank: int = 0,
                 group: Optional[ProcessGroup] = None) -> None:
        super().__init__()
        out_full, in_full = full_shape
        MF.check_layer(name, config.mode, config.r, config.mini_r, in_full, out_full)
        self.name = name
        self.sharding = Sharding(self.style, split, tp_rank, group)
        self.full_geometry = MF.MissGeometry(config.mode, config.r, config.mini_r, in_full, out_full)
        self._check_shards()
        self.geometry = self._local_geometry()
        self.d_layout = self._d_layout()
        self.weight, self.bias = weight, bias
        for p in (weight, bias):
            if p is not None:
                p.requires_grad_(False)
        dtype = torch.float32 if config.adapter_dtype == "float32" else weight.dtype
        self.miss_block = nn.Parameter(self.draw_d(zeros=config.init_weights, dtype=dtype, device=weight.device))
        # Megatron's and DeepSpeed's mark for a TP-split parameter: gradient norms count every shard once,
        # and replicated parameters once per TP group.
        self.miss_block.tensor_model_parallel = not self.d_layout.replicated
        self.dropout = nn.Dropout(config.dropout) if config.dropout else None
        self.merged = False
        self.siblings: Optional[SharedInput] = None
        """The layers that read the same input (q, k, v): their products are computed together
        (:mod:`miss_ds.shared_input`); set by ``apply_miss`` from the model family."""
        self.base_fp8: Optional[FP8Weight] = None
        """The frozen weight in FP8 once :meth:`to_fp8` replaced it (``weight`` is then None). A plain attribute,
        not a parameter or buffer: module casts (DeepSpeed's bf16 cast of every floating parameter) leave it be."""
        self._base_samples: dict[tuple[int, int], torch.Tensor] = {}

    def _local_geometry(self) -> MF.MissGeometry:
        """The geometry of this rank's shard (offsets into the full weight)."""
        return self.full_geometry

    def _d_layout(self) -> DLayout:
        return DLayout()

    def _check_shards(self) -> None:
        """Shards the mode cannot carry. ``bat`` works on whole r x r blocks, so every shard boundary must fall on a
        block boundary. ``mini`` tiles its (r, mini_r) D along out from the shard's first feature: a fused shard's
        later ranges must continue that tiling (they do when mini_r divides every part's shard sizes)."""
        g, s = self.full_geometry, self.sharding
        dim = "out_features" if s.style == "column" else "in_features"
        fused = f" (fused parts {[list(p) for p in s.split.parts]})" if len(s.split.parts) > 1 else ""
        where = f"module '{self.name}' ({s.style}-parallel, {dim} shards {list(s.sizes)}{fused})"
        if g.mode == "bat" and any(size % g.r for part in s.split.parts for size in part):
            raise MF.MissShapeError(
                f"miss.mode='bat' with r={g.r} cannot split {where}: every shard must be a multiple of r. Use an r "
                f"dividing all shards, or set parallel.tp_grain_size to a multiple of {g.r}")
        if g.mode == "mini" and s.style == "column" and not _tiles_continue(s.split, g.mini_r):
            raise MF.MissShapeError(
                f"miss.mode='mini' with mini_r={g.mini_r} cannot split {where}: a rank's ranges of the fused parts "
                f"would not continue one mini_r tiling. Use a mini_r dividing every part's shard sizes")

    def shard_d(self, full_d: torch.Tensor) -> torch.Tensor:
        """This rank's part of a full D (its own memory)."""
        return self.d_layout.part(full_d, self.sharding.rank).clone(memory_format=torch.contiguous_format)

    def draw_d(self, zeros: bool, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """A new D for this rank: zeros, or drawn as the full D from the global RNG and cut to this rank's part,
        so a TP run starts from exactly the D of the TP=1 run with the same seed."""
        return self.shard_d(MF.init_d(self.full_geometry, zeros=zeros, dtype=dtype, device=device))

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """x W'^T for this layer's weight, without bias (summed over the TP group for a row-parallel layer)."""
        if self.siblings is not None:
            y = self.siblings.product(self, x)
            if y is not None:
                return y
        if self.merged:
            return self.tp_output(F.linear(self.tp_input(x), self.weight))
        y = MF.adapted_linear(self.tp_input(x), self.frozen_base(), self.forward_d(), self.geometry, self.dropout)
        return self.tp_output(y)

    def frozen_base(self) -> MF.Base:
        """The frozen weight as the products read it: its FP8 copy after :meth:`to_fp8`, else ``weight``."""
        return self.base_fp8 if self.base_fp8 is not None else self.weight

    @torch.no_grad()
    def to_fp8(self, keep: Iterable[tuple[int, int]] = ()) -> None:
        """Replace this rank's frozen weight shard by its FP8 copy (:class:`miss_ds.fp8.FP8Weight`, quantised from
        the shard's own values) and free the weight. ``keep``: local (row, col) positions whose original values
        stay readable through :meth:`base_value` (the base fingerprint's samples)."""
        if self.base_fp8 is not None:
            return
        if self.geometry.mode == "bat":
            raise ValueError(f"'{self.name}': {MF.BAT_FP8_REFUSAL}")
        if self.merged:
            raise ValueError(f"'{self.name}' cannot take an FP8 base: it is merged")
        self._base_samples = {(row, col): self.weight[row, col].clone() for row, col in keep}
        self.base_fp8 = FP8Weight.from_weight(self.weight)
        weight, self.weight = self.weight, None
        # Free the bf16 shard now: a loader walking the parameters may still hold the Parameter object.
        weight.data = torch.empty(0, dtype=weight.dtype, device=weight.device)

    def base_value(self, row: int, col: int) -> torch.Tensor:
        """The original frozen weight at local (row, col), as a 0-d tensor. An FP8 layer knows only the positions
        it was told to keep (:meth:`to_fp8`)."""
        if self.base_fp8 is None:
            return self.weight[row, col]
        if (row, col) not in self._base_samples:
            raise RuntimeError(f"'{self.name}' holds its frozen weight in FP8 and kept only the base fingerprint's "
                               f"sampled values, not [{row}, {col}] of its shard")
        return self._base_samples[(row, col)]

    # The tensor-parallel layers' communication, as three hooks (identities on a single device).
    def tp_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input as this rank's shard product reads it."""
        return x

    def forward_d(self) -> torch.Tensor:
        """This rank's D as the forward pass uses it."""
        return self.miss_block

    def tp_output(self, y: torch.Tensor) -> torch.Tensor:
        """The layer's output from this rank's shard product."""
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.product(x)
        return y if self.bias is None else y + self.bias

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """This rank's shard of the merged weight W', as a new tensor (the layer is left unchanged). Refused for an
        FP8 base: W' must come from the original base, not from its FP8 copy."""
        if self.base_fp8 is not None:
            raise ValueError(f"'{self.name}' holds its frozen weight in FP8 (model.base_precision: fp8): merging D "
                             "into it would fold D into the quantised copy. Merge from the original base files "
                             "instead: miss-ds-convert --checkpoint CKPT --output DIR --merge reads the bf16 base "
                             "from disk")
        return self.weight.detach().clone() if self.merged else MF.merge(self.weight, self.miss_block, self.geometry)

    @torch.no_grad()
    def merge(self, safe: bool = True) -> None:
        """Fold D into the weight (inference, export). ``safe`` refuses a merge that produces inf/NaN."""
        if self.merged:
            return
        merged = self.merged_weight()
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
        """A plain ``nn.Linear`` holding W' (this layer is left unchanged); single-device layers only."""
        if self.sharding.style != "none":
            raise TypeError(f"'{self.name}' is a {type(self).__name__}: gather tensor-parallel adapters with "
                            "tools/convert_to_hf.py instead of merging them in place")
        g, merged = self.full_geometry, self.merged_weight()
        linear = nn.Linear(g.in_features, g.out_features, bias=self.bias is not None, device="meta",
                           dtype=merged.dtype)
        linear.weight = nn.Parameter(merged, requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return linear

    def extra_repr(self) -> str:
        g, s = self.full_geometry, self.sharding
        mini = f", mini_r={g.mini_r}" if g.mode == "mini" else ""
        shards = "" if s.style == "none" else f", {s.style}-parallel shards {list(s.sizes)}, rank {s.rank}"
        base = ", base=fp8" if self.base_fp8 is not None else ""
        return (f"in={g.in_features}, out={g.out_features}, mode={g.mode}, r={g.r}{mini}{shards}{base}, "
                f"merged={self.merged}")


class MissLinear(MissLayer):
    """MiSS on a single device, over an ``nn.Linear`` (its weight and bias are taken over)."""

    def __init__(self, base: nn.Linear, config: MissConfig, name: str = "") -> None:
        super().__init__(base.weight, base.bias, config=config, name=name, full_shape=tuple(base.weight.shape))


def _tiles_continue(split: Split, mini_r: int) -> bool:
    """Whether every rank's ranges, laid end to end, continue the mini_r tiling that starts at its first range."""
    for rank in range(split.ranks):
        ranges = split.ranges(rank)
        local = 0
        for start, stop in ranges:
            if (start - ranges[0][0] - local) % mini_r:
                return False
            local += stop - start
    return True
