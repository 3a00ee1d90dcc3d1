"""What generation and evaluation load, and how the model was trained to be prompted.

One of:

- a base plus a miss_ds adapter (``checkpoint``: a training checkpoint or adapter dir). The base defaults to the one
  the adapter records (the run's ``model.path``, or the random base the run saved) and is checked against it
  (config, shapes, fingerprint: ``convert.source.check_fits_base``). Built as the trainer builds it (on meta, split
  for TP, MiSS layers, this rank's slices read), so it runs on any TP size;
- a base plus a PEFT adapter (``adapter``: a MiSS or LoRA export, or any PEFT adapter), one process; the base is
  checked against the fingerprint a ``--peft`` export keeps beside it (an adapter without one is taken as it is);
- a model directory alone (``base``: a merged export, or any Hugging Face model), one process.

The run config (the prompt format, the data files, the dtype) comes from ``config`` (a run YAML) when given, else
from the training checkpoint or the run config an export carries (``convert.output.RUN_CONFIG_FILE``). Without one,
prompts go through the tokenizer's chat template when it has one, else as plain text (warned).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .. import fingerprint
from ..adapter_io import ADAPTER_CONFIG, AdapterMismatch
from ..checkpoint_files import ADAPTER_DIR
from ..convert.output import RUN_CONFIG_FILE, TOKENIZER_FILE, read_base_fingerprint, read_run_config
from ..convert.source import Adapter, is_peft_adapter, known_base, read_adapter, read_base_config
from ..data.config import DataConfig
from ..families import family_of
from ..hf_checkpoint import HFCheckpoint
from ..run_config import ConfigError, RunConfig, config_from_dict, load_config

logger = logging.getLogger(__name__)


@dataclass
class Source:
    base: Path
    """A Hugging Face model directory: the base of ``adapter``/``peft_adapter``, or the whole model."""
    adapter: Optional[Adapter] = None
    peft_adapter: Optional[Path] = None
    run_config: Optional[RunConfig] = None

    def tokenizer(self) -> Any:
        """The base's tokenizer, else the one the run trained with."""
        from transformers import AutoTokenizer

        for candidate in (self.base, self.peft_adapter, self.run_config and self.run_config.tokenizer):
            if candidate is not None and (Path(candidate) / TOKENIZER_FILE).is_file():
                return AutoTokenizer.from_pretrained(str(candidate))
        raise FileNotFoundError(f"no tokenizer in {self.base}, nor a run config naming one that is here")

    def data_config(self, tokenizer: Any, on_bad_row: Optional[str] = None) -> DataConfig:
        """The data config the model was trained with (its prompt format and data files), with ``on_bad_row`` when
        given."""
        if self.run_config is not None:
            cfg = self.run_config.data
        else:
            fmt = "chat" if getattr(tokenizer, "chat_template", None) else "text"
            logger.warning("no run config recorded with %s: prompting in the '%s' format (pass --config RUN.yaml for "
                           "the format the model was trained with)", self.peft_adapter or self.base, fmt)
            cfg = DataConfig(format=fmt)
        return replace(cfg, on_bad_row=on_bad_row) if on_bad_row else cfg

    def check_tp(self, tp: int) -> None:
        """Refuse ``--tp`` above 1 for what cannot be split: only a base plus a miss_ds checkpoint is built per TP
        rank."""
        if tp > 1 and self.adapter is None:
            raise ConfigError(f"--tp {tp} splits a base plus a miss_ds checkpoint (--checkpoint); a merged model or a "
                              "PEFT adapter runs whole: pass --tp 1")

    def positions(self) -> Optional[int]:
        """The model's ``max_position_embeddings`` (None when its config has none)."""
        return getattr(read_base_config(self.base), "max_position_embeddings", None)

    def dtype(self, override: Optional[str]) -> torch.dtype:
        """``override``, else the dtype the run trained in, else float32."""
        from ..modeling import DTYPES

        return DTYPES[override or (self.run_config.model.dtype if self.run_config else "float32")]


def resolve(checkpoint: Optional[str] = None, adapter: Optional[str] = None, base: Optional[str] = None,
            config: Optional[str] = None) -> Source:
    """The source the commands' ``--checkpoint`` / ``--adapter`` / ``--base`` / ``--config`` name; a base of a model
    family miss_ds does not support is refused (``UnsupportedModel``), as training refuses it."""
    if checkpoint and adapter:
        raise ConfigError("--checkpoint (a miss_ds adapter) and --adapter (a PEFT adapter) exclude each other")
    run_config = load_config(config, check_files=False) if config else None
    if checkpoint:
        miss_adapter = read_adapter(checkpoint, peft_advice="pass it as --adapter (with --base when it names no base "
                                                            "that is here)")
        known = known_base(miss_adapter, base)
        if known is None:
            raise ConfigError(f"{miss_adapter.directory} records no base model that is here: pass --base")
        if run_config is None and miss_adapter.run_config is not None:
            run_config = config_from_dict(miss_adapter.run_config, str(miss_adapter.directory.parent))
        return Source(known, adapter=miss_adapter, run_config=run_config)
    if adapter:
        adapter_dir = Path(adapter)
        recorded = _read_peft_config(adapter_dir).get("base_model_name_or_path")
        if not (base or recorded):
            raise ConfigError(f"{adapter_dir / ADAPTER_CONFIG} names no base model: pass --base")
        peft_base = _supported(Path(base or recorded))
        _check_peft_base(adapter_dir, peft_base)
        return Source(peft_base, peft_adapter=adapter_dir, run_config=run_config or _recorded_run_config(adapter_dir))
    if not base:
        raise ConfigError("name the model: --checkpoint (with --base), --adapter (with --base), or --base alone")
    return Source(_supported(Path(base)), run_config=run_config or _recorded_run_config(Path(base)))


def check_weights(model_dir: Path) -> None:
    """Refuse a model directory without the weights ``from_pretrained`` reads (its OSError is a traceback), naming
    what is missing: safetensors (``HFCheckpoint`` checks the file, or the index and its shards), else a .bin."""
    from transformers.utils import WEIGHTS_INDEX_NAME, WEIGHTS_NAME

    if not any((model_dir / name).is_file() for name in (WEIGHTS_NAME, WEIGHTS_INDEX_NAME)):
        HFCheckpoint(model_dir).close()


def _read_peft_config(directory: Path) -> dict[str, Any]:
    """The adapter_config.json of the PEFT adapter ``--adapter`` names; a miss_ds checkpoint or adapter (no
    ``peft_type``) is sent to ``--checkpoint``."""
    file = directory / ADAPTER_CONFIG
    if is_peft_adapter(directory):
        return json.loads(file.read_text())
    if file.is_file() or (directory / ADAPTER_DIR / ADAPTER_CONFIG).is_file():
        raise ConfigError(f"--adapter {directory} is a miss_ds checkpoint or adapter, not a PEFT export: pass it as "
                          "--checkpoint")
    raise FileNotFoundError(f"--adapter {directory}: {file} is missing; name a PEFT adapter directory (a MiSS or LoRA "
                            "export of miss-ds-convert)")


def _check_peft_base(adapter: Path, base: Path) -> None:
    """Refuse a base the PEFT export ``adapter`` was not trained on, by the base fingerprint miss-ds-convert --peft
    keeps beside it (``convert.output.FINGERPRINT_FILE``), as a miss_ds checkpoint's base is checked; a PEFT adapter
    without one (made elsewhere) cannot be checked and is taken as it is."""
    recorded = read_base_fingerprint(adapter)
    if recorded is None:
        return
    with HFCheckpoint(base) as weights:
        try:
            fingerprint.check(recorded, lambda positions: fingerprint.read_checkpoint(weights, positions),
                              str(adapter), str(base))
        except KeyError as exc:  # a sampled weight the base lacks
            raise AdapterMismatch(f"{adapter} adapts weights that {base} does not have ({exc.args[0]}): wrong base "
                                  "model?") from None


def _supported(base: Path) -> Path:
    """``base``, a local model directory of a family miss_ds supports (``families.family_of`` refuses others)."""
    family_of(read_base_config(base))
    return base


def _recorded_run_config(directory: Path) -> Optional[RunConfig]:
    recorded = read_run_config(directory)
    return None if recorded is None else config_from_dict(recorded, str(directory / RUN_CONFIG_FILE))


def load_model(source: Source, device: torch.device | str, dtype: torch.dtype, tp: int = 1) -> nn.Module:
    """The model of ``source`` in eval mode on ``device``, its weights in ``dtype``: this rank's part of it for
    ``tp`` > 1 (miss_ds adapters only; every rank of the job calls it)."""
    source.check_tp(tp)
    if source.adapter is None:
        from transformers import AutoModelForCausalLM

        check_weights(source.base)
        model = AutoModelForCausalLM.from_pretrained(str(source.base), dtype=dtype).to(device)
        if source.peft_adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(source.peft_adapter))
        return model.eval()
    from transformers import AutoConfig

    from ..engine import prepare_model
    from ..loading import build_model_on_meta, load_sharded_weights

    miss = source.adapter.config
    model = build_model_on_meta(AutoConfig.from_pretrained(str(source.base)), dtype)
    grain = source.run_config.parallel.tp_grain_size if source.run_config else 1
    prepare_model(model, miss, tp, grain)
    load_sharded_weights(model, source.base, device, dtype, miss_config=miss, adapter=source.adapter.tensors)
    return model.eval()
