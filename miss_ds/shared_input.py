"""Sibling MiSS layers that read one input tensor (q, k and v; gate and up), computed together.

The model calls each sibling on its own (``q_proj(x)``, ``k_proj(x)``, ...). The first call computes the products of
all of them in one autograd node (:func:`miss_ds.functional.shared_input_products`: one aggregation of x, one
spread of the MiSS input gradient, one input-gradient buffer that every sibling's GEMM accumulates into) and keeps
the others' outputs until they are called with the same tensor. A sibling called with another tensor means the
layers do not share their input after all: the group then stops, with a warning, and each layer computes alone
(the result is the same either way; only the speed differs).

Groups are formed by :func:`link_siblings` from the model family's ``shared_inputs`` (:mod:`miss_ds.families`).
With an FP8 base the group also shares one quantisation of x (:mod:`miss_ds.fp8`); its layers must then be all FP8
or all not (``quantize.BaseQuantizer`` keeps a group whole); a group that is not computes one by one.
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Protocol

import torch
from torch import nn

from . import functional as MF

logger = logging.getLogger(__name__)


class MissLayer(Protocol):
    """What a group needs of its layers (:class:`miss_ds.layers.MissLayer` has it)."""

    name: str
    weight: nn.Parameter
    geometry: MF.MissGeometry
    sharding: Any
    merged: bool
    dropout: Optional[nn.Dropout]
    siblings: Optional[SharedInput]
    base_fp8: Optional[Any]

    def tp_input(self, x: torch.Tensor) -> torch.Tensor: ...

    def frozen_base(self) -> MF.Base: ...

    def forward_d(self) -> torch.Tensor: ...


@dataclass
class _Round:
    """The outputs computed for one input tensor and not yet handed to their layers."""

    input: weakref.ref
    version: Optional[int]
    pending: dict = field(default_factory=dict)

    def holds(self, layer: MissLayer, x: torch.Tensor) -> bool:
        return self.input() is x and _version(x) == self.version and layer in self.pending


def _version(x: torch.Tensor) -> Optional[int]:
    """x's in-place modification count; None for a tensor made under ``torch.inference_mode``, which keeps none."""
    return None if x.is_inference() else x._version


class SharedInput:
    """MiSS layers (single-device or column-parallel, same TP group and input shard) fed the same input tensor."""

    def __init__(self, layers: Iterable[MissLayer]) -> None:
        self.layers = tuple(layers)
        self.stopped = False
        self._round: Optional[_Round] = None

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def product(self, layer: MissLayer, x: torch.Tensor) -> Optional[torch.Tensor]:
        """``layer``'s product of x (as :meth:`MissLayer.product`), or None when ``layer`` must compute alone."""
        round_ = self._round
        if round_ is not None:
            if round_.holds(layer, x):
                out = round_.pending.pop(layer)
                if not round_.pending:
                    self._round = None
                return out
            self._round = None
            if round_.input() is not None:  # (a dead input is a round an exception cut short: start afresh)
                self._stop(layer)
                return None
        if self.stopped or not self._computable_together():
            return None
        outs = MF.shared_input_products(self.layers[0].tp_input(x),
                                        [(m.frozen_base(), m.forward_d(), m.geometry) for m in self.layers])
        self._round = _Round(weakref.ref(x), _version(x),
                             {m: out for m, out in zip(self.layers, outs) if m is not layer})
        return outs[self.layers.index(layer)]

    def _computable_together(self) -> bool:
        """Unmerged, without active dropout (PEFT draws a dropout mask per layer), and all on FP8 or none."""
        return not any(m.merged or (m.dropout is not None and m.dropout.training and m.dropout.p > 0)
                       for m in self.layers) and len({m.base_fp8 is None for m in self.layers}) == 1

    def _stop(self, layer: MissLayer) -> None:
        self.stopped = True
        logger.warning("MiSS layers %s do not read one input tensor ('%s' was called with another one): they "
                       "compute one by one from now on (same results, slower)", self.names, layer.name)


def link_siblings(layers: Iterable[MissLayer]) -> Optional[SharedInput]:
    """Make ``layers`` one :class:`SharedInput` group when they can be computed together; None otherwise (fewer
    than two, ``bat``, row-parallel, or different input shards, TP groups or base precisions)."""
    layers = list(layers)
    if len(layers) < 2 or not MF.can_share_input([m.geometry for m in layers]):
        return None

    def key(m: MissLayer) -> tuple:
        return m.sharding.style, m.sharding.group, m.base_fp8 is None

    if any(m.sharding.style == "row" or key(m) != key(layers[0]) for m in layers):
        return None
    group = SharedInput(layers)
    for m in layers:
        m.siblings = group
    return group
