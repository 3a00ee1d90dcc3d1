"""The frozen base in FP8 (``model.base_precision: fp8``): which MiSS layers are quantised, and when.

:class:`BaseQuantizer` is built on the model while it is still on the meta device: it decides which layers go FP8
and which base-fingerprint positions each must keep in bf16. The loader then hands it each MiSS layer's weight
shard as soon as that shard is materialised (``loading.materialize_model(..., loaded=quantizer.loaded)``), so a
rank holds at most one bf16 shard at a time: the 80-layer 70B shape (138 GB in bf16) loads onto one 141 GB GPU as
69 GB of FP8.
:meth:`BaseQuantizer.finish` quantises what is still bf16 (everything, when the run had to read the bf16 base first:
a random base small enough to be saved, ``random_base.save_random_base``) and reports.

Kept in bf16, with one warning listing them: layers whose shard FP8 GEMMs cannot run (in or out features not a
multiple of 16), and every layer of a shared-input group (q, k, v; gate, up) one of whose members is kept, so that
a group stays computed together with one quantisation of its input. Each FP8 layer keeps the original values at the
base fingerprint's sampled positions, so checkpoints record the fingerprint of the base on disk.

Not touched: embeddings, norms, the LM head, routed experts and projections MiSS does not wrap.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from . import fingerprint
from .fp8 import fp8_capable
from .functional import BAT_FP8_REFUSAL
from .inject import miss_layers
from .layers import MissLayer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizeReport:
    """What the quantiser did on this rank."""

    quantized: tuple[str, ...]
    kept: dict[str, str]
    """Layers left in bf16, with why."""
    fp8_bytes: int
    """Bytes of the FP8 weights and their scales."""


class BaseQuantizer:
    """Puts this rank's MiSS layers' frozen weights in FP8, layer by layer (see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        """Plan on ``model`` (meta or materialised): ``bat`` layers are refused (``functional.BAT_FP8_REFUSAL``)."""
        self.layers: dict[str, MissLayer] = dict(miss_layers(model))
        bat = [name for name, layer in self.layers.items() if layer.geometry.mode == "bat"]
        if bat:
            raise ValueError(f"'{bat[0]}' ({len(bat)} bat layers): {BAT_FP8_REFUSAL}")
        self.kept = self._kept()
        self.samples: dict[str, list[tuple[int, int]]] = {}
        for key, row, col in fingerprint.model_positions(model):
            name = key.removesuffix(".weight")
            index = fingerprint.local_index(self.layers[name], row, col)
            if index is not None:
                self.samples.setdefault(name, []).append(index)
        self._weight_owner = {f"{name}.weight": name for name in self.layers if name not in self.kept}
        self.quantized: list[str] = []

    def _kept(self) -> dict[str, str]:
        """Layers that stay bf16, with why: shards FP8 GEMMs cannot run, and the rest of their groups."""
        kept = {}
        for name, layer in self.layers.items():
            g = layer.geometry
            if not fp8_capable(g.in_features, g.out_features):
                kept[name] = f"{g.in_features}->{g.out_features}"
        name_of = {id(layer): name for name, layer in self.layers.items()}
        for name, layer in self.layers.items():
            group = [] if layer.siblings is None else [name_of[id(m)] for m in layer.siblings.layers]
            blocking = [other for other in group if other in kept and other != name]
            if name not in kept and blocking:
                kept[name] = f"with {', '.join(blocking)}"
        return kept

    def loaded(self, param_name: str) -> None:
        """The loader's hook: parameter ``param_name`` is now materialised; quantise its layer if it is an FP8
        layer's weight."""
        name = self._weight_owner.get(param_name)
        if name is not None:
            self._quantize(name)

    def _quantize(self, name: str) -> None:
        layer = self.layers[name]
        if layer.base_fp8 is None:
            layer.to_fp8(keep=self.samples.get(name, ()))
            self.quantized.append(name)

    def finish(self) -> QuantizeReport:
        """Quantise the FP8 layers still in bf16, log what was kept, and report."""
        for name in self._weight_owner.values():
            self._quantize(name)
        if self.kept:
            logger.warning("FP8 base: %d of %d MiSS layers keep their bf16 weight (FP8 GEMMs need in and out "
                           "features that are multiples of 16; a shared-input group stays whole): %s",
                           len(self.kept), len(self.layers),
                           ", ".join(f"{name} ({why})" for name, why in self.kept.items()))
        fp8_bytes = sum(self.layers[name].base_fp8.nbytes for name in self.quantized)
        logger.info("FP8 base: %d MiSS layers quantised (%.1f MiB of FP8 weights and scales)", len(self.quantized),
                    fp8_bytes / 2**20)
        return QuantizeReport(tuple(self.quantized), self.kept, fp8_bytes)


def quantize_base(model: nn.Module) -> QuantizeReport:
    """Put every MiSS layer of a materialised model in FP8 at once (tests, benchmarks, a loaded model)."""
    return BaseQuantizer(model).finish()
