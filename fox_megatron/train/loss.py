"""Forward pass and loss of one micro-batch, shared by both execution paths."""

from __future__ import annotations

import torch


def model_forward(model, mb):
    """Per-token cross-entropy [b, s] (GPTModel computes it when given labels;
    on a middle pipeline stage: the hidden states for the next stage)."""
    return model(
        mb.tokens,
        mb.position_ids,
        mb.attention_mask,
        labels=mb.labels,
        packed_seq_params=mb.packed_seq_params,
    )


def masked_loss_sum(per_token_loss: torch.Tensor, loss_mask: torch.Tensor):
    """(sum of the unmasked token losses, number of unmasked tokens).

    A sum, not a mean: the step divides once by the token count of the whole
    global batch (all micro-batches, all data-parallel ranks), so the result
    does not depend on how the batch was cut.
    """
    losses = per_token_loss.float().reshape(-1)
    mask = loss_mask.reshape(-1).float()
    return (losses * mask).sum(), mask.sum()
