"""What a recomputed layer keeps from its first forward: MiSS's aggregations agg(x).

Non-reentrant activation checkpointing (``torch.utils.checkpoint``, as transformers' gradient checkpointing calls
it) runs a layer's forward twice: in the forward pass, keeping only the layer's inputs, and again in backward.
agg(x) is r values a token, and computing it reads the whole input; so a recomputed layer keeps its aggregations
from the first forward and takes them back, in order, in the recomputation, which runs the same code on the same
inputs. :func:`checkpoint_contexts` is the ``context_fn`` that :func:`miss_ds.modeling.enable_recompute` gives the
checkpoint; the MiSS node computes agg(x) through :func:`kept`.

PyTorch's selective activation checkpointing can keep a named operator's results too, but it runs every operator
of the layer through a Python dispatch mode, twice a step; these two context managers cost nothing per operator.
"""
from __future__ import annotations

import threading
from typing import Callable, Hashable, Optional

import torch


class _Phase:
    """While entered, :func:`kept` stores results in ``store`` (a layer's first forward) or takes them back in
    order (its recomputation). Re-enterable: a second backward over a retained graph replays from the start."""

    def __init__(self, store: list[tuple[Hashable, torch.Tensor]], replay: bool) -> None:
        self.store, self.replay = store, replay
        self.position = 0
        self._outer: Optional[_Phase] = None

    def __enter__(self) -> _Phase:
        self._outer, _active.phase = _active.phase, self
        self.position = 0
        return self

    def __exit__(self, *exc: object) -> None:
        _active.phase = self._outer


class _Active(threading.local):
    phase: Optional[_Phase] = None


_active = _Active()  # per thread: autograd recomputes in its own device threads


def checkpoint_contexts() -> tuple[_Phase, _Phase]:
    """The (first forward, recomputation) context managers of one checkpointed call, sharing one store: pass as
    ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False, context_fn=checkpoint_contexts)``."""
    store: list[tuple[Hashable, torch.Tensor]] = []
    return _Phase(store, replay=False), _Phase(store, replay=True)


def kept(compute: Callable[[], torch.Tensor], signature: Hashable) -> torch.Tensor:
    """``compute()``, kept by a checkpointed layer's first forward and taken back by its recomputation. Outside
    a checkpointed layer it is just ``compute()``. ``signature`` (the call's shapes and arguments) must match the
    kept result's, or the recomputation did not repeat the first forward and this raises."""
    phase = _active.phase
    if phase is None:
        return compute()
    if not phase.replay:
        result = compute()
        phase.store.append((signature, result))
        return result
    if phase.position >= len(phase.store) or phase.store[phase.position][0] != signature:
        found = phase.store[phase.position][0] if phase.position < len(phase.store) else "nothing"
        raise RuntimeError(f"the recomputation of a checkpointed layer asked for MiSS result {signature} where its "
                           f"first forward kept {found} (call {phase.position}): the layer's forward must repeat "
                           "itself; run with model.gradient_checkpointing: false and report this")
    result = phase.store[phase.position][1]
    phase.position += 1
    return result
