"""ACP statistics gathered from the FoX layers of a model.

Each ``FoxSelfAttention`` keeps the mean kept-tile fraction of its last
forward as a detached device tensor.  Reading them here stacks and averages
on the device; only the caller's ``float()`` (at logging time) syncs.
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional, Union

import torch

from .attention import FoxSelfAttention

__all__ = ["fox_attention_modules", "acp_kept_fraction_per_layer", "collect_acp_kept_fraction"]

Models = Union[torch.nn.Module, Iterable[torch.nn.Module]]


def fox_attention_modules(model: Models):
    """Every FoxSelfAttention in a model or a list of model chunks (VPP)."""
    chunks = [model] if isinstance(model, torch.nn.Module) else list(model)
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, FoxSelfAttention):
                yield module


def acp_kept_fraction_per_layer(model: Models) -> Dict[int, torch.Tensor]:
    """{layer_number: kept-tile fraction of the last forward} for layers that have one."""
    return {
        m.layer_number: m.acp_kept_fraction
        for m in fox_attention_modules(model)
        if m.acp_kept_fraction is not None
    }


def collect_acp_kept_fraction(
    model: Models, group: Optional[torch.distributed.ProcessGroup] = None
) -> Optional[torch.Tensor]:
    """Mean kept-tile fraction over this rank's FoX layers (0-dim tensor), or None.

    With ``group`` (e.g. the pipeline group, or TP to average over head
    shards) the per-rank means are averaged across it: a collective, so
    every rank of the group must call it.
    """
    values = list(acp_kept_fraction_per_layer(model).values())
    if group is None:
        return torch.stack(values).mean() if values else None
    device = values[0].device if values else _default_device()
    pair = torch.zeros(2, dtype=torch.float32, device=device)
    if values:
        pair[0] = torch.stack(values).float().sum()
        pair[1] = len(values)
    torch.distributed.all_reduce(pair, group=group)
    return pair[0] / pair[1] if bool(pair[1] > 0) else None


def _default_device():
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
