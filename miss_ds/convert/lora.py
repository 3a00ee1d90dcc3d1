"""Export ``miss`` and ``mini`` adapters as exact LoRA adapters (PEFT format): many adapters on one served base.

MiSS's ``miss``/``mini`` update is exactly low-rank. ``functional.delta_weight`` is ΔW[o, c] = D'[c mod r, o], with
D' = D (``miss``) or ``mini``'s D tiled along out (``functional.expand_d``), so ΔW = D'ᵀ E with E the (r, in) 0/1
matrix E[j, c] = 1 iff c mod r == j (the last, partial chunk included: aggregation pads it with zeros). LoRA adds
(lora_alpha / r) · B A x with A (r, in) and B (out, r): A = E, B = D'ᵀ and lora_alpha = r (use_rslora off), so the
scaling is exactly 1 and the LoRA adapter of rank r computes what the MiSS adapter computes. A is a fixed 0/1
matrix, stored dense because the format has no other way. ``bat`` (Bone) is not low-rank (its update W_ab D_a + D_a
depends on W): it keeps the merged export.

``target_modules`` are the adapted modules' last names (what vLLM and SGLang understand), with ``exclude_modules``
naming the modules of those names the adapter leaves alone, so PEFT wraps exactly the adapted ones. The parameters
of ``modules_to_save`` are exported as PEFT saves them; PEFT loads them, vLLM refuses such adapters and SGLang ignores
them (``SERVER_WARNING``).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
from peft import LoraConfig
from torch import nn

from .. import functional as MF
from ..adapter_io import AdapterMismatch
from ..hf_checkpoint import save_safetensors
from ..loading import build_model_on_meta
from .output import new_output_dir, write_run_config
from .peft import PEFT_PREFIX, PEFT_WEIGHTS, base_name
from .reshard import config_from_summary
from .source import full_geometry, known_base, module_of, read_adapter, read_base_config

logger = logging.getLogger(__name__)

SERVER_WARNING = ("the adapter holds modules_to_save {names}: PEFT loads them, but vLLM refuses LoRA adapters with "
                  "modules_to_save and SGLang does not load them; serve the merged export (--merge) there instead")


def lora_factors(d: torch.Tensor, geometry: MF.MissGeometry) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA's (A, B) for one full D: B A == ``functional.delta_weight`` (``miss`` and ``mini``)."""
    if geometry.mode == "bat":
        raise AdapterMismatch("mode='bat' has no LoRA form: its update depends on the base weight")
    a = MF.chunk_matrix(geometry.r, geometry.in_features, dtype=d.dtype, device=d.device).clone()
    return a, MF.expand_d(d, geometry).T.contiguous()


def write_lora_adapter(checkpoint: Path | str, output: Path | str, base: Optional[Path | str] = None) -> Path:
    """Write the adapter of ``checkpoint`` as a PEFT LoRA adapter directory ``output`` (adapter_config.json,
    adapter_model.safetensors in fp32, and the training run's config when known). The base is found and checked as
    for the PEFT MiSS export (``peft.base_name``); its config (or the adapter's base summary) gives the weight
    shapes. Warns when the adapter holds modules_to_save (``SERVER_WARNING``)."""
    adapter = read_adapter(checkpoint)
    if adapter.config.mode == "bat":
        raise AdapterMismatch(f"{adapter.directory} is a mode='bat' adapter: bat's update W_ab D_a + D_a depends on "
                              "the base weight and is not low-rank, so it has no LoRA form; export it merged "
                              "(--merge)")
    known = known_base(adapter, base)
    config = read_base_config(known) if known is not None else config_from_summary(adapter.meta["base_model"],
                                                                                   adapter.directory)
    linears = {name: m for name, m in build_model_on_meta(config).named_modules() if isinstance(m, nn.Linear)}
    tensors = {}
    for key, d in adapter.d.items():
        module = module_of(key)
        if module not in linears:
            raise AdapterMismatch(f"'{key}' of {adapter.directory} adapts '{module}', which the base has not as a "
                                  "linear")
        a, b = lora_factors(d.to(torch.float32), full_geometry(adapter.config, module, tuple(linears[module].weight.shape)))
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b
    tensors.update({PEFT_PREFIX + key: t.to(torch.float32).contiguous() for key, t in adapter.saved.items()})
    adapted = {module_of(key) for key in adapter.d}
    leaves = sorted({name.rpartition(".")[2] for name in adapted})
    others = sorted(name for name in linears if name.rpartition(".")[2] in leaves and name not in adapted)
    cfg = adapter.config
    lora_config = LoraConfig(
        r=cfg.r, lora_alpha=cfg.r, use_rslora=False, lora_dropout=cfg.dropout, target_modules=leaves,
        exclude_modules=others or None, bias="none", modules_to_save=list(cfg.modules_to_save) or None,
        task_type="CAUSAL_LM", base_model_name_or_path=base_name(adapter, known))
    out = new_output_dir(output)
    lora_config.save_pretrained(str(out))
    save_safetensors(tensors, out / PEFT_WEIGHTS)
    write_run_config(out, adapter.run_config)
    if cfg.modules_to_save:
        logger.warning(SERVER_WARNING.format(names=list(cfg.modules_to_save)))
    return out
