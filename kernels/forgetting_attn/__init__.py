"""Forgetting attention (FoX) with Adaptive Computation Pruning.

Files:
  interface.py   public functions, input checks, dispatch
  triton_ops.py  Triton kernels (forward, backward, ACP boundary search)
  acp.py         threshold, logit bounds, tile boundaries, statistics
  naive.py       pure-torch reference (test oracle and CPU path)
"""

from .acp import (
    AcpConfig,
    acp_threshold,
    kept_tile_fraction,
    logit_bound_from_qk_norm,
    logit_bound_from_tensors,
    reference_block_boundaries,
)
from .interface import (
    AcpStats,
    ChunkSegments,
    SequenceTable,
    attention_chunk_backward,
    attention_chunk_backward_into,
    attention_chunk_forward,
    attention_chunk_forward_into,
    attention_row_delta,
    forgetting_attention,
    merge_partial_attention,
)
from .naive import cumulative_log_decay, naive_attention_chunk, naive_forgetting_attention, reverse_cumulative_sum

__all__ = [
    "AcpConfig",
    "AcpStats",
    "ChunkSegments",
    "SequenceTable",
    "acp_threshold",
    "attention_chunk_backward",
    "attention_chunk_backward_into",
    "attention_chunk_forward",
    "attention_chunk_forward_into",
    "attention_row_delta",
    "cumulative_log_decay",
    "forgetting_attention",
    "kept_tile_fraction",
    "logit_bound_from_qk_norm",
    "logit_bound_from_tensors",
    "merge_partial_attention",
    "naive_attention_chunk",
    "naive_forgetting_attention",
    "reference_block_boundaries",
    "reverse_cumulative_sum",
]
