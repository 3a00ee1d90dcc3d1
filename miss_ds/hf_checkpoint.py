"""Hugging Face safetensors checkpoints on disk: read one tensor (or one slice) at a time, write in shards.

A model directory holds either ``model.safetensors`` or shards listed in ``model.safetensors.index.json``.
Reading goes through ``safe_open`` so only the requested tensor or slice is read; writing keeps one output
shard in memory, so converting a checkpoint needs about one tensor plus one shard of memory.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
#: safetensors metadata transformers requires to accept a file as PyTorch weights.
PT_METADATA = {"format": "pt"}
#: The process's umask, read once at import (reading it means setting it, which is not thread-safe).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path | str) -> None:
    """Write ``tensors`` to ``path`` as PyTorch safetensors, readable as any file the process writes.

    safetensors 0.8 writes through a temporary file that keeps mode 0600 whatever the umask (safetensors issue
    782), so a model or adapter written here would be unreadable to another user, such as a LoRA server's; the file
    gets the mode ``open()`` would give it (0666 less the umask).
    """
    save_file(tensors, str(path), metadata=PT_METADATA)
    os.chmod(path, 0o666 & ~_UMASK)


class DamagedWeights(ValueError):
    """A weights file that cannot be read whole (cut short, or not safetensors): bad input, named by path."""


def check_whole(path: Path) -> None:
    """``path`` holds as many bytes as its safetensors header says (8 bytes of header length, the JSON header, then
    every tensor's bytes), read from the header alone: a file cut short by an interrupted copy or download fails
    here, by name, not in the middle of loading."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little") if size >= 8 else size
        header = f.read(length) if 8 + length <= size else b""
    try:
        tensors = json.loads(header)
        end = 8 + length + max((t["data_offsets"][1] for k, t in tensors.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError):
        raise DamagedWeights(f"{path} ({size} bytes) is not a whole safetensors file (its header cannot be read): "
                             "copy or download it again") from None
    if end > size:
        raise DamagedWeights(f"{path} is cut short: its header lists {end} bytes, the file has {size} (an interrupted "
                             "copy or download?): copy or download it again")


class HFCheckpoint:
    """Index of a model directory's safetensors weights: which file holds each key, and lazy readers."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self.key_file = self._index()
        self.files = sorted(set(self.key_file.values()))
        self._handles: dict[Path, object] = {}

    def _index(self) -> dict[str, Path]:
        index, single = self.directory / INDEX_FILE, self.directory / SINGLE_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise ValueError(f"{index} is not a safetensors index (no valid 'weight_map': {exc})") from None
            key_file = {key: self.directory / name for key, name in weight_map.items()}
            for path in sorted(set(key_file.values())):
                if not path.is_file():
                    raise FileNotFoundError(f"{path} is missing: {index} lists it as a weight shard")
                check_whole(path)
            return key_file
        if single.is_file():
            check_whole(single)
            with safe_open(str(single), "pt") as f:
                return {key: single for key in f.keys()}
        raise FileNotFoundError(f"{self.directory} has neither {SINGLE_FILE} nor {INDEX_FILE}: not a safetensors "
                                "model directory (re-save a .bin model with save_pretrained(safe_serialization=True))")

    def _handle(self, key: str):
        if key not in self.key_file:
            raise KeyError(f"the checkpoint in {self.directory} has no tensor '{key}'")
        path = self.key_file[key]
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), "pt")
        return self._handles[path]

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of ``key`` from the file header, without reading the data."""
        return tuple(self._handle(key).get_slice(key).get_shape())

    def read(self, key: str, dim: Optional[int] = None, start: int = 0, stop: Optional[int] = None
             ) -> torch.Tensor:
        """Tensor ``key``, or only its ``[start:stop]`` range along ``dim`` (the rest is never read)."""
        if dim is None:
            return self._handle(key).get_tensor(key)
        index = (slice(None),) * dim + (slice(start, stop),)
        return self._handle(key).get_slice(key)[index]

    def stream(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every (key, tensor) of the checkpoint, file by file, one tensor in memory at a time."""
        for path in self.files:
            with safe_open(str(path), "pt") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "HFCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ShardedWriter:
    """Write tensors into safetensors shards of at most ``max_shard_bytes`` (a bigger tensor gets its own).

    Shards are named like ``save_pretrained`` names them (``model-00001-of-00003.safetensors`` plus the index,
    or a lone ``model.safetensors``); the final names are given once the shard count is known.
    """

    def __init__(self, directory: Path, max_shard_bytes: int) -> None:
        self.directory, self.max_shard_bytes = directory, max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[key] = tensor.contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.directory / f".part-{len(self._written):05d}.safetensors"
        save_safetensors(self._pending, path)
        self._written.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[Path]:
        """Flush the last shard, give every shard its final name, write the index; returns the shard paths."""
        if self._pending or not self._written:
            self._flush()
        count = len(self._written)
        if count == 1:
            final = self.directory / SINGLE_FILE
            self._written[0][0].rename(final)
            return [final]
        weight_map, paths = {}, []
        for i, (part, keys) in enumerate(self._written):
            final = self.directory / f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            part.rename(final)
            paths.append(final)
            weight_map.update({key: final.name for key in keys})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
        return paths
