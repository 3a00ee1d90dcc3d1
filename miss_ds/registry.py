"""Which MiSS layer wraps which kind of base layer.

``apply_miss`` asks :func:`factory_for`; the single-device layer registers ``nn.Linear`` here and the
tensor-parallel adapters (:mod:`miss_ds.parallel.autotp`, :mod:`miss_ds.parallel.megatron`) register their base
types when imported. Kept apart from :mod:`miss_ds.inject` so that the adapters depend on it and not on inject.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from .config import MissConfig
from .layers import MissLinear

Factory = Callable[[nn.Module, MissConfig, str], nn.Module]
_FACTORIES: list[tuple[type, Factory]] = []


def register_layer(base_type: type, factory: Factory) -> None:
    """Teach ``apply_miss`` to wrap another kind of base layer (e.g. a tensor-parallel linear)."""
    _FACTORIES.insert(0, (base_type, factory))


def factory_for(module: nn.Module) -> Factory | None:
    """The factory registered for ``module``'s exact type, else for its nearest registered base class."""
    return next((f for t, f in _FACTORIES if type(module) is t), None) or \
        next((f for t, f in _FACTORIES if isinstance(module, t)), None)


register_layer(nn.Linear, MissLinear)
