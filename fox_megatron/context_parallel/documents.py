"""Packed documents in the ring: what every rank derives from cu_seqlens.

``cu_seqlens`` holds document starts over the row-major flattening of the
*global* (unsplit) [B, L] tokens, as for single-device attention.  Every rank
has it, so every rank can place every chunk's tokens in their documents
without communication.

With the global cumulative decay c (decay.py) nothing has to restart at a
document start: for i, j in one document, c_i - c_j sums only gates of that
document.  (decay.py still subtracts a per-document base, known to every
rank, only to keep the float32 decays small.)  What packing adds is a
document mask, and it has a simple shape for the ring:

- a key that precedes query chunk q (an off-diagonal pair) can share a
  document with a query of q only if that document runs across q's first
  token, i.e. it is the document d0 of q's first token.  So an off-diagonal
  pair is one piece per batch row: the queries of d0 in q against the keys of
  d0 in the key chunk; key sub-blocks that end before d0 starts hold nothing
  q can see and are dropped from the skip table (neither computed nor sent),
  and the ACP test of the pair uses d0's threshold;
- a diagonal pair splits into one causal piece per document in the chunk.

The tables are built on the host in O(documents + chunks) per pair; no
pass over token pairs anywhere.
"""

from __future__ import annotations

import torch

from fox_megatron.kernels import ChunkSegments, SequenceTable
from fox_megatron.kernels.forgetting_attn.interface import SameTensorCache

from .layout import zigzag_chunks

__all__ = ["RingDocuments"]


class RingDocuments:
    """Packed documents of a zigzag-split batch, for the ring and its plan.

    batch: B; seqlen: the global row length L; cp_size: P; sub_blocks: the
    parts each of the 2P chunks is cut into (the plan's unit of transfer).
    """

    def __init__(self, cu_seqlens: torch.Tensor, batch: int, seqlen: int, cp_size: int, sub_blocks: int):
        seqs = SequenceTable.build(batch, seqlen, cu_seqlens, "cpu")  # checks cu_seqlens
        self.cu = seqs.cu_seqlens  # int64, cpu
        self.cu_device = cu_seqlens.detach().to(torch.int64)  # where the tokens are
        self.lengths = seqs.length.long()  # [S]
        # row and in-row start of every document (an empty document at the
        # very end is clamped into range: no token belongs to it)
        self.doc_row = seqs.row.long().clamp(max=batch - 1)
        self.doc_start = seqs.start.long()
        self._cache = {}
        self.batch, self.seqlen, self.cp_size, self.sub_blocks = batch, seqlen, cp_size, sub_blocks
        C = 2 * cp_size
        if seqlen % (C * sub_blocks):
            raise ValueError(f"a row of {seqlen} tokens does not split into {C} chunks of {sub_blocks} sub-blocks")
        self.chunk = seqlen // C
        self.sub = self.chunk // sub_blocks
        base = torch.arange(batch)[:, None] * seqlen
        first = torch.arange(C)[None, :] * self.chunk  # first token of every chunk
        # [B, C]: the document of each chunk's first token and where it starts in its row
        self.first_doc = torch.searchsorted(self.cu, base + first, right=True) - 1
        self.first_start = self.cu[self.first_doc] - base

    @property
    def num(self) -> int:
        return self.lengths.numel()

    def need_mask(self) -> torch.Tensor:
        """[B, 2P (query chunk), 2P (key chunk), nsub] bool: may the key
        sub-block hold a key of the document of the query chunk's first token
        (its last key at or after that document's start)?  Off-diagonal pairs
        see no other document; the diagonal always passes."""
        C, nsub = 2 * self.cp_size, self.sub_blocks
        last = (torch.arange(C)[:, None] * self.chunk + (torch.arange(nsub)[None, :] + 1) * self.sub - 1)  # k s
        return last[None, None, :, :] >= self.first_start[:, :, None, None]

    def chunk_thresholds(self, threshold: torch.Tensor) -> torch.Tensor:
        """Per-document thresholds [S, H] -> [B, H, 2P]: the one of each
        query chunk's first document, the only document an off-diagonal pair
        of that chunk attends within."""
        return threshold[self.on_device("first_doc", threshold.device)].permute(0, 2, 1)

    def local_doc_ids(self, rank: int, device) -> torch.Tensor:
        """[B, T_local] document of each of ``rank``'s zigzag-local tokens."""
        key = ("local", rank, str(device))
        if key not in self._cache:
            t = torch.arange(self.chunk, device=device)
            pos = torch.cat([c * self.chunk + t for c in zigzag_chunks(rank, self.cp_size)])
            flat = torch.arange(self.batch, device=device)[:, None] * self.seqlen + pos[None, :]
            self._cache[key] = torch.searchsorted(self.cu_device.to(device), flat, right=True) - 1
        return self._cache[key]

    def on_device(self, name: str, device) -> torch.Tensor:
        """Attribute ``name`` on ``device``, copied once."""
        key = (name, str(device))
        if key not in self._cache:
            self._cache[key] = getattr(self, name).to(device)
        return self._cache[key]

    def decay_bases(self, prefix: torch.Tensor, c_last: torch.Tensor) -> torch.Tensor:
        """[S, H] a base decay per document, subtracted from the decays of
        its tokens to keep them small (float32 loses the low bits of a
        decay summed over a long row).

        prefix: [B, H, 2P] global decay before each chunk; c_last: [B, H, 2P,
        nsub] at each sub-block's last token (float64, every rank has both).
        A document's base is the decay just before the sub-block holding its
        start: so every rank derives the same base without communication,
        and differences c_i - c_j inside a document are unchanged.
        """
        dev = prefix.device
        before = torch.cat([prefix[..., None], c_last[..., :-1]], dim=-1)  # B H C nsub: decay before each sub-block
        start = self.on_device("doc_start", dev).clamp(max=self.seqlen - 1)
        ch, s = start // self.chunk, (start % self.chunk) // self.sub
        return before[self.on_device("doc_row", dev), :, ch, s]  # S H

    def segments(self, qc: int, kc: int, ks: int, batch_rows: torch.Tensor) -> ChunkSegments:
        """Pieces of query chunk ``qc`` against key chunk ``kc`` from its
        sub-block ``ks`` on, for chunk-tensor rows of batch rows ``batch_rows``."""
        k0 = kc * self.chunk + ks * self.sub
        return ChunkSegments.from_documents(
            self.cu, self.seqlen, qc * self.chunk, self.chunk, k0, (kc + 1) * self.chunk - k0, rows=batch_rows
        )


_RING_DOCUMENTS = SameTensorCache()
_LONGEST_DOCUMENT = SameTensorCache()


def ring_documents(cu_seqlens: torch.Tensor, batch: int, seqlen: int, cp_size: int, sub_blocks: int) -> RingDocuments:
    """``RingDocuments`` of ``cu_seqlens``, built once for all the layers
    that pass the same tensor."""
    return _RING_DOCUMENTS.get(cu_seqlens, (batch, seqlen, cp_size, sub_blocks),
                               lambda: RingDocuments(cu_seqlens, batch, seqlen, cp_size, sub_blocks))


def longest_document(cu_seqlens: torch.Tensor) -> int:
    """The longest document of ``cu_seqlens`` (read back once per tensor):
    the ``max_seqlen`` that lets the kernel check the offsets on the GPU."""
    return _LONGEST_DOCUMENT.get(
        cu_seqlens, (), lambda: int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 1)

