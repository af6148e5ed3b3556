"""float64 oracle of what the Triton kernels compute under ACP.

The kernels skip whole tiles (naive.tile_rule_decay); each pass has its own
tiles (triton_ops.kernel_config), so the forward, the dQ pass and the
dK / dV pass may keep different pairs below the threshold.  This oracle
applies each pass's tile rule where that pass's results come from: the
output and lse from the forward's tiles, dq and dc_q from the dQ kernel's,
dk, dv and dc_k from the dK / dV kernel's, each gradient given the merged
output and lse as the chunk backward takes them.
"""

import torch

from fox_megatron.kernels.forgetting_attn.interface import _torch_chunk_backward
from fox_megatron.kernels.forgetting_attn.naive import naive_attention_chunk, tile_rule_decay
from fox_megatron.kernels.forgetting_attn.triton_ops import kernel_config


def pass_tiles(head_dim, dtype):
    """{"fwd" | "dq" | "dkdv": (BLOCK_M, BLOCK_N)} of the Triton kernels for this dtype."""
    return {kind: kernel_config(kind, head_dim, dtype)[:2] for kind in ("fwd", "dq", "dkdv")}


def piece_tokens(seg, batch, tq, tk):
    """Per token of a chunk pair with document pieces: (start, length) of its
    piece among the queries [batch, tq] and among the keys [batch, tk]
    (tokens of no piece: (0, 0))."""
    qs, ql = torch.zeros(batch, tq, dtype=torch.long), torch.zeros(batch, tq, dtype=torch.long)
    ks, kl = torch.zeros(batch, tk, dtype=torch.long), torch.zeros(batch, tk, dtype=torch.long)
    for r, a, n, b, m in zip(seg.row.tolist(), seg.qstart.tolist(), seg.qlen.tolist(), seg.kstart.tolist(),
                             seg.klen.tolist()):
        qs[r, a:a + n], ql[r, a:a + n] = a, n
        ks[r, b:b + m], kl[r, b:b + m] = b, m
    return (qs, ql), (ks, kl)


def prune_decays(c_q, c_k, tiles, pieces=None):
    """{pass: [B, H, Tq, Tk]} tile-rule decays of each pass (c_q, c_k: [B, H, T])."""
    q_piece, k_piece = pieces if pieces is not None else (None, None)
    cq, ck = c_q.permute(0, 2, 1).cpu(), c_k.permute(0, 2, 1).cpu()
    return {kind: tile_rule_decay(cq, ck, bm, bn, q_piece, k_piece) for kind, (bm, bn) in tiles.items()}


def chunk_forward(q, k, v, c_q, c_k, causal, scale, thr, decays, same_doc=None, query_thr=None):
    """(out, lse) float64 with the forward's tile rule (c_q, c_k: [B, H, T];
    thr [B, H] or query_thr [B, Tq, H])."""
    return naive_attention_chunk(q.double(), k.double(), v.double(), c_q.permute(0, 2, 1).double(),
                                 c_k.permute(0, 2, 1).double(), causal=causal, softmax_scale=scale,
                                 acp_threshold=thr, same_doc=same_doc, query_threshold=query_thr,
                                 prune_decay=decays["fwd"])


def chunk_backward(do, q, k, v, c_q, c_k, out, lse, causal, scale, thr, decays, same_doc=None, query_thr=None,
                   delta=None):
    """(dq, dk, dv, dc_q, dc_k) float64: the query gradients with the dQ
    kernel's tile rule, the key gradients with the dK / dV kernel's."""
    args = [t.double() if t is not None else None for t in (do, q, k, v, c_q, c_k, out, lse)]
    kw = dict(same_doc=same_doc, query_thr=query_thr, delta=None if delta is None else delta.double())
    dq, _, _, dcq, _ = _torch_chunk_backward(*args, causal, scale, thr, prune_decay=decays["dq"], **kw)
    _, dk, dv, _, dck = _torch_chunk_backward(*args, causal, scale, thr, prune_decay=decays["dkdv"], **kw)
    return dq, dk, dv, dcq, dck
