"""A run on a random base saves that base: its adapter means nothing without it, and it exists nowhere else.

``loading.materialize_random`` draws every parameter from a generator seeded by (seed, name, TP shard offset), so the
base depends on the TP layout and no other tool draws it (``tools/make_random_checkpoint.py`` draws another model).
Before the first step the trainer writes it as a Hugging Face model directory::

    <output_dir>/base/      config.json, generation_config.json, model.safetensors (+ index), tokenizer files

gathered from the TP ranks to rank 0 and written atomically (temp dir + rename). A resumed run finds it there and
checks that it is the base it drew (another one is refused: that run's checkpoints were trained on it, so it is never
replaced); a new run that finds another one there (an earlier attempt of another seed, model or TP size, with no
checkpoint to resume) moves it aside, never overwrites it. The run's adapters record it as their base
(``base_model.name_or_path``), so the export, generation and evaluation tools find it by themselves. A base over
``MAX_BYTES`` (a random 70B benchmark) is not saved: the run says so, and the adapters' base fingerprint still refuses
any other base.
"""
from __future__ import annotations

import copy
import logging
import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from transformers import AutoConfig, GenerationConfig
from transformers.utils.hub import convert_file_size_to_int

from . import fingerprint
from .adapter_io import base_summary
from .checkpoint_files import BASE_DIR
from .distributed import ParallelLayout
from .hf_checkpoint import HFCheckpoint, ShardedWriter
from .layers import assemble
from .loading import base_parameters, split_of
from .run_config import ConfigError

logger = logging.getLogger(__name__)

MAX_BYTES = 2 * 2**30
MAX_SHARD = "5GB"


def save_random_base(model: nn.Module, output_dir: Path, tokenizer: Any, layout: ParallelLayout, *,
                     resuming: bool = False) -> Optional[Path]:
    """Write the base weights of ``model`` (just materialised, before any step) to ``output_dir/base`` and make it
    the model's recorded base; every rank calls it (the TP shards are gathered to rank 0). Returns the directory, or
    None when the base is over ``MAX_BYTES``. A ``resuming`` run whose ``output_dir/base`` holds another base is
    refused (ConfigError) with nothing written."""
    target = Path(output_dir) / BASE_DIR
    params = list(base_parameters(model))
    total = base_bytes(model)
    if not will_save(model):
        if layout.is_main:
            logger.warning("the random base (%.1f GiB) is not saved, being over %.1f GiB: this run's adapters can be "
                           "used only by a run that draws the same base (same seed and parallel.tp_size)",
                           total / 2**30, MAX_BYTES / 2**30)
        return None
    model.config._name_or_path = str(target)  # recorded by every adapter as its base (adapter_io.base_summary)
    if (target / "config.json").is_file():
        if _holds(target, model):  # an earlier attempt of this run saved it
            return target
        if resuming:
            raise ConfigError(f"{target} holds another random base than this run draws (another seed, model.config "
                              "or parallel.tp_size): this run's checkpoints were trained on it, so it is kept and the "
                              "resume refused. Resume with the settings of the run that saved it (its checkpoints' "
                              "trainer_state.json records them), or start a new run in another output_dir")
        if layout.is_main:  # another seed, model or TP size: kept aside, not overwritten
            aside = target.with_name(f"{BASE_DIR}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
            target.rename(aside)
            logger.warning("%s held another random base than this run draws (another seed, model or tp_size): "
                           "moved to %s", target, aside)
    temp = target.with_name(f".{BASE_DIR}.tmp")
    writer = None
    if layout.is_main:
        shutil.rmtree(temp, ignore_errors=True)
        temp.mkdir(parents=True)
        writer = ShardedWriter(temp, convert_file_size_to_int(MAX_SHARD))
    for names, param in params:
        full = _gathered(model, names[0], param, layout)
        if writer is not None:
            writer.add(names[0], full)
    if writer is None:
        return target
    writer.close()
    config = copy.deepcopy(model.config)
    config.use_cache = True  # the trainer turns the cache off; generation wants it
    config.save_pretrained(temp)
    if tokenizer is not None:
        tokenizer.save_pretrained(temp)
        GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id).save_pretrained(temp)
    temp.rename(target)
    logger.info("saved the random base (%.1f MiB) in %s", total / 2**20, target)
    return target


def _holds(directory: Path, model: nn.Module) -> bool:
    """Whether the base saved in ``directory`` is the base of ``model``: same shape, same fingerprint (collective)."""
    drawn = fingerprint.of_model(model)
    saved_summary = base_summary(SimpleNamespace(config=AutoConfig.from_pretrained(directory)))
    if any(saved_summary.get(key) != value for key, value in base_summary(model).items() if key != "name_or_path"):
        return False
    with HFCheckpoint(directory) as saved:
        return fingerprint.read_checkpoint(saved, drawn.positions) == drawn.values


def will_save(model: nn.Module) -> bool:
    """Whether :func:`save_random_base` writes the base of ``model`` (meta or materialised): not over ``MAX_BYTES``."""
    return base_bytes(model) <= MAX_BYTES


def base_bytes(model: nn.Module) -> int:
    """Bytes of the full (all TP shards) base of ``model``, meta or materialised."""
    return sum(_full_numel(model, names[0], p) * p.element_size() for names, p in base_parameters(model))


def _full_numel(model: nn.Module, name: str, param: torch.Tensor) -> int:
    split = split_of(model, name)
    return param.numel() if split is None else param.numel() // param.shape[split.dim] * split.full


def _gathered(model: nn.Module, name: str, param: torch.Tensor, layout: ParallelLayout) -> torch.Tensor:
    """The full tensor on rank 0 (a TP-split one from the shards of ranks 0..tp-1, rank 0's TP group); others get
    their own part back."""
    local = param.detach().cpu()
    split = split_of(model, name)
    if split is None:
        return local
    shards = [None] * layout.world if layout.is_main else None
    dist.gather_object((local, split), shards, dst=0)
    return assemble(shards[:layout.tp]) if layout.is_main else local
