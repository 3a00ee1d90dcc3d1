"""Which base an adapter was trained on: a fingerprint of a few sampled base weights, stored with the adapter.

D only means something on its own base. Another checkpoint of the same shape (a base and its chat version), or a
random base drawn for another tensor-parallel layout (``loading.materialize_random`` draws per TP shard), passes
every shape check and silently gives a wrong model. The fingerprint is ``SAMPLES`` elements of the adapted
modules' weights, at positions fixed by the modules' names and full shapes, with their values (rounded to bf16).

It reads the same from a live model of any TP layout (each rank reads the positions inside its own shard and one
all-reduce over the TP group completes them; a layer whose base is in FP8 answers from the original values it kept
at these positions, ``quantize.BaseQuantizer``) and from a safetensors checkpoint on disk (only the rows holding the
positions are read). A check reads the base at the recorded positions: equal values are the same base; values
within one bf16 step of the recorded ones are the same base in another precision (accepted with a warning: a copy
converted through fp16 rounds twice); anything else is another base, named with the first differing weight.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .hf_checkpoint import HFCheckpoint

logger = logging.getLogger(__name__)

SAMPLES = 64
#: Values this close (relative) are one bf16 rounding step apart: the same base stored in another precision.
BF16_STEP = 2.0 ** -7

Position = tuple[str, int, int]  # (weight key, row, column) in the full weight


@dataclass(frozen=True)
class Fingerprint:
    """Sampled base weights: ``values[k]`` is the bf16-rounded element at ``positions[k]``."""

    positions: tuple[Position, ...]
    values: tuple[float, ...]

    def to_json(self) -> list[list[Any]]:
        return [[key, row, col, value] for (key, row, col), value in zip(self.positions, self.values)]

    @classmethod
    def from_json(cls, raw: list[list[Any]]) -> "Fingerprint":
        return cls(tuple((key, int(row), int(col)) for key, row, col, _ in raw), tuple(float(v) for *_, v in raw))


class OtherBaseError(ValueError):
    """The base given is not the one the adapter was trained on."""


def sample_positions(shapes: dict[str, tuple[int, int]]) -> tuple[Position, ...]:
    """``SAMPLES`` positions spread over the weights (round-robin over a shuffled order, so every weight of a small
    model is sampled), fixed by the weights' names and full shapes."""
    keys = sorted(shapes)
    rng = random.Random("\n".join(f"{key}:{list(shapes[key])}" for key in keys))  # str seeds hash deterministically
    rng.shuffle(keys)
    positions = []
    for k in range(SAMPLES):
        key = keys[k % len(keys)]
        rows, cols = shapes[key]
        positions.append((key, rng.randrange(rows), rng.randrange(cols)))
    return tuple(positions)


def _rounded(values: Sequence[float]) -> tuple[float, ...]:
    return tuple(torch.tensor(values, dtype=torch.float64).to(torch.bfloat16).double().tolist())


def model_positions(model: nn.Module) -> tuple[Position, ...]:
    """The positions the fingerprint of ``model`` samples (fixed by its MiSS layers' names and full shapes)."""
    from .inject import miss_layers

    shapes = {f"{name}.weight": (layer.full_geometry.out_features, layer.full_geometry.in_features)
              for name, layer in miss_layers(model)}
    if not shapes:
        raise ValueError("the model has no MiSS layers: there is no adapted base weight to fingerprint")
    return sample_positions(shapes)


def of_model(model: nn.Module) -> Fingerprint:
    """The fingerprint of a live model's base (MiSS layers' frozen weights); every TP rank must call it."""
    positions = model_positions(model)
    return Fingerprint(positions, read_model(model, positions))


def local_index(layer: Any, row: int, col: int) -> Optional[tuple[int, int]]:
    """Where the full weight's (row, col) sits in ``layer``'s shard (a MiSS layer); None when another rank holds
    it."""
    index = [row, col]
    span = layer.sharding.span("weight")
    if span is not None:
        local = span.local(index[span.dim])
        if local is None:
            return None
        index[span.dim] = local
    return index[0], index[1]


@torch.no_grad()
def read_model(model: nn.Module, positions: Sequence[Position]) -> tuple[float, ...]:
    """The bf16-rounded base weights of a live model at ``positions``; collective over the TP group when a sampled
    weight is split (every rank of the group must call it with the same positions)."""
    from .inject import miss_layers

    layers = dict(miss_layers(model))
    device = next(iter(layers.values())).miss_block.device
    values = torch.zeros(len(positions), dtype=torch.float64, device=device)
    owners = torch.zeros_like(values)
    group, split = None, False
    for k, (key, row, col) in enumerate(positions):
        layer = layers.get(key.removesuffix(".weight"))
        if layer is None:
            raise KeyError(f"the fingerprint samples '{key}', which is not an adapted weight of this model")
        if layer.merged:
            raise RuntimeError(f"'{layer.name}' is merged: its weight is no longer the base's")
        if layer.sharding.span("weight") is not None:
            group, split = layer.sharding.group, True
        index = local_index(layer, row, col)
        if index is None:
            continue
        values[k] = layer.base_value(*index).double()  # an FP8 layer kept these values (quantize.BaseQuantizer)
        owners[k] = 1
    if split and dist.is_initialized():
        # Replicated weights are read by every rank (owners = TP size); the division is exact.
        dist.all_reduce(values, group=group)
        dist.all_reduce(owners, group=group)
    if not bool((owners > 0).all()):
        raise RuntimeError("some fingerprint positions fall in no rank's shard: the TP split is inconsistent")
    return _rounded((values / owners).tolist())


def read_checkpoint(checkpoint: HFCheckpoint, positions: Sequence[Position]) -> tuple[float, ...]:
    """The bf16-rounded weights of a safetensors checkpoint at ``positions`` (one row read per position)."""
    return _rounded([float(checkpoint.read(key, 0, row, row + 1)[0, col]) for key, row, col in positions])


def check(recorded: Optional[list], read: Callable[[Sequence[Position]], Sequence[float]], adapter: str, base: str,
          strict: bool = True) -> None:
    """Compare the fingerprint an adapter recorded (its ``base_fingerprint`` JSON, or None) with the base ``read``
    reads. Another base raises ``OtherBaseError`` (``strict``) or is warned about; an adapter without a fingerprint
    (written before miss_ds recorded one) cannot be checked and is warned about."""
    if recorded is None:
        logger.warning("%s records no base fingerprint (it predates them): cannot check that %s is its base",
                       adapter, base)
        return
    want = Fingerprint.from_json(recorded)
    got = read(want.positions)
    differ = [k for k, (a, b) in enumerate(zip(want.values, got)) if a != b]
    if not differ:
        return
    far = [k for k in differ if abs(want.values[k] - got[k]) > BF16_STEP * max(abs(want.values[k]), abs(got[k]))]
    if not far:
        logger.warning("%s: %d of %d sampled weights of %s differ from its base's by one bf16 step: the same base "
                       "stored in another precision", adapter, len(differ), len(got), base)
        return
    key, row, col = want.positions[far[0]]
    message = (f"{adapter} was trained on another base than {base}: {len(far)} of {len(got)} sampled weights differ, "
               f"e.g. {key}[{row}, {col}] is {got[far[0]]:.6g} here and was {want.values[far[0]]:.6g} in its base. "
               "A random base (model.path null) is drawn per tensor-parallel shard: use the one the run saved in "
               "<output_dir>/base")
    if strict:
        raise OtherBaseError(message)
    logger.warning("%s", message)
