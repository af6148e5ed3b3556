"""Chunk pairs that read selected query rows in place and accumulate.

``attention_chunk_forward_into`` / ``attention_chunk_backward_into`` are
what a ring step calls: key row n pairs with query row query_rows[n] of the
whole query tensors, the forward merges into a running (out, lse) and the
backward adds to running dq / dc_q.  Each backend is checked against a
float64 oracle built from the plain chunk functions on gathered rows
(``attention_chunk_forward`` + ``merge_partial_attention``, the backward
from its formula), rows left out must stay untouched.  With ACP the Triton kernels are
checked against the oracle of their tile rule (tile_oracle.py).  The Triton
kernels run in Triton's interpreter on CPU (fp32, small odd shapes, GQA).
"""

import math

import pytest
import torch

from fox_megatron.kernels import (
    ChunkSegments,
    attention_chunk_backward,
    attention_chunk_backward_into,
    attention_chunk_forward,
    attention_chunk_forward_into,
    attention_row_delta,
    merge_partial_attention,
)
from fox_megatron.kernels.forgetting_attn.interface import _torch_chunk_backward
from fox_megatron.kernels.forgetting_attn.naive import token_document_ids
from tile_oracle import chunk_backward, chunk_forward, pass_tiles, prune_decays

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BQ, HQ, HKV, D = 5, 4, 2, 16
ROWS = [4, 0, 2]  # query row of key rows 0, 1, 2; rows 1 and 3 take no part


def _close(a, b, name, tol=2e-3):
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    fin = torch.isfinite(b)
    assert torch.equal(torch.isfinite(a), fin), f"{name}: -inf pattern differs"
    err = (a[fin] - b[fin]).norm() / b[fin].norm().clamp_min(1e-12)
    assert err < tol, f"{name}: relative error {float(err):.2e}"


def _case(causal, seed, tq=37, tk=29):
    tk = tq if causal else tk
    g = torch.Generator().manual_seed(seed)
    n = len(ROWS)
    x = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, do = x(BQ, tq, HQ, D), x(BQ, tq, HQ, D)
    k, v = x(n, tk, HKV, D), x(n, tk, HKV, D)
    # global decays: keys of an earlier chunk sit before the queries
    rate = torch.logspace(-2, 0, HQ, dtype=torch.float64)[None, :, None]
    c_k = -torch.cumsum(torch.rand(n, HQ, tk, generator=g, dtype=torch.float64) * rate, -1)
    c_q0 = c_k[:, :, -1:] if not causal else torch.zeros(n, HQ, 1, dtype=torch.float64)
    c_q_sel = (c_k if causal else c_q0 - torch.cumsum(torch.rand(n, HQ, tq, generator=g, dtype=torch.float64)
                                                       * rate, -1))
    c_q = x(BQ, HQ, tq)  # rows that take no part: any values
    c_q[ROWS] = c_q_sel
    # a partial result from other keys: rows of row 0 empty so far
    acc_out, acc_lse = x(BQ, tq, HQ, D), x(BQ, HQ, tq)
    acc_out[:, :5] = 0.0
    acc_lse[:, :, :5] = float("-inf")
    thr = -1.0 - 3.0 * torch.rand(n, HQ, generator=g, dtype=torch.float64)
    return q, k, v, c_q, c_k, do, acc_out, acc_lse, thr


def _dev(*ts, dt=torch.float32):
    return [t.to(DEVICE, dt) for t in ts]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("acp", [False, True])
@pytest.mark.parametrize("causal", [True, False])
def test_forward_into_and_backward_into_match_gathered_rows(backend, acp, causal):
    # with ACP, chunks of several tiles: the kernels skip whole tiles only
    sizes = dict(tq=150, tk=97) if acp else {}
    q, k, v, c_q, c_k, do, acc_out, acc_lse, thr = _case(causal, seed=5 + 2 * acp + causal, **sizes)
    thr = thr if acp else None
    rows = torch.tensor(ROWS)
    scale = 1 / math.sqrt(D)

    # oracle: gather, attend, merge (float64)
    tile_rule = acp and backend == "triton"
    decays = prune_decays(c_q[rows], c_k, pass_tiles(D, torch.float32)) if tile_rule else None
    if tile_rule:
        out_p, lse_p = chunk_forward(q[rows], k, v, c_q[rows], c_k, causal, scale, thr, decays)
    else:
        out_p, lse_p = attention_chunk_forward(q[rows], k, v, c_q[rows], c_k, causal=causal, softmax_scale=scale,
                                               acp_threshold=thr, backend="torch")
    o_m, lse_m = merge_partial_attention(acc_out[rows], acc_lse[rows], out_p, lse_p)
    ref_out, ref_lse = acc_out.clone(), acc_lse.clone()
    ref_out[rows], ref_lse[rows] = o_m, lse_m
    if acp:  # the threshold prunes some pairs
        dense, _ = attention_chunk_forward(q[rows], k, v, c_q[rows], c_k, causal=causal, softmax_scale=scale,
                                           backend="torch")
        assert (dense - out_p).abs().max() > 1e-3

    q_d, k_d, v_d, c_q_d, c_k_d, do_d, a_out, a_lse = _dev(q, k, v, c_q, c_k, do, acc_out, acc_lse)
    thr_d = thr.to(DEVICE, torch.float32) if acp else None
    rows_d = rows.to(DEVICE)
    attention_chunk_forward_into(a_out, a_lse, q_d, k_d, v_d, c_q_d, c_k_d, query_rows=rows_d, causal=causal,
                                 softmax_scale=scale, acp_threshold=thr_d, backend=backend)
    _close(a_out, ref_out, "out")
    _close(a_lse, ref_lse, "lse")

    # backward against the merged result, accumulating into running grads
    delta = attention_row_delta(do, ref_out.to(do.dtype), backend="torch")
    g = torch.Generator().manual_seed(1)
    dq0 = torch.randn(q.shape, generator=g, dtype=torch.float64)
    dcq0 = torch.randn(c_q.shape, generator=g, dtype=torch.float64)
    if tile_rule:
        dq, dk, dv, dcq, dck = chunk_backward(do[rows], q[rows], k, v, c_q[rows], c_k, None, ref_lse[rows], causal,
                                              scale, thr, decays, delta=delta[rows])
    else:
        dq, dk, dv, dcq, dck = _torch_chunk_backward(do[rows], q[rows], k, v, c_q[rows], c_k, None, ref_lse[rows],
                                                     causal, scale, thr, delta=delta[rows])
    ref_dq, ref_dcq = dq0.clone(), dcq0.clone()
    ref_dq[rows] += dq
    ref_dcq[rows] += dcq.double()

    dq_acc, dcq_acc, lse_d, delta_d = _dev(dq0, dcq0, ref_lse, delta)
    got = attention_chunk_backward_into(dq_acc, dcq_acc, do_d, q_d, k_d, v_d, c_q_d, c_k_d, lse_d, delta_d,
                                        query_rows=rows_d, causal=causal, softmax_scale=scale,
                                        acp_threshold=thr_d, backend=backend, kv_grad_dtype=torch.float64)
    assert got[0].dtype == got[1].dtype == torch.float64 and got[0].is_contiguous()
    for name, a, b in zip(("dk", "dv", "dc_k"), got, (dk, dv, dck)):
        _close(a, b, name)
    _close(dq_acc, ref_dq, "dq")
    _close(dcq_acc, ref_dcq, "dc_q")
    untouched = [1, 3]
    assert torch.equal(dq_acc.cpu()[untouched], dq0[untouched].float())
    assert torch.equal(a_out.cpu()[untouched], acc_out[untouched].float())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_forward_into_with_documents(backend):
    """Packed documents: pieces index key rows, queries are read at their
    query rows; queries in no piece keep their running result."""
    L, tq = 48, 24  # query chunk [24, 48), key chunk [0, 24) of every row
    cu = torch.tensor([0, 10, 30, 48, 70, 96, 120, 144])  # 3 rows of 48
    rows_of_keys = torch.tensor([2, 0])  # key row n holds batch row rows_of_keys[n]
    seg = ChunkSegments.from_documents(cu, L, tq, tq, 0, tq, rows=rows_of_keys)
    doc = token_document_ids(cu, 3, L)
    g = torch.Generator().manual_seed(4)
    x = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q = x(3, tq, HQ, D)  # query chunk of every batch row
    k, v = x(2, tq, HKV, D), x(2, tq, HKV, D)
    c_k = -torch.cumsum(torch.rand(2, HQ, tq, generator=g, dtype=torch.float64), -1)
    c_q = c_k.min() - torch.cumsum(torch.rand(3, HQ, tq, generator=g, dtype=torch.float64), -1)
    acc_out, acc_lse = x(3, tq, HQ, D), x(3, HQ, tq)
    scale = 1 / math.sqrt(D)
    qrows = rows_of_keys  # the query chunk's row b is batch row b

    out_p, lse_p = attention_chunk_forward(q[qrows], k, v, c_q[qrows], c_k, causal=False, softmax_scale=scale,
                                           segments=seg, backend="torch")
    o_m, lse_m = merge_partial_attention(acc_out[qrows], acc_lse[qrows], out_p, lse_p)
    ref_out, ref_lse = acc_out.clone(), acc_lse.clone()
    ref_out[qrows], ref_lse[qrows] = o_m, lse_m
    # some queries meet no key of their document here (they keep the old result)
    lone = ~(doc[qrows][:, tq:, None] == doc[qrows][:, None, :tq]).any(-1)
    assert lone.any() and (~lone).any()

    a_out, a_lse, q_d, k_d, v_d, c_q_d, c_k_d = _dev(acc_out, acc_lse, q, k, v, c_q, c_k)
    seg_d = seg.to(DEVICE) if backend == "triton" else seg
    attention_chunk_forward_into(a_out, a_lse, q_d, k_d, v_d, c_q_d, c_k_d, query_rows=qrows.to(DEVICE),
                                 causal=False, softmax_scale=scale, backend=backend, segments=seg_d)
    _close(a_out, ref_out, "out")
    _close(a_lse, ref_lse, "lse")

    do = x(3, tq, HQ, D)
    ref = attention_chunk_backward(do[qrows], q[qrows], k, v, c_q[qrows], c_k, ref_out[qrows], ref_lse[qrows],
                                   causal=False, softmax_scale=scale, segments=seg, backend="torch")
    delta = attention_row_delta(ref_out, do, backend="torch")
    dq_acc, dcq_acc, do_d, lse_d, delta_d = _dev(torch.zeros_like(q), torch.zeros_like(c_q), do, ref_lse, delta)
    got = attention_chunk_backward_into(dq_acc, dcq_acc, do_d, q_d, k_d, v_d, c_q_d, c_k_d, lse_d, delta_d,
                                        query_rows=qrows.to(DEVICE), causal=False, softmax_scale=scale,
                                        backend=backend, segments=seg_d)
    for name, a, b in zip(("dk", "dv", "dc_k"), got, ref[1:3] + ref[4:]):
        _close(a, b, name)
    _close(dq_acc[qrows], ref[0], "dq")
    _close(dcq_acc[qrows], ref[3], "dc_q")
    assert dq_acc[1].abs().max() == 0


def test_into_inputs_are_checked():
    q, k, v, c_q, c_k, do, acc_out, acc_lse, _ = (t.float() for t in _case(True, seed=0))
    rows = torch.tensor(ROWS)
    kw = dict(causal=True, softmax_scale=0.25, backend="torch")
    with pytest.raises(ValueError, match="query_rows must be"):
        attention_chunk_forward_into(acc_out, acc_lse, q, k, v, c_q, c_k, query_rows=rows[:2], **kw)
    with pytest.raises(ValueError, match="acc_out / acc_lse must be"):
        attention_chunk_forward_into(acc_out[:, :3], acc_lse, q, k, v, c_q, c_k, query_rows=rows, **kw)
    with pytest.raises(ValueError, match="dq_acc must be shaped"):
        attention_chunk_backward_into(acc_out, acc_lse[:, :1], do, q, k, v, c_q, c_k, acc_lse, acc_lse,
                                      query_rows=rows, **kw)
    kw["backend"] = "triton"
    d = lambda t: t.to(DEVICE)  # noqa: E731
    with pytest.raises(ValueError, match="float32"):
        attention_chunk_forward_into(d(acc_out.double()), d(acc_lse), d(q), d(k), d(v), d(c_q), d(c_k),
                                     query_rows=d(rows), **kw)
