"""The inputs of every export: a miss_ds adapter (given directly or inside a training checkpoint) and its base.

A training checkpoint or the adapter directory inside it is accepted (``checkpoint_files.adapter_dir`` knows the
layout, and refuses a checkpoint whose adapter files or trainer state do not match their sha256 in its manifest).
``check_fits_base`` refuses a base model the adapter was not trained on before anything is written: by its config, its
tensors' names and shapes, and the base fingerprint the adapter recorded (:mod:`miss_ds.fingerprint`). A PEFT export
or a run's output_dir given in a checkpoint's place is refused, naming what it is (``check_not_misplaced``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import torch
from transformers import AutoConfig, PretrainedConfig

from .. import adapter_io, fingerprint
from ..adapter_io import AdapterMismatch
from .. import functional as MF
from ..config import MissConfig
from ..families import family_of
from ..atomic import CheckpointManager, checkpoints_within
from ..checkpoint_files import ADAPTER_DIR, BASE_DIR, STATE_FILE, adapter_dir, run_config_of
from ..hf_checkpoint import HFCheckpoint
from .output import read_run_config
from ..inject import D_NAME

#: What the export tools say to do with a PEFT adapter given as ``--checkpoint``.
PEFT_TO_EXPORT = ("give the miss_ds training checkpoint (or its adapter/) it was exported from; a PEFT adapter is "
                  "already an export, for PeftModel.from_pretrained")


def is_peft_adapter(directory: Path | str) -> bool:
    """Whether ``directory`` holds a PEFT adapter: its adapter_config.json names a ``peft_type`` (a miss_ds adapter's
    file of the same name has none)."""
    file = Path(directory) / adapter_io.ADAPTER_CONFIG
    if not file.is_file():
        return False
    try:
        return "peft_type" in json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterMismatch(f"{file} is not valid JSON ({exc})") from None


@dataclass
class Adapter:
    """A miss_ds adapter read whole: its adapter_config.json, MiSS config and every tensor at full shape."""

    directory: Path
    meta: dict[str, Any]
    config: MissConfig
    tensors: dict[str, torch.Tensor]
    """Every full D (``<module>.miss_block``) and every ``modules_to_save`` parameter, by parameter name."""
    run_config: Optional[dict[str, Any]] = None
    """The run config of the training checkpoint holding the adapter (its trainer_state.json); None for a bare
    adapter directory."""

    @property
    def d(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.tensors.items() if is_d_key(k)}

    @property
    def saved(self) -> dict[str, torch.Tensor]:
        """The parameters of ``modules_to_save``: they replace the base's parameters of the same name."""
        return {k: v for k, v in self.tensors.items() if not is_d_key(k)}


def read_adapter(path: Path | str, peft_advice: str = PEFT_TO_EXPORT) -> Adapter:
    """Resolve ``path`` (checkpoint or adapter dir) and reassemble every D to its full shape. Its run config is the
    training checkpoint's, or the one an exported adapter records (``miss-ds-reshard``'s output). A PEFT adapter or
    a run's directory in its place is refused (``check_not_misplaced``; ``peft_advice`` says what to do with the
    former)."""
    check_not_misplaced(Path(path), peft_advice)
    directory = adapter_dir(path)
    meta, tensors = adapter_io.read_full_adapter(directory)
    run_config = run_config_of(directory)
    return Adapter(directory, meta, MissConfig(**meta["miss"]), tensors,
                   read_run_config(directory) if run_config is None else run_config)


def check_not_misplaced(path: Path, peft_advice: str) -> None:
    """Refuse the directories given as a miss_ds checkpoint by mistake, naming what they are: a PEFT adapter (an
    export: its adapter_config.json is PEFT's, which the miss_ds reader cannot take) with ``peft_advice``, and a
    training run's output_dir (or its checkpoints/) with the newest complete checkpoint in it."""
    if is_peft_adapter(path):
        raise AdapterMismatch(f"{path} is a PEFT adapter (its {adapter_io.ADAPTER_CONFIG} names a peft_type), not a "
                              f"miss_ds training checkpoint or adapter: {peft_advice}")
    if (path / adapter_io.ADAPTER_CONFIG).is_file() or (path / ADAPTER_DIR / adapter_io.ADAPTER_CONFIG).is_file():
        return
    held = checkpoints_within(path) if path.is_dir() else None
    newest = CheckpointManager(held).latest() if held is not None else None  # as --resume auto finds it
    if newest is not None:
        raise FileNotFoundError(f"{path} is not a checkpoint but holds a training run's checkpoints: name one, e.g. "
                                f"the newest complete one: --checkpoint {newest}")


def known_base(adapter: Adapter, base: Optional[Path | str] = None) -> Optional[Path]:
    """The base model directory of ``adapter``, checked against it (``check_fits_base``): ``base`` when given, else
    the one the adapter records (the run's ``model.path``, or the random base the run saved) when it is here.
    None when neither is known."""
    if base is None:
        recorded = recorded_base(adapter)
        if not (recorded and (Path(recorded) / "config.json").is_file()):
            return None
        base = recorded
    with HFCheckpoint(base) as weights:
        check_fits_base(adapter, read_base_config(base), weights)
    return Path(base)


def recorded_base(adapter: Adapter) -> str:
    """The base ``adapter`` records (its ``base_model.name_or_path``). For the random base its run saved in
    ``<output_dir>/base``, the one beside the checkpoint that holds the adapter when it is there: the run directory
    may have moved since (``--overwrite`` moves an old run aside), or the recorded path be relative to another
    directory."""
    recorded = adapter.meta.get("base_model", {}).get("name_or_path") or ""
    run = adapter.run_config or {}
    in_checkpoint = (adapter.directory.parent / STATE_FILE).is_file()  # <run>/checkpoints/step_N/adapter
    beside = adapter.directory.parents[2] / BASE_DIR if in_checkpoint else None
    if beside is not None and beside.is_dir() and recorded == str(Path(run.get("output_dir", "")) / BASE_DIR):
        return str(beside)
    return recorded


def read_base_config(base: Path | str) -> PretrainedConfig:
    """The base model's config.json (a local directory; nothing is downloaded)."""
    path = Path(base) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: --base must be a local Hugging Face model directory")
    return AutoConfig.from_pretrained(str(base))


def check_fits_base(adapter: Adapter, base_config: PretrainedConfig, weights: HFCheckpoint) -> None:
    """Refuse a base the adapter does not belong to: config summary, a base tensor for every adapter tensor,
    shapes that fit (D against its weight, a saved module's parameter against the base's), and its fingerprint."""
    adapter_io.check_base(adapter.meta, SimpleNamespace(config=base_config), str(adapter.directory))
    family = family_of(base_config)
    for key, tensor in adapter.tensors.items():
        base_key = family.file_key(weight_key_of(key) if is_d_key(key) else key)
        if base_key not in weights.key_file:
            raise AdapterMismatch(f"'{key}' of {adapter.directory} has no base tensor '{base_key}' in "
                                  f"{weights.directory}: wrong base model?")
        base_shape = weights.shape(base_key)
        want = full_geometry(adapter.config, module_of(key), base_shape).d_shape if is_d_key(key) else base_shape
        if tuple(tensor.shape) != tuple(want):
            raise AdapterMismatch(f"'{key}' has shape {list(tensor.shape)} but base tensor '{base_key}' "
                                  f"{list(base_shape)} needs {list(want)}: wrong base model?")
    fingerprint.check(adapter.meta.get("base_fingerprint"), lambda positions: fingerprint.read_checkpoint(
        weights, positions), str(adapter.directory), str(weights.directory))


def is_d_key(key: str) -> bool:
    return key.endswith("." + D_NAME)


def module_of(d_key: str) -> str:
    """``<module>.miss_block`` -> ``<module>``."""
    return d_key[: -len("." + D_NAME)]


def weight_key_of(d_key: str) -> str:
    """``<module>.miss_block`` -> ``<module>.weight``."""
    return module_of(d_key) + ".weight"


def full_geometry(config: MissConfig, module: str, weight_shape: tuple[int, ...]) -> MF.MissGeometry:
    """The TP=1 geometry of ``module`` whose full weight has ``weight_shape``; MissShapeError if it can't fit."""
    if len(weight_shape) != 2:
        raise AdapterMismatch(f"base weight of '{module}' has shape {list(weight_shape)}: MiSS adapts 2-D linear "
                              "weights")
    out_features, in_features = weight_shape
    MF.check_layer(module, config.mode, config.r, config.mini_r, in_features, out_features)
    return MF.MissGeometry(config.mode, config.r, config.mini_r, in_features, out_features)

