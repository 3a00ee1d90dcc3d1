"""Output directories of the export tools: created fresh, given the base model's non-weight files and the run config."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

from ..config import ConfigError

#: Weight files (and their indexes) of a model directory: the export writes its own, never copies these.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")


def new_output_dir(path: Path | str) -> Path:
    """Create ``path``; refuse a non-empty one, so stale shards of an earlier export can't mix in."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists and is not an empty directory: choose a new --output")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a parent that is a file, no permission, a read-only filesystem
        under = next(parent for parent in path.parents if parent.exists())
        raise ConfigError(f"--output {path} cannot be created in {under} ({exc.strerror}): choose another "
                          "--output") from None
    return path


def copy_model_files(base: Path | str, output: Path) -> list[str]:
    """Copy config.json, generation_config.json, tokenizer files, chat template, license... from ``base``.

    Everything at the top level of ``base`` except weights and hidden files; returns the names copied.
    """
    copied = []
    for item in sorted(Path(base).iterdir()):
        if item.is_file() and not item.name.startswith(".") and not item.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(item, output / item.name)
            copied.append(item.name)
    return copied


#: The training run's config, written next to every export of a training checkpoint: generation and evaluation read
#: the prompt format the model was trained with from it (``data.format``, ``data.prompt_separator``).
RUN_CONFIG_FILE = "miss_ds_run_config.json"
#: Where a PEFT export records the fingerprint of its base (``fingerprint``).
FINGERPRINT_FILE = "miss_ds_base_fingerprint.json"
#: The file a model directory's tokenizer is found by (``AutoTokenizer.from_pretrained`` reads it first).
TOKENIZER_FILE = "tokenizer_config.json"


def write_run_config(output: Path, run_config: Optional[dict[str, Any]]) -> None:
    """Record the run config of the exported adapter's training run in ``output`` (nothing for a bare adapter)."""
    if run_config is not None:
        (output / RUN_CONFIG_FILE).write_text(json.dumps(run_config, indent=1))


def write_base_fingerprint(output: Path, recorded: Optional[list]) -> None:
    """Record the fingerprint of the base the exported adapter was trained on (its ``base_fingerprint``) beside a
    PEFT export, whose own config has no place for it: ``init_adapter`` checks it (nothing when none is recorded)."""
    if recorded is not None:
        (output / FINGERPRINT_FILE).write_text(json.dumps(recorded))


def read_base_fingerprint(export: Path) -> Optional[list]:
    """The base fingerprint an export records (``write_base_fingerprint``), or None."""
    path = Path(export) / FINGERPRINT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def read_run_config(export: Path) -> Optional[dict[str, Any]]:
    """The run config an export records (``write_run_config``), or None."""
    path = Path(export) / RUN_CONFIG_FILE
    return json.loads(path.read_text()) if path.is_file() else None
