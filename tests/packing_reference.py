"""Test helper: the reference a packed micro-batch must match, the loss averaged per token over several batches
together (as Hugging Face averages over one micro-batch) and the gradient of every MiSS D."""
from __future__ import annotations

import torch

from miss_ds import miss_layers
from miss_ds.data import IGNORE_INDEX


def loss_and_d_grads(model: torch.nn.Module, batches: list[dict]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss over all `batches` together, per trained token (labels shifted as the model shifts them), and D's
    gradient by layer name."""
    model.zero_grad()
    counts = [(b["labels"][..., 1:] != IGNORE_INDEX).sum() for b in batches]
    total = sum(model(**b).loss * n for b, n in zip(batches, counts, strict=True)) / sum(counts)
    total.backward()
    return total.detach(), {name: layer.miss_block.grad.clone() for name, layer in miss_layers(model)}
