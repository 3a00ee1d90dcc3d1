"""MiSS adapter configuration: which layers get an adapter and how D is shaped and initialised."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Optional, Union

class ConfigError(ValueError):
    """A configuration file or override that cannot be used, with what to do about it: bad input, which the commands
    report in one line (exit code 2). Defined with the lowest config, so that every layer can raise it;
    ``miss_ds.run_config`` re-exports it."""


Mode = Literal["miss", "mini", "bat"]
MODES: tuple[str, ...] = ("miss", "mini", "bat")


@dataclass
class MissConfig:
    """Hyper-parameters of a MiSS adapter (field names follow PEFT's ``MissConfig`` where they exist)."""

    r: int = 64
    """Shard size along in_features, at least 1: D has r rows, and x is summed over chunks of r features."""
    mode: Mode = "miss"
    """``miss``: D is (r, out). ``mini``: D is (r, mini_r) repeated along out. ``bat``: D is (out/r, r, r) (Bone)."""
    mini_r: int = 1
    """Width of D in ``mini`` mode, at least 1; out_features must be a multiple of it."""
    init_weights: Union[bool, Literal["miss"]] = True
    """True (or "miss"): D starts at zero, so the adapted model equals the base. False: random D (tests)."""
    dropout: float = 0.0
    """Dropout probability on the adapter's input, in [0, 1) (``miss`` and ``mini`` only; ``bat`` rewrites the
    weight)."""
    target_modules: Union[list[str], str, None] = None
    """Module names (exact, or suffix after a dot) or one regex matched against the full module name; each name (or
    the regex) must match a module of the model. A string is always that one regex (PEFT's rule): ``q_proj`` alone
    matches no module, ``[q_proj]`` every ``...q_proj``. Not set: the model family's projections (``miss_ds.families``:
    attention and MLP, e.g. Llama's q/k/v/o/gate/up/down)."""
    exclude_modules: Union[list[str], str, None] = None
    """Names or a regex, as for ``target_modules``, of modules to leave untouched; each must match a module."""
    modules_to_save: list[str] = field(default_factory=list)
    """Other modules (e.g. ``lm_head``) trained in full and saved with the adapter: every module whose full name
    ends with one of these strings (PEFT's rule, a plain suffix: ``norm`` also takes ``input_layernorm``); each
    string must match a module."""
    adapter_dtype: Literal["float32", "model"] = "float32"
    """D's dtype when the layer is built: fp32 (default, like PEFT) or the dtype of the layer it adapts. Under
    DeepSpeed's bf16 mode (the trainer with ``model.dtype: bfloat16``) DeepSpeed casts D to bf16 either way and
    keeps an fp32 master copy in its optimizer; the forward computes agg(x)·D in x's dtype."""

    def __post_init__(self) -> None:
        if self.init_weights == "miss":
            self.init_weights = True
        self.validate()

    def validate(self) -> None:
        """Reject settings that can never work, naming the field and a value that would."""
        if self.mode not in MODES:
            raise ValueError(f"miss.mode={self.mode!r} is not one of {MODES}")
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"miss.r={self.r!r} must be a positive integer (64 is a good start)")
        if not isinstance(self.mini_r, int) or self.mini_r <= 0:
            raise ValueError(f"miss.mini_r={self.mini_r!r} must be a positive integer dividing out_features")
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"miss.init_weights={self.init_weights!r} must be true, false or 'miss'")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"miss.dropout={self.dropout} must be in [0, 1)")
        if self.mode == "bat" and self.dropout:
            raise ValueError("miss.dropout must be 0 in 'bat' mode: bat rewrites the weight, it has no input path")
        if self.adapter_dtype not in ("float32", "model"):
            raise ValueError(f"miss.adapter_dtype={self.adapter_dtype!r} must be 'float32' or 'model'")
        if self.target_modules is not None and not self.target_modules:
            raise ValueError("miss.target_modules is empty: name the projections to adapt, e.g. ['q_proj', 'v_proj'], "
                             "or leave it unset for the model family's default")
        for key in ("target_modules", "exclude_modules"):
            value = getattr(self, key)
            if isinstance(value, str):
                try:
                    re.compile(value)
                except re.error as exc:
                    raise ValueError(f"miss.{key}={value!r} is not a valid regex: {exc}") from None

    def for_model(self, model_config: Optional[Any]) -> MissConfig:
        """This config with ``target_modules`` set: as given, or the model family's default (``model_config`` is the
        model's Hugging Face config). Adapter files and run configs record the resolved list."""
        if self.target_modules is not None:
            return self
        if model_config is None:
            raise ValueError("miss.target_modules is not set and the model has no Hugging Face config to take its "
                             "family's default projections from: name the projections to adapt")
        from .families import default_targets

        return dataclasses.replace(self, target_modules=default_targets(model_config))

    def matches(self, name: str) -> bool:
        """Whether the module called ``name`` (as in ``model.named_modules()``) gets an adapter; ``target_modules``
        must be set (:meth:`for_model`)."""
        if self.target_modules is None:
            raise ValueError("MissConfig.matches needs target_modules: resolve it with MissConfig.for_model first")
        return _name_matches(name, self.target_modules) and not (
            self.exclude_modules is not None and _name_matches(name, self.exclude_modules)
        )

    def saves(self, param_name: str) -> bool:
        """Whether parameter ``param_name`` belongs to a module of ``modules_to_save``.

        PEFT wraps every module whose full name ends with one of the strings (``str.endswith``, not only at a
        dot) and trains and saves all parameters below it; the PEFT export must hold exactly those.
        """
        path = param_name.split(".")[:-1]
        ancestors = [".".join(path[:i]) for i in range(1, len(path) + 1)]
        return any(_saves_module(module, m) for module in ancestors for m in self.modules_to_save)

    def unmatched(self, names: list[str]) -> list[tuple[str, str]]:
        """(field, entry) of each entry of ``target_modules``, ``exclude_modules`` and ``modules_to_save`` (a regex
        counts as one entry) that matches none of the module ``names``: a misspelt entry would otherwise leave its
        modules silently untouched, or untrained."""
        found = []
        for key in ("target_modules", "exclude_modules"):
            pattern = getattr(self, key)
            entries = [] if pattern is None else [pattern] if isinstance(pattern, str) else pattern
            found += [(key, entry) for entry in entries
                      if not any(_name_matches(name, entry if isinstance(pattern, str) else [entry]) for name in names)]
        found += [("modules_to_save", entry) for entry in self.modules_to_save
                  if not any(_saves_module(name, entry) for name in names)]
        return found

    def to_dict(self) -> dict:
        return asdict(self)


def _saves_module(name: str, entry: str) -> bool:
    """PEFT's ``modules_to_save`` rule: the module's full name ends with the entry (a plain suffix)."""
    return name.endswith(entry)


def _name_matches(name: str, pattern: Union[list[str], str]) -> bool:
    """PEFT's rule: a string is a regex on the full name; a list matches exactly or as a dotted suffix."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == p or name.endswith("." + p) for p in pattern)
