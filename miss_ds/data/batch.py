"""What a micro-batch is: the model's keyword arguments, as `engine(**batch)` takes them, how many of its tokens
are real and how many take a loss, and where in the global order a resumed iterator may start. No `datasets`
import, so synthetic benchmark runs can use it."""

import torch
import torch.nn.functional as F

from miss_ds.data.encode import IGNORE_INDEX

Batch = dict[str, torch.Tensor]


def count_tokens(batch: Batch) -> torch.Tensor:
    """Non-padding tokens of `batch` (a 0-dim tensor on the batch's device).

    Padded batches mark padding in `attention_mask`. Packed batches have none: there a padding token is one
    at position 0 not followed by position 1, as an example (at least two tokens: content and eos) starts
    with 0, 1. This holds in one-row layout too.
    """
    if "attention_mask" in batch:
        return batch["attention_mask"].sum()
    positions = batch["position_ids"]
    following = F.pad(positions[..., 1:], (0, 1))
    return positions.numel() - ((positions == 0) & (following != 1)).sum()


def loss_tokens(batch: Batch) -> torch.Tensor:
    """The tokens a causal LM takes a loss on: labels after the one-token shift that are not `IGNORE_INDEX`."""
    return (batch["labels"][..., 1:] != IGNORE_INDEX).sum()


def as_one_row(batch: Batch) -> Batch:
    """A packed micro-batch as a single row of all its tokens: the layout flash attention's varlen path needs
    (transformers reads packed sequences from position ids only in batches of one row). Exact: every row
    starts with an example whose first label is ignored, so no row's last token is trained on the next row."""
    return {name: tensor.reshape(1, -1) for name, tensor in batch.items()}


def check_resumable(state: dict[str, int], micro_step: int) -> None:
    """A saved position must start a micro-step of `micro_step` sequences (micro_batch_size x dp_size)."""
    if state["consumed"] % micro_step:
        raise ValueError(f"cannot resume at sequence {state['consumed']} of epoch {state['epoch']}: it was saved with "
                         f"a global batch of {state['global_batch']} sequences, and train.micro_batch_size x "
                         f"data-parallel ranks = {micro_step} does not divide that position. Choose a micro-batch "
                         f"size and rank count whose product divides {state['global_batch']}")
