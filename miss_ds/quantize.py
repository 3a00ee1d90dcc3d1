"""The frozen base in FP8 on a materialised model (``model.base_precision: fp8``): which MiSS layers are quantised.

``quantize_base(model)`` replaces, on this rank, every MiSS layer's frozen weight shard by its FP8 copy
(:class:`miss_ds.fp8.FP8Weight`, quantised from the shard's own values) and frees the bf16 shard. It runs after the
weights are loaded (and after the random base is saved and ``init_adapter`` is checked against the base, both of
which read the bf16 weights), layer by layer: the two FP8 layouts take the bytes of one bf16 copy, so quantising
during the read would not lower the peak, which stays one bf16 shard plus one layer's FP8 copy.

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
from .inject import miss_layers

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizeReport:
    """What ``quantize_base`` did on this rank."""

    quantized: tuple[str, ...]
    kept: dict[str, str]
    """Layers left in bf16, with why."""
    fp8_bytes: int
    """Bytes of the FP8 weights and their scales."""


def quantize_base(model: nn.Module) -> QuantizeReport:
    """Put this rank's MiSS layers' frozen weights in FP8 (see the module docstring). ``bat`` layers are refused:
    they multiply by the merged weight, which changes every step."""
    layers = dict(miss_layers(model))
    bat = [name for name, layer in layers.items() if layer.geometry.mode == "bat"]
    if bat:
        raise ValueError(f"miss.mode='bat' cannot run on an FP8 base ({bat[0]}...): it multiplies by the merged "
                         "weight, which changes every step. Use model.base_precision: bf16")
    kept = {}
    for name, layer in layers.items():
        g = layer.geometry
        if not fp8_capable(g.in_features, g.out_features):
            kept[name] = f"{g.in_features}->{g.out_features}"
    name_of = {id(layer): name for name, layer in layers.items()}
    for name, layer in layers.items():
        group = [] if layer.siblings is None else [name_of[id(m)] for m in layer.siblings.layers]
        blocking = [other for other in group if other in kept and other != name]
        if name not in kept and blocking:
            kept[name] = f"with {', '.join(blocking)}"
    samples: dict[str, list[tuple[int, int]]] = {}
    for key, row, col in fingerprint.model_positions(model):
        name = key.removesuffix(".weight")
        index = fingerprint.local_index(layers[name], row, col)
        if index is not None:
            samples.setdefault(name, []).append(index)
    quantized, fp8_bytes = [], 0
    for name, layer in layers.items():
        if name not in kept:
            layer.to_fp8(keep=samples.get(name, ()))
            quantized.append(name)
            fp8_bytes += layer.base_fp8.nbytes
    if kept:
        logger.warning("FP8 base: %d of %d MiSS layers keep their bf16 weight (FP8 GEMMs need in and out features "
                       "that are multiples of 16; a shared-input group stays whole): %s", len(kept), len(layers),
                       ", ".join(f"{name} ({why})" for name, why in kept.items()))
    logger.info("FP8 base: %d MiSS layers quantised (%.1f MiB of FP8 weights and scales)", len(quantized),
                fp8_bytes / 2**20)
    return QuantizeReport(tuple(quantized), kept, fp8_bytes)
