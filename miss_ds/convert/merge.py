"""Merge a miss_ds adapter into its base: a plain Hugging Face checkpoint that loads with ``from_pretrained``.

The base is streamed one tensor at a time; each targeted ``<module>.weight`` becomes
``functional.merge(W, D)`` (computed in fp32 from the fp32 D, stored in the base dtype), the parameters of
``modules_to_save`` are replaced by the trained ones, and every other tensor is copied unchanged.
Memory: the adapter, one base tensor and one output shard.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from transformers.utils.hub import convert_file_size_to_int

from .. import functional as MF
from ..adapter_io import AdapterMismatch
from ..families import family_of
from ..hf_checkpoint import HFCheckpoint, ShardedWriter
from .output import TOKENIZER_FILE, copy_model_files, new_output_dir, write_run_config
from .source import Adapter, full_geometry, known_base, module_of, read_adapter, read_base_config, weight_key_of

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergeStats:
    """What a merge wrote."""

    merged: int
    replaced: int
    copied: int
    shards: int
    total_bytes: int


def merge_to_hf(checkpoint: Path | str, base: Optional[Path | str], output: Path | str,
                max_shard_size: int | str = "5GB") -> MergeStats:
    """Write ``base`` (default: the base the adapter records, when it is here) with the adapter of ``checkpoint``
    merged into it as a new model directory ``output``, with the training run's config when known."""
    adapter = read_adapter(checkpoint)
    base = known_base(adapter, base)
    if base is None:
        raise AdapterMismatch(f"{adapter.directory} records no base model that is here: pass --base")
    with HFCheckpoint(base) as weights:
        out = new_output_dir(output)
        writer = ShardedWriter(out, convert_file_size_to_int(max_shard_size))
        family = family_of(read_base_config(base))  # checkpoints may name tensors otherwise than the module tree
        d_of_weight = {family.file_key(weight_key_of(key)): key for key in adapter.d}
        saved = {family.file_key(key): value for key, value in adapter.saved.items()}
        merged = replaced = copied = 0
        for key, tensor in weights.stream():
            if key in d_of_weight:
                tensor = merged_weight(adapter, d_of_weight[key], tensor)
                merged += 1
            elif key in saved:
                tensor = saved[key].to(tensor.dtype)
                replaced += 1
            else:
                copied += 1
            writer.add(key, tensor)
        shards = writer.close()
    copy_model_files(base, out)
    write_run_config(out, adapter.run_config)
    _warn_without_tokenizer(base, out, adapter.run_config)
    logger.info("merged %d weights, replaced %d saved modules' tensors, copied %d into %d shard(s) in %s",
                merged, replaced, copied, len(shards), out)
    return MergeStats(merged, replaced, copied, len(shards), writer.total_bytes)


def _warn_without_tokenizer(base: Path, out: Path, run_config: Optional[dict]) -> None:
    """Say when the merged model has no tokenizer because its base has none (a run may take its tokenizer from
    elsewhere: ``tokenizer:``): ``from_pretrained`` users need one, and miss-ds-generate / miss-ds-eval find one only
    through the run config's ``tokenizer`` path, while it is there."""
    if (out / TOKENIZER_FILE).is_file():
        return
    trained = (run_config or {}).get("tokenizer")
    found = (f"miss-ds-generate and miss-ds-eval use the run's tokenizer ({trained}) only while that path is there "
             "from where they run" if trained else "miss-ds-generate and miss-ds-eval need --config RUN.yaml naming "
             "one")
    logger.warning("%s has no tokenizer (%s), so the merged model in %s has none: AutoTokenizer.from_pretrained(%s) "
                   "fails and %s. Save the tokenizer the run trained with into it (tokenizer.save_pretrained)",
                   base, TOKENIZER_FILE, out, out, found)


def merged_weight(adapter: Adapter, d_key: str, weight: torch.Tensor) -> torch.Tensor:
    """W' = merge(W, D) in fp32, cast back to W's dtype; refuses a result with inf/NaN."""
    geometry = full_geometry(adapter.config, module_of(d_key), tuple(weight.shape))
    merged = MF.merge(weight, adapter.tensors[d_key].to(torch.float32), geometry)
    if not torch.isfinite(merged).all():
        raise AdapterMismatch(f"merging '{d_key}' into its {weight.dtype} base weight produced inf/NaN: "
                              "D is broken or too large for the base dtype")
    return merged
