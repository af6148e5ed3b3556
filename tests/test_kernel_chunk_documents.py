"""Chunk-pair kernels with packed documents (the ring CP building block).

A query chunk and a key chunk of packed rows split into document-local
pieces (``ChunkSegments``).  Each backend's chunk forward / backward is
checked against a float64 oracle written from the formula with an
independent document mask (document id of every token): output, lse, and
the gradients dq, dk, dv, dc_q, dc_k given the merged (whole-sequence) output
and lse, as the ring's backward uses them.  With ACP the Triton kernels
are checked against the oracle with their tile rule (tile_oracle.py: each
pass skips whole tiles of its own, counted from each piece's start).  The
Triton kernels run in Triton's interpreter on CPU (fp32, small shapes).
"""

import math

import pytest
import torch

from fox_megatron.kernels import (
    ChunkSegments,
    attention_chunk_backward,
    attention_chunk_forward,
    naive_forgetting_attention,
)
from fox_megatron.kernels.forgetting_attn.naive import token_document_ids
from tile_oracle import pass_tiles, piece_tokens, prune_decays

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

L = 160  # row length
# row 0: documents of odd lengths, one of length 1, an empty one (repeated
# offset); row 1: one document spanning the row
CU = [0, 12, 90, 91, 110, 110, 150, L, 2 * L]
# chunks spanning several kernel tiles (fp32 tiles are 32 to 64 wide)
Q_RANGE = (80, 75)  # queries [80, 155): documents cross both of its borders
K_RANGE = (9, 71)  # keys [9, 80) for the off-diagonal pair


def _inputs(Hq, Hkv, D, seed):
    g = torch.Generator().manual_seed(seed)
    B = CU[-1] // L
    q = torch.randn(B, L, Hq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, L, Hkv, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, L, Hkv, D, generator=g, dtype=torch.float64)
    log_f = -torch.rand(B, L, Hq, generator=g, dtype=torch.float64) * torch.logspace(-2, 0, Hq, dtype=torch.float64)
    do = torch.randn(B, L, Hq, D, generator=g, dtype=torch.float64)
    return q, k, v, log_f, do


def _oracle(q, k, v, c, do, out_m, lse_m, qr, kr, causal, scale, thr_doc, doc, prune=None):
    """float64: (out, lse) of the pair and the gradients of
    G = sum_ij p_ij (do_i . v_j - do_i . o_i), p_ij = exp(s_ij - lse_i)
    (lse, o the merged ones), whose gradients are the chunk backward's.
    prune: {"fwd" | "dq" | "dkdv": decay the threshold is compared with}
    (tile_oracle.prune_decays): each result with its pass's tile rule;
    None: the element rule everywhere."""
    Hq, Hkv = q.shape[2], k.shape[2]
    qs, ks = slice(qr[0], qr[0] + qr[1]), slice(kr[0], kr[0] + kr[1])
    leaves = [t.detach().clone().requires_grad_() for t in (q[:, qs], k[:, ks], v[:, ks], c[:, qs], c[:, ks])]
    qq, kk, vv, cq, ck = leaves
    kk_ = kk.repeat_interleave(Hq // Hkv, 2)
    vv_ = vv.repeat_interleave(Hq // Hkv, 2)
    decay = cq.permute(0, 2, 1)[..., :, None] - ck.permute(0, 2, 1)[..., None, :]  # B H i j
    s = torch.einsum("bihd,bjhd->bhij", qq, kk_) * scale + decay
    dq_, dk_ = doc[:, qs], doc[:, ks]
    keep = (dq_[:, :, None] == dk_[:, None, :])[:, None]
    if causal:
        keep = keep & torch.ones(qr[1], kr[1], dtype=torch.bool).tril()

    def kept(which):
        if thr_doc is None:
            return keep
        d = decay if prune is None else prune[which]
        return keep & (d >= thr_doc[dq_].permute(0, 2, 1)[..., None])

    keep_fwd = kept("fwd")
    if thr_doc is not None:
        assert (keep & ~keep_fwd).any() and keep_fwd.any()  # the thresholds prune some pairs, not all
    s_kept = s.masked_fill(~keep_fwd, float("-inf"))
    lse = torch.logsumexp(s_kept, -1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    out = torch.einsum("bhij,bjhd->bihd", torch.exp(s_kept - safe[..., None]), vv_)
    dov = torch.einsum("bihd,bjhd->bhij", do[:, qs], vv_)
    delta = (do[:, qs] * out_m[:, qs]).sum(-1).permute(0, 2, 1)

    def G(which):
        p = torch.where(kept(which), torch.exp(s - lse_m[:, :, qs][..., None]), torch.zeros_like(s))
        return (p * (dov - delta[..., None])).sum()

    dq, dc_q = torch.autograd.grad(G("dq"), (qq, cq), retain_graph=True)
    dk, dv, dc_k = torch.autograd.grad(G("dkdv"), (kk, vv, ck))
    return out.detach(), lse.detach(), (dq, dk, dv, dc_q.permute(0, 2, 1), dc_k.permute(0, 2, 1))


def _close(a, b, what, tol=2e-4):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    assert a.shape == b.shape, what
    fin = torch.isfinite(b)
    assert torch.equal(torch.isfinite(a), fin), f"{what}: -inf pattern"
    err = (a[fin] - b[fin]).abs().max().item() if fin.any() else 0.0
    assert err <= tol * max(1.0, b[fin].abs().max().item()), f"{what}: {err}"


def test_segments_from_documents():
    cu = torch.tensor(CU)
    seg = ChunkSegments.from_documents(cu, L, *Q_RANGE, *K_RANGE)
    # off-diagonal: in row 0 only document [12, 90) meets both ranges; row 1 all
    assert seg.row.tolist() == [0, 1]
    assert seg.qstart.tolist() == [0, 0] and seg.qlen.tolist() == [90 - 80, 75]
    assert seg.kstart.tolist() == [12 - 9, 0] and seg.klen.tolist() == [80 - 12, 71]
    assert seg.doc.tolist() == [1, 7]
    diag = ChunkSegments.from_documents(cu, L, *Q_RANGE, *Q_RANGE, rows=torch.tensor([1, 0, 0]))
    # rows of the chunk tensors map to batch rows 1, 0, 0; the empty document is skipped
    assert diag.row.tolist() == [0] + [1] * 5 + [2] * 5
    assert diag.qstart.tolist() == [0] + [0, 10, 11, 30, 70] * 2
    assert diag.qlen.tolist() == [75] + [10, 1, 19, 40, 5] * 2
    assert torch.equal(diag.qstart, diag.kstart) and torch.equal(diag.qlen, diag.klen)
    assert diag.doc.tolist() == [7] + [1, 2, 3, 5, 6] * 2
    assert (diag.max_qlen, diag.max_klen) == (75, 75)
    none = ChunkSegments.from_documents(cu, L, 95, 10, 0, 11, rows=torch.tensor([0]))
    assert none.num == 0 and none.max_qlen == 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("acp", [False, True])
@pytest.mark.parametrize("pair", ["diagonal", "off_diagonal"])
def test_chunk_pair_with_documents_matches_oracle(backend, acp, pair):
    Hq, Hkv, D = 4, 2, 16  # GQA
    q, k, v, log_f, do = _inputs(Hq, Hkv, D, seed=3 + acp)
    scale = 1 / math.sqrt(D)
    B = q.shape[0]
    cu = torch.tensor(CU)
    doc = token_document_ids(cu, B, L)
    thr_doc = None
    if acp:
        # per document and head, tight enough to prune inside both pairs
        g = torch.Generator().manual_seed(9)
        thr_doc = -1.0 - 3.0 * torch.rand(len(CU) - 1, Hq, generator=g, dtype=torch.float64)
    # merged output and lse: whole-sequence attention with the same documents
    out_m, lse_m = naive_forgetting_attention(q, k, v, log_f, cu_seqlens=cu, softmax_scale=scale,
                                              acp_threshold=thr_doc, return_lse=True)
    c = torch.cumsum(log_f, 1)  # global decay over the row, as the ring has it
    qr = Q_RANGE
    kr = Q_RANGE if pair == "diagonal" else K_RANGE
    causal = pair == "diagonal"
    seg = ChunkSegments.from_documents(cu, L, *qr, *kr)
    qs, ks = slice(qr[0], qr[0] + qr[1]), slice(kr[0], kr[0] + kr[1])
    prune = None
    if acp and backend == "triton":
        prune = prune_decays(c[:, qs].permute(0, 2, 1), c[:, ks].permute(0, 2, 1), pass_tiles(D, torch.float32),
                             piece_tokens(seg, B, qr[1], kr[1]))
    ref_out, ref_lse, ref_grads = _oracle(q, k, v, c, do, out_m, lse_m, qr, kr, causal, scale, thr_doc, doc, prune)
    if not causal:
        assert torch.isinf(ref_lse).any() and torch.isfinite(ref_lse).any()  # some queries see nothing here

    dt = torch.float32
    dev = lambda t: t.to(DEVICE, dt)  # noqa: E731
    cq, ck = (c[:, s].permute(0, 2, 1).contiguous().to(DEVICE, torch.float32) for s in (qs, ks))
    thr = thr_doc[seg.doc].to(DEVICE, torch.float32) if acp else None
    seg_dev = seg.to(DEVICE) if backend == "triton" else seg
    out, lse = attention_chunk_forward(dev(q[:, qs]), dev(k[:, ks]), dev(v[:, ks]), cq, ck, causal=causal,
                                       softmax_scale=scale, acp_threshold=thr, backend=backend, segments=seg_dev)
    _close(out, ref_out, "out")
    _close(lse, ref_lse, "lse")
    grads = attention_chunk_backward(
        dev(do[:, qs]), dev(q[:, qs]), dev(k[:, ks]), dev(v[:, ks]), cq, ck, dev(out_m[:, qs]),
        lse_m[:, :, qs].to(DEVICE, torch.float32), causal=causal, softmax_scale=scale, acp_threshold=thr,
        backend=backend, segments=seg_dev)
    for name, a, b in zip(("dq", "dk", "dv", "dc_q", "dc_k"), grads, ref_grads):
        _close(a, b, name)
    # keys and queries in no piece get exactly zero gradients
    lone_q = ~(doc[:, qs, None] == doc[:, None, ks]).any(-1)
    assert lone_q.any() != causal
    if lone_q.any():
        assert grads[0].cpu()[lone_q].abs().max() == 0 and grads[3].cpu().permute(0, 2, 1)[lone_q].abs().max() == 0
    lone_k = ~(doc[:, qs, None] == doc[:, None, ks]).any(1)
    if lone_k.any():
        assert grads[1].cpu()[lone_k].abs().max() == 0 and grads[4].cpu().permute(0, 2, 1)[lone_k].abs().max() == 0


def test_segments_are_checked():
    q = torch.zeros(2, 8, 2, 16)
    c = torch.zeros(2, 2, 8)
    cu = torch.tensor([0, 3, 8, 16])
    seg = ChunkSegments.from_documents(cu, 8, 0, 8, 0, 8)
    with pytest.raises(ValueError, match="per piece"):
        attention_chunk_forward(q, q, q, c, c, causal=True, softmax_scale=1.0, acp_threshold=torch.zeros(2, 2),
                                backend="torch", segments=seg)
    off = ChunkSegments.from_documents(cu, 8, 4, 4, 0, 4)  # not aligned
    with pytest.raises(ValueError, match="not aligned"):
        attention_chunk_forward(q[:, :4], q[:, :4], q[:, :4], c[..., :4], c[..., :4], causal=True,
                                softmax_scale=1.0, backend="torch", segments=off)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_pair_without_pieces_gives_empty_result(backend):
    q, k, v, log_f, do = (t[:1].float().to(DEVICE) for t in _inputs(2, 2, 16, seed=1))
    c = torch.cumsum(log_f, 1).permute(0, 2, 1).contiguous()
    # row 0 only: no document meets both ranges
    seg = ChunkSegments.from_documents(torch.tensor(CU), L, 95, 10, 0, 11, rows=torch.tensor([0]))
    assert seg.num == 0
    thr = torch.zeros(0, 2, device=DEVICE)
    args = (q[:, 95:105], k[:, :11], v[:, :11], c[..., 95:105], c[..., :11])
    out, lse = attention_chunk_forward(*args, causal=False, softmax_scale=0.25, acp_threshold=thr,
                                       backend=backend, segments=seg.to(DEVICE))
    assert out.abs().max() == 0 and torch.isneginf(lse).all()
    grads = attention_chunk_backward(do[:, 95:105], *args, q[:, 95:105], lse.clone().fill_(0.0), causal=False,
                                     softmax_scale=0.25, acp_threshold=thr, backend=backend, segments=seg.to(DEVICE))
    assert all(g.abs().max() == 0 for g in grads)


def test_kernels_read_only_boundary_entries_they_wrote(monkeypatch):
    """The ACP boundary tables are not zero-filled: every entry a kernel
    reads must have been written by the boundary search.  Filled beforehand
    with "prune everything" (first kept key block past the end, no kept
    query block), a read of an unwritten entry would drop keys from a
    stored result: packed pieces of unequal length (query blocks past a
    piece's end), both chunk pairs and whole-sequence packed attention must
    still match their oracles."""
    from fox_megatron.kernels import AcpConfig, forgetting_attention
    from fox_megatron.kernels.forgetting_attn import triton_ops

    fills = {"kblo": 2 ** 30, "qbhi": 0}
    monkeypatch.setattr(triton_ops, "_boundary_table",
                        lambda kind, shape, device: torch.full(shape, fills[kind], dtype=torch.int32, device=device))
    for pair in ("diagonal", "off_diagonal"):
        test_chunk_pair_with_documents_matches_oracle("triton", True, pair)
    q, k, v, log_f, _ = _inputs(4, 2, 16, seed=8)
    cu = torch.tensor(CU)
    acp = AcpConfig(log_eps=-4.0, logit_bound=4.0)
    dt = lambda t: t.to(DEVICE, torch.float32)  # noqa: E731
    out, stats = forgetting_attention(dt(q), dt(k), dt(v), dt(log_f), cu_seqlens=cu.to(DEVICE), acp=acp,
                                      backend="triton", return_stats=True)
    expect = forgetting_attention(dt(q), dt(k), dt(v), dt(log_f), cu_seqlens=cu.to(DEVICE), acp=acp, backend="torch")
    assert stats.kept_fraction < 1.0  # tiles are pruned
    _close(out, expect, "packed out")
