"""Context parallelism for FoX attention (DESIGN.md section 2).

- ``cp_forgetting_attention``: the entry point (mode "ring" or "ulysses").
- ring: pruning-aware ring attention (skip table, communication skip,
  byte counts in ``RingStats``); ulysses: head all-to-all (DeepSpeed's
  DistributedAttention when installed).
- ``global_cumulative_decay``: cumulative log-decay across ranks.
- ``RingDocuments``: packed documents (global cu_seqlens) as the ring
  plans and masks them.
- ``shift_tokens_cp``: FoX (Pro)'s token shift with a one-token halo.
- ``zigzag_slice`` / ``zigzag_unslice``: Megatron's zigzag layout.
"""

from .api import CP_MODES, cp_acp_threshold, cp_forgetting_attention
from .decay import global_cumulative_decay
from .documents import RingDocuments
from .halo import halo_previous_tokens, shift_tokens_cp
from .layout import zigzag_chunks, zigzag_slice, zigzag_unslice
from .ring import RingStats, ring_attention
from .skip_table import RingPlan, chunk_need_table
from .ulysses import deepspeed_available, ulysses_attention

__all__ = [
    "CP_MODES",
    "cp_acp_threshold",
    "cp_forgetting_attention",
    "global_cumulative_decay",
    "RingDocuments",
    "halo_previous_tokens",
    "shift_tokens_cp",
    "zigzag_chunks",
    "zigzag_slice",
    "zigzag_unslice",
    "RingStats",
    "ring_attention",
    "RingPlan",
    "chunk_need_table",
    "deepspeed_available",
    "ulysses_attention",
]
