"""Forgetting attention kernels against the float64 reference.

On a CPU-only machine the Triton kernels run in Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1), in fp32 and fp16: the
interpreter's bf16 dot is wrong, so bf16 is checked on the GPU only.
"""

import math

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fox_megatron.kernels import (
    AcpConfig,
    attention_chunk_backward,
    attention_chunk_forward,
    cumulative_log_decay,
    forgetting_attention,
    merge_partial_attention,
    naive_forgetting_attention,
    reference_block_boundaries,
)
from fox_megatron.kernels.forgetting_attn.tile_ranges import work_item

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a - b).norm() / b.norm().clamp_min(1e-2)).item()


def make_inputs(B, T, Hq, Hkv, D, dtype, layout="bshd", decay_scale=1.0, seed=0, device=DEVICE):
    g = torch.Generator(device="cpu").manual_seed(seed)
    shape = lambda h, d: (B, T, h, d) if layout == "bshd" else (T, B, h, d)
    q = torch.randn(shape(Hq, D), generator=g).to(device, dtype)
    k = torch.randn(shape(Hkv, D), generator=g).to(device, dtype)
    v = torch.randn(shape(Hkv, D), generator=g).to(device, dtype)
    gate_shape = (B, T, Hq) if layout == "bshd" else (T, B, Hq)
    # heads from slow to fast forgetting, so that ACP prunes some of them
    rates = torch.logspace(-3, 0, Hq) * decay_scale
    z = torch.randn(gate_shape, generator=g)
    log_f = (-rates * torch.exp(0.5 * z)).to(device, torch.float32)
    return [t.requires_grad_() for t in (q, k, v, log_f)]


def run(q, k, v, log_f, do, **kw):
    o = forgetting_attention(q, k, v, log_f, **kw)
    grads = torch.autograd.grad(o, (q, k, v, log_f), do)
    return o, grads


def reference(q, k, v, log_f, do, layout="bshd", **kw):
    cast = [t.detach().double().requires_grad_() for t in (q, k, v, log_f)]
    return run(*cast, do.double(), layout=layout, backend="torch", **kw)


TOL = {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def check(q, k, v, log_f, tol, layout="bshd", **kw):
    do = torch.randn_like(q)
    o, grads = run(q, k, v, log_f, do, layout=layout, backend="triton", **kw)
    o_ref, grads_ref = reference(q, k, v, log_f, do, layout=layout, **kw)
    assert rel_err(o, o_ref) < tol, "output"
    for name, a, b in zip(("dq", "dk", "dv", "dlog_f"), grads, grads_ref):
        assert a.shape == b.shape, name
        assert rel_err(a, b) < tol, name


# ---------------------------------------------------------------- reference


def test_reference_matches_explicit_loop():
    """The oracle itself against a per-query loop written from the formula."""
    torch.manual_seed(1)
    B, T, H, D = 2, 9, 2, 4
    q, k, v = (torch.randn(B, T, H, D, dtype=torch.float64) for _ in range(3))
    log_f = F.logsigmoid(torch.randn(B, T, H, dtype=torch.float64))
    out = naive_forgetting_attention(q, k, v, log_f)
    c = torch.cumsum(log_f, 1)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                logits = torch.stack([q[b, i, h] @ k[b, j, h] / math.sqrt(D) + c[b, i, h] - c[b, j, h] for j in range(i + 1)])
                w = torch.softmax(logits, 0)
                expect = (w[:, None] * v[b, : i + 1, h]).sum(0)
                torch.testing.assert_close(out[b, i, h], expect)


def test_reference_packed_equals_separate_documents():
    torch.manual_seed(2)
    T, H, D = 20, 2, 8
    q, k, v = (torch.randn(1, T, H, D, dtype=torch.float64) for _ in range(3))
    log_f = F.logsigmoid(torch.randn(1, T, H, dtype=torch.float64))
    cu = torch.tensor([0, 7, 8, 20], dtype=torch.int32)
    packed = naive_forgetting_attention(q, k, v, log_f, cu_seqlens=cu)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        alone = naive_forgetting_attention(q[:, s:e], k[:, s:e], v[:, s:e], log_f[:, s:e])
        torch.testing.assert_close(packed[:, s:e], alone)


def test_reference_gradcheck_including_gate():
    torch.manual_seed(3)
    B, T, H, D = 1, 6, 2, 3
    q, k, v = (torch.randn(B, T, H, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    log_f = F.logsigmoid(torch.randn(B, T, H, dtype=torch.float64)).requires_grad_()
    cu = torch.tensor([0, 2, 6])
    assert torch.autograd.gradcheck(lambda *a: naive_forgetting_attention(*a, cu_seqlens=cu), (q, k, v, log_f))


# ------------------------------------------------------- Triton vs reference

CASES = [
    # B, T, Hq, Hkv, D
    (2, 150, 4, 4, 32),
    (1, 77, 4, 2, 64),  # GQA, odd length
    (2, 37, 4, 1, 16),  # MQA
    (1, 1, 2, 2, 32),  # a single token
    (1, 200, 2, 2, 128),
]


@pytest.mark.parametrize("B,T,Hq,Hkv,D", CASES)
@pytest.mark.parametrize("acp", [False, True])
def test_triton_matches_reference_fp32(B, T, Hq, Hkv, D, acp):
    q, k, v, log_f = make_inputs(B, T, Hq, Hkv, D, torch.float32, seed=T + D)
    cfg = AcpConfig(log_eps=-10.0) if acp else None
    check(q, k, v, log_f, TOL[torch.float32], acp=cfg)


@pytest.mark.parametrize("layout", ["bshd", "sbhd"])
def test_triton_layouts_fp16(layout):
    q, k, v, log_f = make_inputs(2, 97, 4, 2, 64, torch.float16, layout=layout, seed=5)
    check(q, k, v, log_f, TOL[torch.float16], layout=layout, acp=AcpConfig())


def test_sbhd_needs_no_copy_and_matches_bshd():
    q, k, v, log_f = make_inputs(2, 40, 2, 2, 32, torch.float32, layout="sbhd", seed=6)
    o_s = forgetting_attention(q, k, v, log_f, layout="sbhd", backend="triton")
    o_b = forgetting_attention(*(t.transpose(0, 1) for t in (q, k, v, log_f)), layout="bshd", backend="triton")
    assert o_s.shape == q.shape and o_s.stride() == q.stride()
    torch.testing.assert_close(o_s, o_b.transpose(0, 1))


@pytest.mark.parametrize("acp", [False, True])
def test_triton_packed_documents(acp):
    B, T = 2, 96
    q, k, v, log_f = make_inputs(B, T, 4, 2, 32, torch.float32, seed=7)
    # documents of odd lengths, one of length 1, none crossing a row
    cu = torch.tensor([0, 13, 14, 60, 96, 131, 192], dtype=torch.int32, device=DEVICE)
    check(q, k, v, log_f, TOL[torch.float32], cu_seqlens=cu, acp=AcpConfig(log_eps=-4.0) if acp else None)


def test_cu_seqlens_device_check_catches_what_the_host_check_does():
    """The no-sync check (a CUDA cu_seqlens with max_seqlen) asserts on the
    device; on a CPU tensor the same assertion raises at once."""
    from fox_megatron.kernels.forgetting_attn.interface import _check_cu_seqlens_on_device

    good = torch.tensor([0, 5, 16, 20, 32])
    assert torch.equal(_check_cu_seqlens_on_device(good, 2, 16, 12), good)
    for bad, max_len in [([0, 5, 30], 30), ([0, 9, 5, 32], 32), ([0, 10, 20, 32], 16), ([1, 16, 32], 16),
                         ([0, 16, 32], 15)]:
        with pytest.raises(RuntimeError, match="cu_seqlens must start at 0"):
            _check_cu_seqlens_on_device(torch.tensor(bad), 2, 16, max_len)


def test_sequence_table_is_built_once_per_cu_seqlens_tensor():
    """Every layer passes the same cu_seqlens: its table (and checks) are
    built once, and again for another tensor, other shapes, or after an
    in-place change."""
    from fox_megatron.kernels.forgetting_attn.interface import SequenceTable

    cu = torch.tensor([0, 7, 30, 48, 60, 96], dtype=torch.int32)
    table = SequenceTable.build(2, 48, cu, "cpu")
    assert SequenceTable.build(2, 48, cu, "cpu") is table
    assert SequenceTable.build(2, 48, cu.clone(), "cpu") is not table
    assert SequenceTable.build(2, 48, cu, "cpu", max_seqlen=40) is not table
    cu[1] = 8  # in place: rebuilt from the new values
    rebuilt = SequenceTable.build(2, 48, cu, "cpu")
    assert rebuilt is not table and rebuilt.length[0].item() == 8
    with pytest.raises(ValueError, match="batch \\* seqlen"):
        SequenceTable.build(2, 40, cu, "cpu")  # another shape is checked again


def test_acp_threshold_is_computed_once_per_sequence_table():
    """A fixed logit bound: the thresholds depend on the sequences alone and
    are derived once for all the layers that pass the same cu_seqlens;
    another bound or eps gets its own."""
    B, T = 2, 48
    q, k, v, log_f = make_inputs(B, T, 2, 2, 32, torch.float32, seed=19)
    cu = torch.tensor([0, 7, 30, 48, 60, 96], dtype=torch.int32, device=DEVICE)
    for backend in ("torch", "triton"):
        stats = [forgetting_attention(q, k, v, log_f, cu_seqlens=cu, backend=backend, acp=a, return_stats=True)[1]
                 for a in (AcpConfig(logit_bound=3.0), AcpConfig(logit_bound=3.0), AcpConfig(logit_bound=2.0),
                           AcpConfig(logit_bound=3.0, log_eps=-5.0))]
        assert stats[1].threshold is stats[0].threshold
        lengths = torch.tensor([7, 23, 18, 12, 36], dtype=torch.float32)
        for st, (u, eps) in zip(stats, [(3.0, -10.0), (3.0, -10.0), (2.0, -10.0), (3.0, -5.0)]):
            expect = (-2 * u - torch.log(lengths) + eps)[:, None].expand(-1, 2)
            torch.testing.assert_close(st.threshold.cpu(), expect)


def test_max_seqlen_gives_the_same_result():
    B, T = 2, 48
    q, k, v, log_f = make_inputs(B, T, 2, 2, 32, torch.float32, seed=17)
    cu = torch.tensor([0, 7, 30, 48, 60, 96], dtype=torch.int32, device=DEVICE)
    for backend in ("torch", "triton"):
        a = forgetting_attention(q, k, v, log_f, cu_seqlens=cu, backend=backend, acp=AcpConfig(log_eps=-3.0))
        b = forgetting_attention(q, k, v, log_f, cu_seqlens=cu, max_seqlen=40, backend=backend,
                                 acp=AcpConfig(log_eps=-3.0))
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("precise", [False, True])
def test_triton_large_decay_prunes_and_matches(precise):
    # fast forgetting: the fast head skips most of its tiles.  With a
    # float32 c at most ~10 per token: c_i - c_j then errs by about
    # |c| * 2^-24, and at 100 per token over 700 tokens (|c| ~ 8e4) that
    # alone is a 0.5% weight error.  Precise decays take the 100.
    scale = 100.0 if precise else 10.0
    q, k, v, log_f = make_inputs(1, 700, 2, 2, 32, torch.float32, decay_scale=scale, seed=8)
    o, stats = forgetting_attention(q, k, v, log_f, backend="triton", acp=AcpConfig(), return_stats=True,
                                    precise_decay=precise)
    assert stats.kept_tiles[-1] < 0.3  # the fast head skips most tiles
    check(q, k, v, log_f, TOL[torch.float32], acp=AcpConfig(), precise_decay=precise)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("acp", [False, True])
def test_triton_precise_decays_far_from_zero(packed, acp):
    """The gate of a document's first token never enters a decay (D_ij sums
    the gates of j+1..i), but it sets |c| for the whole document.  At -1e5
    a float32 c holds every decay only to ~0.008 (a ~1% weight error; the
    default path errs by 2.5e-3 to 1.2e-2 here); with precise decays the
    kernels must match the float64 reference as closely as with small
    decays, in the output and every gradient (the gate's gradient at those
    first tokens is zero)."""
    B, T = 2, 150
    q, k, v, log_f = make_inputs(B, T, 2, 2, 32, torch.float32, decay_scale=0.3, seed=21)
    cu = torch.tensor([0, 61, 150, 151, 300], dtype=torch.int32, device=DEVICE) if packed else None
    firsts = cu[:-1].long().cpu() if packed else torch.arange(B) * T
    with torch.no_grad():
        log_f.view(B * T, -1)[firsts.to(DEVICE)] = -1e5
    cfg = AcpConfig(log_eps=-10.0) if acp else None
    # fp32 inputs run three-pass tf32 products (errors near 1e-5 here)
    check(q, k, v, log_f, 1e-4, cu_seqlens=cu, acp=cfg, precise_decay=True)


def test_triton_chunk_with_global_decays_far_from_zero():
    """The context-parallel entry takes the global decays as float64: a
    chunk pair far along a long sequence (|c| ~ 1e6) is computed as
    accurately as one at the start (against the float64 oracle of the
    kernels' tile rule, tile_oracle.py)."""
    from tile_oracle import chunk_backward, chunk_forward, pass_tiles, prune_decays

    B, T, H, D = 1, 96, 2, 32
    q, k, v, log_f = make_inputs(B, 2 * T, H, H, D, torch.float32, decay_scale=0.5, seed=22)
    c = cumulative_log_decay(log_f.detach().double()).permute(0, 2, 1) - 1e6  # [B, H, 2T] float64
    c_q, c_k = c[..., T:].contiguous(), c[..., :T].contiguous()
    qc, kc, vc = q.detach()[:, T:], k.detach()[:, :T], v.detach()[:, :T]
    scale = 1 / math.sqrt(D)
    thr = torch.full((B, H), -12.0, device=DEVICE)
    o, lse = attention_chunk_forward(qc, kc, vc, c_q, c_k, causal=False, softmax_scale=scale,
                                     acp_threshold=thr, backend="triton")
    decays = prune_decays(c_q, c_k, pass_tiles(D, torch.float32))
    thr64 = thr.double().cpu()
    o_ref, lse_ref = chunk_forward(qc.cpu(), kc.cpu(), vc.cpu(), c_q.cpu(), c_k.cpu(), False, scale, thr64, decays)
    assert rel_err(o.cpu(), o_ref) < 1e-4
    seen = torch.isfinite(lse_ref)  # queries with a kept key (the others: lse = -inf)
    assert torch.equal(torch.isfinite(lse).cpu(), seen.cpu()) and 0.3 < seen.float().mean() < 1
    assert rel_err(lse.cpu()[seen], lse_ref[seen]) < 1e-6
    # the backward takes the output and lse merged over every key chunk: as
    # if other chunks held as much mass again (else dc_q = rowsum(dS) would
    # cancel to zero)
    do, out_m, lse_m = torch.randn_like(o), torch.randn_like(o), (lse_ref + math.log(2.0)).to(DEVICE)
    grads = attention_chunk_backward(do, qc, kc, vc, c_q, c_k, out_m, lse_m.float(), causal=False,
                                     softmax_scale=scale, acp_threshold=thr, backend="triton")
    grads_ref = chunk_backward(do.cpu(), qc.cpu(), kc.cpu(), vc.cpu(), c_q.cpu(), c_k.cpu(), out_m.cpu(),
                               lse_m.cpu(), False, scale, thr64, decays)
    for name, a, b in zip(("dq", "dk", "dv", "dc_q", "dc_k"), grads, grads_ref):
        assert rel_err(a.cpu(), b) < 1e-4, name


def test_triton_acp_skips_whole_tiles_only():
    # ACP skips a tile when its largest decay is below the threshold and
    # computes every kept tile whole, each pass in its own tiles
    # (tile_oracle.py).  A sharp drop of the decay at token 1000 leaves long
    # runs of kept tiles whose pairs are partly below the threshold (key
    # blocks before token 1000 for the query blocks after it, and mirrored).
    # The claimed bound U = 0 is false: queries and keys at the far end of
    # both runs share one direction (logit +8), so the pairs below the
    # threshold there carry real weight, and the kernels' results differ
    # from the element rule's (every pair below the threshold dropped) but
    # match the tile rule's.
    from tile_oracle import chunk_backward, chunk_forward, pass_tiles, prune_decays

    from fox_megatron.kernels import acp_threshold
    from fox_megatron.kernels.forgetting_attn.naive import reverse_cumulative_sum

    T, D = 1800, 32
    q, k, v, log_f = make_inputs(1, T, 2, 2, D, torch.float32, seed=12)
    u = torch.nn.functional.normalize(torch.randn(D), dim=0).to(DEVICE)
    with torch.no_grad():
        log_f.fill_(-0.01)
        log_f[0, 1000, :] = -6.0
        for rows, keys in ((slice(1000, 1024), slice(672, 824)), (slice(1184, 1312), slice(960, 1000))):
            q[0, rows] = 4.0 * u
            k[0, keys] = 8.0 * math.sqrt(D) / 4.0 * u
    acp = AcpConfig(log_eps=-0.5, logit_bound=0.0)
    do = torch.randn_like(q)
    o, stats = forgetting_attention(q, k, v, log_f, backend="triton", acp=acp, return_stats=True)
    assert stats.kept_fraction < 0.6
    grads = torch.autograd.grad(o, (q, k, v, log_f), do)

    scale = 1 / math.sqrt(D)
    c = cumulative_log_decay(log_f.detach().double().cpu()).permute(0, 2, 1)  # [B, H, T]
    thr = acp_threshold(0.0, T, -0.5) * torch.ones(1, 2, dtype=torch.float64)
    decays = prune_decays(c, c, pass_tiles(D, torch.float32))
    qc, kc, vc, doc_ = (t.detach().cpu().double() for t in (q, k, v, do))
    o_ref, lse_ref = chunk_forward(qc, kc, vc, c, c, True, scale, thr, decays)
    dq, dk, dv, dcq, dck = chunk_backward(doc_, qc, kc, vc, c, c, o_ref, lse_ref, True, scale, thr, decays)
    dlog_f = reverse_cumulative_sum((dcq.double() + dck.double()).permute(0, 2, 1))
    # fp32 inputs run three-pass tf32 products (errors near 1e-5 here)
    assert rel_err(o.cpu(), o_ref) < 5e-4, "output"
    for name, a, b in zip(("dq", "dk", "dv", "dlog_f"), grads, (dq, dk, dv, dlog_f)):
        assert rel_err(a.cpu(), b) < 5e-4, name
    # the element rule drops more: the test tells the two apart
    o_elem = naive_forgetting_attention(qc, kc, vc, log_f.detach().cpu().double(), acp_threshold=thr)
    assert rel_err(o_elem, o_ref) > 1e-2


def test_heavy_first_orders_pairs_by_kept_tiles():
    from fox_megatron.kernels.forgetting_attn.triton_ops import heavy_first

    kept = torch.tensor([[3, 9, 3, 0], [7, 1, 9, 5]], dtype=torch.int32)  # [S = 2, H = 4]
    tiles = torch.stack([kept, torch.full_like(kept, 99)], -1).to(DEVICE)  # kept, total
    # entries are s + S * h; ties keep the grid's order (heads outermost)
    assert heavy_first(tiles).tolist() == [2, 5, 1, 7, 0, 4, 3, 6]
    # by key / value head (two query heads each): sums [[12, 3], [8, 14]]
    assert heavy_first(tiles, group=2).tolist() == [3, 0, 1, 2]
    # a random case against a stable sort
    kept = torch.randint(0, 6, (7, 40), dtype=torch.int32)
    tiles = torch.stack([kept, kept], -1).to(DEVICE)
    expect = torch.argsort(kept.t().reshape(-1), descending=True, stable=True)
    assert heavy_first(tiles).tolist() == expect.tolist()


def test_heavy_first_sorts_many_pairs_with_torch(monkeypatch):
    from fox_megatron.kernels.forgetting_attn import triton_ops

    kept = torch.randint(0, 6, (9, 8), dtype=torch.int32)
    tiles = torch.stack([kept, kept], -1).to(DEVICE)
    ranked = [triton_ops.heavy_first(tiles, g) for g in (1, 2)]
    monkeypatch.setattr(triton_ops, "_ORDER_MAX_PAIRS", 8)  # above it: a torch sort
    for g, r in zip((1, 2), ranked):
        order = triton_ops.heavy_first(tiles, g)
        assert order.dtype == torch.int32 and torch.equal(order, r), g


@triton.jit
def _work_items_kernel(ORDER, QLEN, OUT, total, num_m, S, ORDERED: tl.constexpr, CAUSAL: tl.constexpr,
                       BLOCK_M: tl.constexpr):
    # each program writes work item program_id's (sequence, head, block,
    # query length, valid)
    w = tl.program_id(0)
    s_id, h, pid_m, qlen, valid = work_item(w, total, num_m, S, ORDER, QLEN, ORDERED, CAUSAL, BLOCK_M)
    tl.store(OUT + w * 5 + 0, s_id)
    tl.store(OUT + w * 5 + 1, h)
    tl.store(OUT + w * 5 + 2, pid_m)
    tl.store(OUT + w * 5 + 3, qlen)
    tl.store(OUT + w * 5 + 4, valid.to(tl.int32))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("ordered", [False, True])
def test_work_items_are_the_per_block_grid_in_launch_order(ordered, causal):
    # the persistent forward's items (tile_ranges.work_item) are the
    # per-block grid's programs in the order the GPU launches them: item w
    # is program (w % num_m, slot % S, slot // S) with slot = w // num_m,
    # its (sequence, head) from the launch order when there is one; every
    # query block of every (sequence, head) is exactly one valid item,
    # and items at or past the end are not valid
    BM, H = 16, 3
    qlen = torch.tensor([40, 1, 64, 17], dtype=torch.int32)
    S = qlen.numel()
    num_m = -(-int(qlen.max()) // BM)
    total = num_m * S * H
    g = torch.Generator().manual_seed(5)
    order = torch.randperm(S * H, generator=g).to(torch.int32)
    extra = 5  # items past the end
    out = torch.full(((total + extra) * 5,), -7, dtype=torch.int32)
    _work_items_kernel[(total + extra,)](order, qlen, out, total, num_m, S, ORDERED=ordered, CAUSAL=causal, BLOCK_M=BM)
    got = out.view(-1, 5)
    seen = set()
    for w in range(total):
        x, slot = w % num_m, w // num_m
        sh = int(order[slot % S + S * (slot // S)]) if ordered else slot % S + S * (slot // S)
        s, h = sh % S, sh // S
        blocks = -(-int(qlen[s]) // BM)
        pid_m = blocks - 1 - x if causal else x
        valid = 0 <= pid_m < blocks
        assert got[w].tolist() == [s, h, pid_m, int(qlen[s]), int(valid)], w
        if valid:
            seen.add((s, h, pid_m))
    assert seen == {(s, h, m) for s in range(S) for h in range(H) for m in range(-(-int(qlen[s]) // BM))}
    assert (got[total:, 4] == 0).all()


@pytest.mark.parametrize("docs", [False, True])
def test_triton_launch_order_by_kept_tiles_changes_no_result(docs, monkeypatch):
    # under ACP the kernels launch the (sequence, head) pairs with the most
    # kept tiles first; every program writes only its own rows, so the
    # order changes nothing in the results, bit for bit
    from fox_megatron.kernels.forgetting_attn import triton_ops

    q, k, v, log_f = make_inputs(2, 300, 4, 2, 16, torch.float32, decay_scale=3.0, seed=31)
    with torch.no_grad():  # the fast-forgetting heads first: the grid's order is the wrong one
        log_f.copy_(log_f.flip(-1))
    cu = torch.tensor([0, 120, 300, 301, 600], dtype=torch.int32, device=DEVICE) if docs else None
    do = torch.randn_like(q)
    orders = []
    monkeypatch.setattr(triton_ops, "heavy_first",
                        lambda *a, _f=triton_ops.heavy_first: orders.append(_f(*a)) or orders[-1])
    results = {}
    for ordered in (True, False):
        monkeypatch.setattr(triton_ops, "ORDER_BY_KEPT_TILES", ordered)
        results[ordered] = run(q, k, v, log_f, do, backend="triton", cu_seqlens=cu, acp=AcpConfig(log_eps=-4.0))
    # one order of the query heads, one of the key / value heads (GQA)
    assert len(orders) == 2
    assert orders[0].tolist() != sorted(orders[0].tolist()), "the inputs should reorder the pairs"
    (o1, g1), (o0, g0) = results[True], results[False]
    assert torch.equal(o1, o0)
    for name, a, b in zip(("dq", "dk", "dv", "dlog_f"), g1, g0):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("packed", [False, True])
def test_stats_agree_between_backends(packed):
    # the Triton path counts tiles in the boundary kernel, the torch path
    # from the reference boundaries
    q, k, v, log_f = make_inputs(2, 257, 4, 4, 32, torch.float32, decay_scale=3.0, seed=9)
    cu = torch.tensor([0, 1, 100, 257, 400, 514], device=DEVICE) if packed else None
    _, st_t = forgetting_attention(q, k, v, log_f, cu_seqlens=cu, backend="triton", acp=AcpConfig(), return_stats=True)
    _, st_r = forgetting_attention(q, k, v, log_f, cu_seqlens=cu, backend="torch", acp=AcpConfig(), return_stats=True)
    torch.testing.assert_close(st_t.kept_tiles.cpu(), st_r.kept_tiles.cpu())
    assert (st_t.kept_tiles <= 1).all() and st_t.kept_tiles.min() < 1


# ------------------------------------------------------------- ACP guarantee


def test_acp_min_seqlen_leaves_short_calls_unpruned():
    """Below AcpConfig.min_seqlen (the longest sequence, or document when
    packed) the call is exact attention with a kept fraction of 1; at it,
    ACP prunes as usual."""
    torch.manual_seed(11)
    B, T, H, D = 2, 200, 2, 16
    q, k, v = (torch.randn(B, T, H, D, dtype=torch.float64) * 2 for _ in range(3))
    log_f = -torch.logspace(0, 1, H, dtype=torch.float64) * torch.rand(B, T, H, dtype=torch.float64)
    dense = forgetting_attention(q, k, v, log_f, backend="torch")
    cu = torch.tensor([0, 120, 200, 330, 400], dtype=torch.int32)  # longest document: 130
    dense_docs = forgetting_attention(q, k, v, log_f, backend="torch", cu_seqlens=cu)
    for cu_, ref, longest in ((None, dense, T), (cu, dense_docs, 130)):
        o, st = forgetting_attention(q, k, v, log_f, backend="torch", cu_seqlens=cu_, return_stats=True,
                                     acp=AcpConfig(min_seqlen=longest + 1))
        assert torch.equal(o, ref) and st.threshold is None and torch.equal(st.kept_tiles, torch.ones(H))
        # a loose eps and bound, so that the pruned weights show in float64
        o, st = forgetting_attention(q, k, v, log_f, backend="torch", cu_seqlens=cu_, return_stats=True,
                                     acp=AcpConfig(min_seqlen=longest, log_eps=-1.0, logit_bound=0.5))
        assert st.threshold is not None and st.kept_tiles.min() < 1 and not torch.equal(o, ref)
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="min_seqlen"):
            AcpConfig(min_seqlen=bad)


@pytest.mark.parametrize("log_eps", [-10.0, -3.0])
def test_acp_pruned_mass_is_at_most_eps(log_eps):
    """Measure the attention mass the rule removes, per query, on inputs
    built so that pruning happens (fast-forgetting heads, large logits)."""
    torch.manual_seed(10)
    B, T, H, D = 2, 400, 4, 16
    q = torch.randn(B, T, H, D, dtype=torch.float64) * 2
    k = torch.randn(B, T, H, D, dtype=torch.float64) * 2
    v = torch.randn(B, T, H, D, dtype=torch.float64)
    log_f = -torch.logspace(-1, 1, H, dtype=torch.float64) * torch.rand(B, T, H, dtype=torch.float64) * 2
    acp = AcpConfig(log_eps=log_eps)
    _, stats = forgetting_attention(q, k, v, log_f, backend="torch", acp=acp, return_stats=True)
    thr = stats.threshold  # [B, H]
    scale = 1 / math.sqrt(D)
    c = cumulative_log_decay(log_f)
    logits = torch.einsum("bihd,bjhd->bhij", q, k) * scale + (c.permute(0, 2, 1)[..., :, None] - c.permute(0, 2, 1)[..., None, :])
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)
    decay = c.permute(0, 2, 1)[..., :, None] - c.permute(0, 2, 1)[..., None, :]
    pruned = causal & (decay < thr[:, :, None, None])
    assert pruned.float().mean() > 0.2, "the inputs must make ACP prune"
    lost = (probs * pruned).sum(-1)
    assert lost.max().item() <= math.exp(log_eps)
    # and the pruned output stays within the bound: |o - o_full| <= 2 eps max|v|
    o_full = naive_forgetting_attention(q, k, v, log_f)
    o_acp = forgetting_attention(q, k, v, log_f, backend="torch", acp=acp)
    assert (o_acp - o_full).abs().max().item() <= 2 * math.exp(log_eps) * v.abs().max().item()


@pytest.mark.parametrize("packed", [False, True])
def test_triton_decay_scan_and_its_gradient(packed):
    """The segmented scans (c per document, and the suffix sums that are its
    gradient) against float64 torch, across the scan's 1024-token blocks,
    on a transposed (sbhd) gate tensor."""
    from fox_megatron.kernels.forgetting_attn.interface import SequenceTable
    from fox_megatron.kernels.forgetting_attn.naive import cumulative_log_decay_bht, reverse_cumulative_sum_bht
    from fox_megatron.kernels.forgetting_attn.triton_ops import cumulative_decay, cumulative_decay_grad

    torch.manual_seed(13)
    B, T, H = 2, 2600, 3
    log_f = (-torch.rand(T, B, H) * 0.5).to(DEVICE).transpose(0, 1)  # [B, T, H] view of sbhd
    cu = torch.tensor([0, 1, 1030, 2047, 2600, 2601, 5200]) if packed else None
    seqs = SequenceTable.build(B, T, cu, DEVICE)
    # the references run on the CPU, where cu is
    c_ref = cumulative_log_decay_bht(log_f.permute(0, 2, 1).double().cpu(), cu, torch.float64)
    c = cumulative_decay(log_f, seqs)
    assert c.shape == (B, H, T) and c.dtype == torch.float32
    assert (c.double().cpu() - c_ref).abs().max().item() < 1e-5 * c_ref.abs().max().item() + 1e-6
    c64 = cumulative_decay(log_f, seqs, precise=True)  # precise decays: a float64 scan
    assert c64.dtype == torch.float64
    assert (c64.cpu() - c_ref).abs().max().item() < 1e-12 * c_ref.abs().max().item()
    dc_q, dc_k = torch.randn(B, H, T).to(DEVICE), torch.randn(B, H, T).to(DEVICE)
    g = cumulative_decay_grad(dc_q, dc_k, seqs)
    g_ref = reverse_cumulative_sum_bht((dc_q + dc_k).double().cpu(), cu, torch.float64).permute(0, 2, 1)
    assert g.shape == (B, T, H)
    assert (g.double().cpu() - g_ref).abs().max().item() < 1e-5 * g_ref.abs().max().item()


def test_triton_boundaries_match_reference_and_mirror():
    from fox_megatron.kernels.forgetting_attn.interface import SequenceTable
    from fox_megatron.kernels.forgetting_attn.triton_ops import _PairTable, block_boundaries

    torch.manual_seed(11)
    S, H, T = 3, 5, 333
    log_f = -torch.rand(S, H, T) * torch.logspace(-2, 0.5, H)[None, :, None]
    c = torch.cumsum(log_f, -1).to(DEVICE)
    thr = (-torch.rand(S, H) * 30 - 1).to(DEVICE)
    seqs = SequenceTable.build(S, T, None, DEVICE)
    pairs = _PairTable.self_attention(seqs)
    for bm, bn in [(128, 64), (64, 128), (32, 32)]:
        kblo, qbhi = block_boundaries(c, c, pairs, thr, bm, bn, True, want_kblo=True, want_qbhi=True)
        assert kblo.shape == (S, H, -(-T // bm)) and qbhi.shape == (S, H, -(-T // bn))
        torch.testing.assert_close(kblo.cpu(), reference_block_boundaries(c.cpu(), thr.cpu(), bm, bn))
        M, N = -(-T // bm), -(-T // bn)
        # mirror: key block n keeps query blocks [diag, qbhi) -- check against the tile rule
        qf = c[:, :, torch.arange(M) * bm].cpu()
        kl = c[:, :, torch.clamp((torch.arange(N) + 1) * bn, max=T) - 1].cpu()
        kept = (qf[..., :, None] - kl[..., None, :]) >= thr.cpu()[..., None, None]  # S H M N
        for n in range(N):
            lo = (n * bn) // bm
            hi = qbhi[:, :, n].cpu()
            for s in range(S):
                for h in range(H):
                    run_len = 0
                    while lo + run_len < M and kept[s, h, lo + run_len, n]:
                        run_len += 1
                    assert hi[s, h].item() == lo + run_len


@pytest.mark.parametrize("causal", [True, False])
def test_triton_boundaries_of_two_tile_shapes_in_one_launch(causal):
    """The forward finds its own boundaries and the dK / dV kernel's (other
    tiles) in one launch: the same tables as a launch for each."""
    from fox_megatron.kernels.forgetting_attn.triton_ops import _PairTable, block_boundaries

    torch.manual_seed(13)
    S, H, Tq, Tk = 2, 4, 211, 211 if causal else 150
    log_f = -torch.rand(S, H, Tk + Tq) * torch.logspace(-2, 0.5, H)[None, :, None]
    c = torch.cumsum(log_f, -1)
    c_q = (c[..., :Tq] if causal else c[..., Tk:]).contiguous().to(DEVICE)
    c_k = c[..., :Tk].contiguous().to(DEVICE)
    thr = (-torch.rand(S, H) * 30 - 1).to(DEVICE)
    pairs = _PairTable.chunks(S, Tq, Tk, DEVICE)
    tiles = torch.empty(S, H, 2, dtype=torch.int32, device=DEVICE)
    kblo, qbhi = block_boundaries(c_q, c_k, pairs, thr, 64, 32, causal, want_kblo=True, want_qbhi=True,
                                  tiles=tiles, qbhi_blocks=(32, 64))
    kblo_alone, _ = block_boundaries(c_q, c_k, pairs, thr, 64, 32, causal, want_kblo=True)
    _, qbhi_alone = block_boundaries(c_q, c_k, pairs, thr, 32, 64, causal, want_kblo=False, want_qbhi=True)
    assert qbhi.shape == qbhi_alone.shape
    torch.testing.assert_close(kblo.cpu(), kblo_alone.cpu())
    torch.testing.assert_close(qbhi.cpu(), qbhi_alone.cpu())


def test_triton_boundaries_of_an_earlier_key_chunk():
    """Non-causal pair (a key chunk wholly before the query chunk, as in the
    ring): every row counts its pruned key blocks, every column its kept
    query blocks, thresholds from prune-nothing to prune-everything."""
    from fox_megatron.kernels.forgetting_attn.triton_ops import _PairTable, block_boundaries

    torch.manual_seed(12)
    S, H, Tq, Tk = 2, 4, 200, 131
    log_f = -torch.rand(S, H, Tk + Tq) * torch.logspace(-2, 0, H)[None, :, None]
    c = torch.cumsum(log_f, -1)
    c_k, c_q = c[..., :Tk].contiguous().to(DEVICE), c[..., Tk:].contiguous().to(DEVICE)
    thr = torch.tensor([[-1e9, -5.0, -1.0, 1e9]]).expand(S, H).contiguous().to(DEVICE)
    pairs = _PairTable.chunks(S, Tq, Tk, DEVICE)
    for bm, bn in [(64, 32), (32, 64)]:
        kblo, qbhi = block_boundaries(c_q, c_k, pairs, thr, bm, bn, False, want_kblo=True, want_qbhi=True)
        M, N = -(-Tq // bm), -(-Tk // bn)
        qf = c_q[:, :, torch.arange(M) * bm].cpu()
        kl = c_k[:, :, torch.clamp((torch.arange(N) + 1) * bn, max=Tk) - 1].cpu()
        pruned = (qf[..., :, None] - kl[..., None, :]) < thr.cpu()[..., None, None]  # S H M N
        torch.testing.assert_close(kblo.cpu(), pruned.sum(-1).to(torch.int32))
        torch.testing.assert_close(qbhi.cpu(), (~pruned).sum(-2).to(torch.int32))
        assert kblo[:, 0].eq(0).all() and kblo[:, 3].eq(N).all()  # nothing / everything pruned


# ------------------------------------------------- context-parallel entry


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("acp", [False, True])
def test_chunk_pairs_merge_to_full_attention(backend, acp):
    """Split a sequence into 3 chunks, attend chunk pairs with global decays,
    merge with log-sum-exp, and backpropagate with the merged out / lse:
    the result equals whole-sequence attention, gate gradient included."""
    B, T, Hq, Hkv, D, P = 2, 3 * 40, 4, 2, 32, 3
    q, k, v, log_f = make_inputs(B, T, Hq, Hkv, D, torch.float32, decay_scale=2.0, seed=12)
    scale = 1 / math.sqrt(D)
    acp_cfg = AcpConfig(log_eps=-6.0, logit_bound=4.0) if acp else None
    thr = None
    if acp:
        thr = torch.full((B, Hq), -2 * 4.0 - math.log(T) - 6.0, device=DEVICE)
    do = torch.randn_like(q)
    o_full, g_full = run(q, k, v, log_f, do, backend=backend, acp=acp_cfg)

    c = cumulative_log_decay(log_f.detach()).permute(0, 2, 1).contiguous()  # B H T global
    L = T // P
    sl = [slice(i * L, (i + 1) * L) for i in range(P)]
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    outs, lses = [], []
    for i in range(P):
        o_acc, lse_acc = None, None
        for j in range(i + 1):
            o_ij, lse_ij = attention_chunk_forward(
                qd[:, sl[i]], kd[:, sl[j]], vd[:, sl[j]], c[:, :, sl[i]], c[:, :, sl[j]],
                causal=(i == j), softmax_scale=scale, acp_threshold=thr, backend=backend)
            if o_acc is None:
                o_acc, lse_acc = o_ij.float(), lse_ij
            else:
                o_acc, lse_acc = merge_partial_attention(o_acc, lse_acc, o_ij, lse_ij)
        outs.append(o_acc.to(q.dtype))
        lses.append(lse_acc)
    o_cp = torch.cat(outs, 1)
    assert rel_err(o_cp, o_full) < 2e-3

    dq = torch.zeros_like(q, dtype=torch.float32)
    dk = torch.zeros_like(k, dtype=torch.float32)
    dv = torch.zeros_like(v, dtype=torch.float32)
    dc = torch.zeros(B, Hq, T, device=DEVICE)
    for i in range(P):
        for j in range(i + 1):
            g = attention_chunk_backward(
                do[:, sl[i]], qd[:, sl[i]], kd[:, sl[j]], vd[:, sl[j]], c[:, :, sl[i]], c[:, :, sl[j]],
                outs[i], lses[i], causal=(i == j), softmax_scale=scale, acp_threshold=thr, backend=backend)
            dq[:, sl[i]] += g[0].float()
            dk[:, sl[j]] += g[1].float()
            dv[:, sl[j]] += g[2].float()
            dc[:, :, sl[i]] += g[3]
            dc[:, :, sl[j]] += g[4]
    dlog_f = torch.flip(torch.cumsum(torch.flip(dc.permute(0, 2, 1), [1]), 1), [1])
    for a, b in zip((dq, dk, dv, dlog_f), g_full):
        assert rel_err(a, b) < 2e-3


# ----------------------------------------------------------------- errors


def test_bad_inputs_raise_clear_errors():
    q, k, v, log_f = (t.detach() for t in make_inputs(1, 16, 4, 2, 32, torch.float32))
    with pytest.raises(TypeError, match="share a dtype"):
        forgetting_attention(q, k.half(), v, log_f)
    with pytest.raises(TypeError, match="log_fgate must be float32"):
        forgetting_attention(q, k, v, log_f.half())
    with pytest.raises(ValueError, match="log_fgate must have shape"):
        forgetting_attention(q, k, v, log_f[:, :, :2])
    with pytest.raises(ValueError, match="does not match q shape"):
        forgetting_attention(q, k[:, :8], v[:, :8], log_f)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        forgetting_attention(q[:, :, :3], k, v, log_f[:, :, :3])
    with pytest.raises(ValueError, match="head dim 48 is not supported"):
        forgetting_attention(q[..., :16].repeat(1, 1, 1, 3), k[..., :16].repeat(1, 1, 1, 3),
                             v[..., :16].repeat(1, 1, 1, 3), log_f, backend="triton")
    with pytest.raises(ValueError, match="4-D"):
        forgetting_attention(q[0], k, v, log_f)
    with pytest.raises(ValueError, match="layout"):
        forgetting_attention(q, k, v, log_f, layout="bhsd")
    with pytest.raises(TypeError, match="dtype torch.int64 is not supported"):
        forgetting_attention(q.long(), k.long(), v.long(), log_f)
    with pytest.raises(ValueError, match="end at batch"):
        forgetting_attention(q, k, v, log_f, cu_seqlens=torch.tensor([0, 5, 15], device=q.device))
    with pytest.raises(ValueError, match="non-decreasing"):
        forgetting_attention(q, k, v, log_f, cu_seqlens=torch.tensor([0, 9, 5, 16], device=q.device))
    with pytest.raises(TypeError, match="int32 or int64"):
        forgetting_attention(q, k, v, log_f, cu_seqlens=torch.tensor([0.0, 16.0], device=q.device))
    q2, k2, v2, f2 = (torch.cat([t, t]) for t in (q, k, v, log_f))
    with pytest.raises(ValueError, match="row boundary"):
        forgetting_attention(q2, k2, v2, f2, cu_seqlens=torch.tensor([0, 10, 20, 32], device=q.device))
    # (a host cu_seqlens: on the GPU this check is an asynchronous device
    # assertion, which would leave the CUDA context unusable for later tests)
    with pytest.raises(ValueError, match="longer than max_seqlen"):
        forgetting_attention(q2, k2, v2, f2, cu_seqlens=torch.tensor([0, 16, 32]), max_seqlen=15)
    with pytest.raises(ValueError, match="max_seqlen must be >= 1"):
        forgetting_attention(q2, k2, v2, f2, cu_seqlens=torch.tensor([0, 16, 32], device=q.device), max_seqlen=0)
    with pytest.raises(ValueError, match="log_eps must be negative"):
        AcpConfig(log_eps=1.0)
    with pytest.raises(ValueError, match="logit_bound must be a scalar"):
        forgetting_attention(q, k, v, log_f, acp=AcpConfig(logit_bound=torch.ones(3)))


# -------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("acp", [False, True])
@pytest.mark.parametrize("docs", [1, 4])
def test_gpu_bf16_matches_reference(D, acp, docs):
    B, T, Hq, Hkv = 2, 1000, 4, 2
    q, k, v, log_f = make_inputs(B, T, Hq, Hkv, D, torch.bfloat16, layout="sbhd", seed=D + docs)
    cu = None
    if docs > 1:
        bounds = sorted({0, T, 137, 500, 777})
        cu = torch.tensor([b + r * T for r in range(B) for b in bounds[:-1]] + [B * T], dtype=torch.int32, device="cuda")
    check(q, k, v, log_f, TOL[torch.bfloat16], layout="sbhd", cu_seqlens=cu, acp=AcpConfig() if acp else None)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_bf16_long_sequence_gate_gradient(D):
    """dlog f sums dL/dc over the rest of the sequence, so rounding errors
    that do not cancel grow with its length.  delta = do . o comes from the
    bf16 output; the row sums of dS carry minus its error and cancel the
    error the column sums carry (without them, dlog f moved by 5-11% at
    8k-16k on an H200)."""
    q, k, v, log_f = make_inputs(1, 4096, 4, 4, D, torch.bfloat16, seed=5)
    check(q, k, v, log_f, 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True])
def test_gpu_step_never_waits_for_the_device(packed):
    """A training step's attention call (ACP with a known logit bound; packed
    documents given as Megatron gives them, cu_seqlens on the GPU with
    max_seqlen) queues its kernels without one host-device synchronisation:
    a short call that waits for the GPU is host-bound."""
    B, T, D = 2, 512, 64
    q, k, v, log_f = make_inputs(B, T, 4, 2, D, torch.bfloat16, device="cuda", seed=31)
    cu = torch.tensor([0, 100, 512, 700, 1024], dtype=torch.int32, device="cuda") if packed else None
    kw = dict(cu_seqlens=cu, max_seqlen=412 if packed else None, acp=AcpConfig(logit_bound=float(D)))
    do = torch.randn_like(q)
    forgetting_attention(q, k, v, log_f, **kw).backward(do)  # compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        o, stats = forgetting_attention(q, k, v, log_f, return_stats=True, **kw)
        o.backward(do)
        kept = stats.kept_tiles.mean()  # what the model logs, still on the device
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert torch.isfinite(q.grad.float()).all() and torch.isfinite(log_f.grad).all()
    assert 0.0 < kept.item() <= 1.0


# ------------------------------------------------- Gluon forward (Hopper)


def test_tma_rows_view_of_layouts():
    """The Gluon forward reads K / V as 2-D rows of the token stride; every
    (batch row, token, head) must land at its element, and a layout with no
    such view must say so (the Triton forward then runs)."""
    from fox_megatron.kernels.forgetting_attn.gluon_fwd import _tma_rows_view

    B, T, H, D = 3, 5, 2, 8
    store = torch.arange(B * T * 3 * H * D)
    cases = {
        "bshd": store[: B * T * H * D].view(B, T, H, D),
        "sbhd": store[: B * T * H * D].view(T, B, H, D).transpose(0, 1),
        "qkv slice": store.view(B, T, 3, H, D)[:, :, 1],
        "one row": store[: T * H * D].view(1, T, H, D),
    }
    for name, t in cases.items():
        rows, cols, rows_b, cols_b = _tma_rows_view(t)
        for b in range(t.shape[0]):
            for s in range(T):
                assert b * rows_b + s < rows, name
                for h in range(H):
                    # element (row, col) of the descriptor starts at t's first element
                    at = t.storage_offset() + (b * rows_b + s) * cols + b * cols_b + h * t.stride(2)
                    assert torch.equal(store[at: at + D], t[b, s, h]), name
    # batch rows further apart than a token row, but not a whole number of rows
    odd = torch.as_strided(store, (2, T, H, D), (T * H * D + 8, H * D, D, 1))
    assert _tma_rows_view(odd) is None


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["bshd", "sbhd"])
@pytest.mark.parametrize("acp", [False, True])
@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_gluon_forward_matches_triton_forward(layout, acp, docs, head_dim, monkeypatch):
    """On Hopper, head dims 64 and 128 run the warp-specialised Gluon
    forward; its output and log-sum-exp match the Triton forward's
    (summation order aside), and so do the gradients computed from them."""
    from fox_megatron.kernels.forgetting_attn import gluon_fwd, triton_ops

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon forward is for Hopper (sm_90)")
    B, T, Hq, Hkv, D = 2, 1531, 4, 2, head_dim
    q, k, v, log_f = make_inputs(B, T, Hq, Hkv, D, torch.bfloat16, layout=layout, device="cuda", seed=17)
    assert gluon_fwd.supported(q, k, v, q)
    cu = torch.tensor([0, 300, 301, 1531, 2000, 3062], dtype=torch.int32, device="cuda") if docs else None
    kw = dict(layout=layout, cu_seqlens=cu, acp=AcpConfig() if acp else None)
    do = torch.randn_like(q)
    results = {}
    for use in (True, False):
        monkeypatch.setattr(triton_ops, "USE_GLUON_FWD", use)
        results[use] = run(q, k, v, log_f, do, **kw)
    (o_g, grads_g), (o_t, grads_t) = results[True], results[False]
    assert rel_err(o_g, o_t) < 5e-3, "output"
    for name, a, b in zip(("dq", "dk", "dv", "dlog_f"), grads_g, grads_t):
        assert rel_err(a, b) < 1e-2, name


@pytest.mark.gpu
@pytest.mark.parametrize("ctas", [1, 3, None])
@pytest.mark.parametrize("acp", [False, True])
@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_persistent_forward_is_the_per_block_forward(ctas, acp, docs, head_dim, monkeypatch):
    """The persistent Gluon forward (CTAs that take query blocks from a
    counter) gives the per-block kernel's output, log-sum-exp and so
    gradients bit for bit: each block is computed by the same code in the
    same order, whichever CTA takes it.  With one or three CTAs each walks
    dozens of blocks (ring and query-buffer phases, records reused, and
    the empty blocks of short documents skipped); None: one CTA per SM."""
    from fox_megatron.kernels.forgetting_attn import gluon_fwd, triton_ops

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon forward is for Hopper (sm_90)")
    B, T, Hq, Hkv, D = 2, 1531, 4, 2, head_dim
    q, k, v, log_f = make_inputs(B, T, Hq, Hkv, D, torch.bfloat16, device="cuda", seed=23, decay_scale=3.0)
    cu = torch.tensor([0, 130, 131, 1531, 2000, 3062], dtype=torch.int32, device="cuda") if docs else None
    kw = dict(cu_seqlens=cu, acp=AcpConfig() if acp else None)
    do = torch.randn_like(q)
    monkeypatch.setattr(triton_ops, "USE_GLUON_FWD", True)
    monkeypatch.setattr(gluon_fwd, "PERSISTENT_CTAS", ctas)
    monkeypatch.setattr(gluon_fwd, "PERSISTENT_HEAD_DIMS", (64, 128))  # on by default at both
    results, lses = {}, {}
    for persistent in (True, False):
        monkeypatch.setattr(gluon_fwd, "PERSISTENT", persistent)
        o = forgetting_attention(q, k, v, log_f, **kw)
        node = o.grad_fn
        while type(node).__name__ != "ForgettingAttentionFunctionBackward":
            node = node.next_functions[0][0]
        lses[persistent] = node.saved_tensors[4]  # q, k, v, o, lse, ...
        results[persistent] = o, torch.autograd.grad(o, (q, k, v, log_f), do)
    (o_p, grads_p), (o_b, grads_b) = results[True], results[False]
    assert torch.isfinite(o_p).all()
    assert torch.equal(o_p, o_b), "output"
    assert torch.equal(lses[True], lses[False]), "log-sum-exp"
    for name, a, b in zip(("dq", "dk", "dv", "dlog_f"), grads_p, grads_b):
        assert torch.equal(a, b), name
    ref_o, _ = reference(q, k, v, log_f, do, **kw)
    assert rel_err(o_p, ref_o) < TOL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("ctas", [1, 3, None])
@pytest.mark.parametrize("acp", [False, True])
@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_persistent_dkdv_is_the_per_block_kernel(ctas, acp, docs, head_dim, monkeypatch):
    """The persistent Gluon dK / dV kernel (CTAs that take key blocks from
    a counter) gives the per-block kernel's gradients bit for bit: each key
    block is computed by the same code in the same order, whichever CTA
    takes it.  With one or three CTAs each walks dozens of key blocks
    (double-buffered K / V, ring phases, records reused, the empty blocks
    of short documents skipped, the last block's rows past the end zeroed);
    None: one CTA per SM.  GQA (two query heads per key / value head),
    and one head each with three CTAs."""
    from fox_megatron.kernels.forgetting_attn import gluon_bwd, triton_ops

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon dK / dV kernel is for Hopper (sm_90)")
    B, T, Hq, Hkv, D = 2, 1531, 4, 4 if ctas == 3 else 2, head_dim
    q, k, v, log_f = make_inputs(B, T, Hq, Hkv, D, torch.bfloat16, device="cuda", seed=29, decay_scale=3.0)
    cu = torch.tensor([0, 130, 131, 1531, 2000, 3062], dtype=torch.int32, device="cuda") if docs else None
    kw = dict(cu_seqlens=cu, acp=AcpConfig() if acp else None)
    do = torch.randn_like(q)
    monkeypatch.setattr(triton_ops, "USE_GLUON_DKDV", True)
    monkeypatch.setattr(gluon_bwd, "PERSISTENT_CTAS", ctas)
    monkeypatch.setattr(gluon_bwd, "PERSISTENT_HEAD_DIMS", (64, 128))  # checked at both, on by default at 64
    monkeypatch.setitem(gluon_bwd.DISPATCH, 128, ("dkdv", "dkdv"))  # the kernel without the fused dQ
    assert gluon_bwd.mode(q, k, v, do, acp) == "dkdv"
    grads = {}
    for persistent in (True, False):
        monkeypatch.setattr(gluon_bwd, "PERSISTENT", persistent)
        o = forgetting_attention(q, k, v, log_f, **kw)
        grads[persistent] = torch.autograd.grad(o, (q, k, v, log_f), do)
    for name, a, b in zip(("dq", "dk", "dv", "dlog_f"), grads[True], grads[False]):
        assert torch.isfinite(a).all(), name
        assert torch.equal(a, b), name
    _, ref_grads = reference(q, k, v, log_f, do, **kw)
    for name, a, b in zip(("dk", "dv", "dlog_f"), grads[True][1:], ref_grads[1:]):
        assert rel_err(a, b) < TOL[torch.bfloat16], name


@pytest.mark.gpu
@pytest.mark.parametrize("acp", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_gluon_kernels_take_precise_decays(acp, head_dim, monkeypatch):
    """With precise_decay the Gluon kernels read float64 decays (their
    precise variants, persistent where the dispatch runs them) and, with
    each document's first gate at -1e5, must match the float64 reference
    in bf16's bounds and the Triton kernels, in the output and every
    gradient.  bf16's bounds catch a kernel that misreads the float64
    decays, not float32's rounding of them (about 0.5% here, measured in
    fp32 on a CPU: test_triton_precise_decays_far_from_zero has the tight
    check)."""
    from fox_megatron.kernels.forgetting_attn import gluon_bwd, gluon_fwd, triton_ops

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernels are for Hopper (sm_90)")
    B, T, Hq, Hkv, D = 2, 1531, 4, 2, head_dim
    q, k, v, log_f = make_inputs(B, T, Hq, Hkv, D, torch.bfloat16, device="cuda", seed=37, decay_scale=0.3)
    cu = torch.tensor([0, 700, 701, 1531, 2000, 3062], dtype=torch.int32, device="cuda")
    with torch.no_grad():
        log_f.view(B * T, -1)[cu[:-1].long()] = -1e5
    kw = dict(cu_seqlens=cu, acp=AcpConfig() if acp else None, precise_decay=True)
    do = torch.randn_like(q)
    assert gluon_fwd.supported(q, k, v, q) and gluon_bwd.mode(q, k, v, do, acp) is not None
    results = {}
    for use in (True, False):
        monkeypatch.setattr(triton_ops, "USE_GLUON_FWD", use)
        monkeypatch.setattr(triton_ops, "USE_GLUON_DKDV", use)
        results[use] = run(q, k, v, log_f, do, **kw)
    (o_g, grads_g), (o_t, grads_t) = results[True], results[False]
    ref_o, ref_grads = reference(q, k, v, log_f, do, **kw)
    assert rel_err(o_g, ref_o) < TOL[torch.bfloat16], "output"
    assert rel_err(o_g, o_t) < 5e-3, "output against the Triton kernels"
    for name, a, b, r in zip(("dq", "dk", "dv", "dlog_f"), grads_g, grads_t, ref_grads):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, r) < TOL[torch.bfloat16], name
        assert rel_err(a, b) < 1e-2, name


@pytest.mark.parametrize("persistent", [True, False])
@pytest.mark.parametrize("acp", [False, True])
def test_gluon_launches_take_the_launch_order(acp, persistent, monkeypatch):
    """Under ACP the Gluon forward and dK / dV kernels get the (sequence,
    head) launch order that the kept tiles give (most first; by key / value
    head in the dK / dV pass), and no order without ACP.  The order changes
    no result, so the GPU tests cannot see it: here stand-in kernels record
    their launches (on a CPU; the boundary and ranking kernels interpreted)."""
    from fox_megatron.kernels.forgetting_attn import gluon_bwd, gluon_fwd, triton_ops

    fwd_name = "_fwd_kernel_sm90_persistent" if persistent else "_fwd_kernel_sm90_pingpong"
    dkdv_name = "_dkdv_kernel_sm90_persistent" if persistent else "_dkdv_kernel_sm90"
    monkeypatch.setattr(gluon_fwd, "PERSISTENT", persistent)
    monkeypatch.setattr(gluon_bwd, "PERSISTENT", persistent)
    monkeypatch.setattr(gluon_fwd, "_sm_count", lambda device: 4)
    kernels = {"fwd": getattr(gluon_fwd, fwd_name), "dkdv": getattr(gluon_bwd, dkdv_name)}
    launches = {}

    class StandIn:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def launch(*args, **constexprs):
                named = dict(zip(kernels[self.name].arg_names, args))
                for out in ("O", "LSE", "DK", "DV", "DCK"):  # what the dQ kernel and autograd read on
                    if out in named:
                        named[out].zero_()
                launches[self.name] = (named, constexprs, grid)
            return launch

    monkeypatch.setattr(gluon_fwd, fwd_name, StandIn("fwd"))
    monkeypatch.setattr(gluon_bwd, dkdv_name, StandIn("dkdv"))
    monkeypatch.setattr(gluon_fwd, "supported", lambda *a: True)
    monkeypatch.setattr(gluon_bwd, "mode", lambda *a, **kw: "dkdv")
    monkeypatch.setattr(gluon_bwd, "takes_boundaries", lambda *a: True)
    B, T, Hq, Hkv, D = 2, 700, 4, 2, 64
    q, k, v, log_f = make_inputs(B, T, Hq, Hkv, D, torch.float16, seed=41)
    with torch.no_grad():  # the fast-forgetting heads first, and rows that differ
        log_f.copy_(log_f.flip(-1))
        log_f[1] *= 4.0
    cfg = AcpConfig(logit_bound=math.sqrt(D)) if acp else None
    o = forgetting_attention(q, k, v, log_f, backend="triton", acp=cfg)
    o.backward(torch.randn_like(o))
    args_f, consts_f, grid_f = launches["fwd"]
    args_b, consts_b, grid_b = launches["dkdv"]
    assert consts_f["ORDERED"] is acp and consts_b["ORDERED"] is acp
    # the per-block grids (blocks, sequences, heads), or as many persistent
    # CTAs as SMs (4 here) over those blocks, with a zeroed item counter
    blocks_f = -(-T // gluon_fwd.CONFIGS[D][0])
    blocks_b = -(-T // gluon_bwd.CONFIGS[D][1])
    if persistent:
        for args, grid, total in ((args_f, grid_f, blocks_f * B * Hq), (args_b, grid_b, blocks_b * B * Hkv)):
            assert tuple(grid) == (4,) and args["total"] == total
            assert args["CNT"].dtype == torch.int32 and args["CNT"].tolist() == [0]
    else:
        assert tuple(grid_f) == (blocks_f, B, Hq) and tuple(grid_b) == (blocks_b, B, Hkv)
    if not acp:
        return
    # the kept tiles per (row, head), from the reference boundaries in the
    # forward's tiles; pair index s + S * h, most kept tiles first
    bm, bn = triton_ops.fwd_blocks(D, torch.float16)
    c = cumulative_log_decay(log_f.detach().double()).permute(0, 2, 1)  # [B, H, T]
    thr = torch.full((B, Hq), -2 * math.sqrt(D) - math.log(T) - 10.0, dtype=torch.float64)
    kstart = reference_block_boundaries(c, thr, bm, bn).long()  # [B, H, M]
    diag = ((torch.arange(kstart.shape[-1]) + 1) * bm).clamp(max=T) - 1
    kept = (diag // bn + 1 - kstart).sum(-1)  # [B, H]
    kv_kept = kept.view(B, Hkv, Hq // Hkv).sum(-1)
    for order, w in ((args_f["ORDER"], kept), (args_b["ORDER"], kv_kept)):
        expect = torch.argsort(w.t().reshape(-1), descending=True, stable=True)
        assert order.tolist() == expect.tolist()
        assert expect.tolist() != sorted(expect.tolist()), "the inputs should reorder the pairs"


def test_gluon_kernel_that_does_not_compile_falls_back(monkeypatch):
    """Gluon's API moves between Triton releases: a Gluon kernel that this
    Triton cannot compile turns its switch off with a warning, and the caller
    is told to run its Triton kernel."""
    from triton.compiler.errors import CompilationError

    from fox_megatron.kernels.forgetting_attn import triton_ops

    monkeypatch.setattr(triton_ops, "USE_GLUON_DKDV", True)

    def launch(*args):
        raise CompilationError(None, None, "async_copy_global_to_shared has been removed")

    with pytest.warns(RuntimeWarning, match="does not compile"):
        assert triton_ops._run_gluon("USE_GLUON_DKDV", launch, 1, 2) is False
    assert triton_ops.USE_GLUON_DKDV is False
    ran = []
    assert triton_ops._run_gluon("USE_GLUON_FWD", lambda *a: ran.append(a), 1) is True and ran == [(1,)]


def test_backward_runs_the_triton_kernels_when_the_gluon_backward_does_not_compile(monkeypatch):
    """Where gluon_bwd.DISPATCH asks for the fused dQ and this Triton cannot
    compile the Gluon kernel, both of its switches turn off with warnings
    and the Triton dQ and dK / dV kernels give the same gradients as when
    the Gluon kernel was never asked for (interpreted on a CPU)."""
    from triton.compiler.errors import CompilationError

    from fox_megatron.kernels.forgetting_attn import gluon_bwd, triton_ops

    q, k, v, log_f = make_inputs(1, 77, 2, 1, 64, torch.float32, seed=5)
    do = torch.randn_like(q)
    kw = dict(backend="triton", acp=AcpConfig())
    _, expected = run(q, k, v, log_f, do, **kw)
    launches = []

    def launch(*args):
        launches.append(len(args) > 18)  # with the fused dQ's buffers
        raise CompilationError(None, None, "no such Gluon function in this Triton")

    monkeypatch.setattr(triton_ops, "USE_GLUON_DKDV", True)
    monkeypatch.setattr(triton_ops, "USE_GLUON_FUSED_DQ", True)
    monkeypatch.setattr(gluon_bwd, "mode", lambda *a, **kw: "fused")
    monkeypatch.setattr(gluon_bwd, "launch_dkdv", launch)
    with pytest.warns(RuntimeWarning, match="does not compile"):
        _, got = run(q, k, v, log_f, do, **kw)
    assert launches == [True, False]
    assert triton_ops.USE_GLUON_FUSED_DQ is False and triton_ops.USE_GLUON_DKDV is False
    for name, a, b in zip(("dq", "dk", "dv", "dlog_f"), got, expected):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("acp", [False, True])
def test_fused_backward_reads_its_buffers_as_the_kernel_writes_them(acp, monkeypatch):
    """The fused Gluon backward leaves dQ in a float32 [B, T, H, D] buffer and
    dc_q's row sums in every column of a float32 [B, T, H, 16] one; a stand-in
    kernel that fills them (and dK, dV, dc_k) with the Triton kernels'
    results gives the gradients of the Triton path (interpreted on a CPU:
    the buffers' host side, GQA and packed documents)."""
    from fox_megatron.kernels.forgetting_attn import gluon_bwd, triton_ops

    q, k, v, log_f = make_inputs(1, 93, 4, 2, 64, torch.float32, seed=7)
    do = torch.randn_like(q)
    cu = torch.tensor([0, 40, 93], dtype=torch.int32)
    kw = dict(backend="triton", cu_seqlens=cu, acp=AcpConfig() if acp else None)
    _, expected = run(q, k, v, log_f, do, **kw)
    shapes = []

    def launch(q_, k_, v_, do_, c_q, c_k, lse, dlt, thr, qbhi, dk, dv, dc_k, pairs, scale, causal, group, blocks,
               dq_acc=None):
        dq32, dcq16 = dq_acc
        shapes.append((tuple(dq32.shape), tuple(dcq16.shape)))
        dq_t, dk_t, dv_t, dcq_t, dck_t = triton_ops._backward(do_, q_, k_, v_, c_q, c_k, None, lse, pairs, scale, thr,
                                                              causal, delta=dlt, qbhi=qbhi)
        dq32.copy_(dq_t)
        dcq16.copy_(dcq_t.permute(0, 2, 1)[..., None].expand_as(dcq16))
        dk.copy_(dk_t)
        dv.copy_(dv_t)
        dc_k.copy_(dck_t)

    monkeypatch.setattr(triton_ops, "USE_GLUON_DKDV", True)
    monkeypatch.setattr(triton_ops, "USE_GLUON_FUSED_DQ", True)
    monkeypatch.setattr(gluon_bwd, "mode", lambda *a, **kw: "fused")
    monkeypatch.setattr(gluon_bwd, "takes_boundaries", lambda *a: True)
    monkeypatch.setattr(gluon_bwd, "launch_dkdv", launch)
    _, got = run(q, k, v, log_f, do, **kw)
    assert shapes == [((1, 93, 4, 64), (1, 93, 4, 16))]
    for name, a, b in zip(("dq", "dk", "dv", "dlog_f"), got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)

@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["bshd", "sbhd"])
@pytest.mark.parametrize("acp", [False, True])
@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("fused_dq", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_gluon_dkdv_matches_triton_dkdv(layout, acp, docs, fused_dq, head_dim, monkeypatch):
    """On Hopper the warp-specialised Gluon dK / dV kernel (fused_dq: it also
    computes dQ and dc_q), at either head dim, gives gradients
    that match the Triton kernels' (summation order aside) and the float64
    reference's, with GQA, packed documents, ACP and a length that is no
    multiple of any block."""
    from fox_megatron.kernels.forgetting_attn import gluon_bwd, triton_ops

    monkeypatch.setattr(triton_ops, "USE_GLUON_FUSED_DQ", True)
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernels are for Hopper (sm_90)")
    B, T, Hq, Hkv, D = 2, 1531, 4, 2, head_dim
    q, k, v, log_f = make_inputs(B, T, Hq, Hkv, D, torch.bfloat16, layout=layout, device="cuda", seed=19)
    do = torch.randn_like(q)
    # what runs by default is a row of DISPATCH: each case forces its own
    monkeypatch.setitem(gluon_bwd.DISPATCH, D, ("fused", "fused") if fused_dq else ("dkdv", "dkdv"))
    runs = gluon_bwd.mode(*(t if layout == "bshd" else t.transpose(0, 1) for t in (q, k, v, do)), acp=acp)
    cu = torch.tensor([0, 300, 301, 1531, 2000, 3062], dtype=torch.int32, device="cuda") if docs else None
    kw = dict(layout=layout, cu_seqlens=cu, acp=AcpConfig() if acp else None)
    launches = []
    monkeypatch.setattr(gluon_bwd, "launch_dkdv",
                        lambda *a, _f=gluon_bwd.launch_dkdv: launches.append(len(a) > 18) or _f(*a))
    results = {}
    for use in (True, False):
        monkeypatch.setattr(triton_ops, "USE_GLUON_DKDV", use)
        results[use] = run(q, k, v, log_f, do, **kw)
    assert launches == [runs == "fused"], "the Gluon kernel did not run as asked"
    (_, grads_g), (_, grads_t) = results[True], results[False]
    _, grads_ref = reference(q, k, v, log_f, do, **kw)
    for name, a, b, r in zip(("dq", "dk", "dv", "dlog_f"), grads_g, grads_t, grads_ref):
        assert rel_err(a, b) < 1e-2, name
        assert rel_err(a, r) < TOL[torch.bfloat16], name


@pytest.mark.gpu
def test_gpu_deterministic_mode_keeps_dq_reproducible(monkeypatch):
    """The fused dQ's reduce-adds land in no fixed order; under
    torch.use_deterministic_algorithms the dQ kernel runs instead and two
    backwards agree bit for bit."""
    from fox_megatron.kernels.forgetting_attn import gluon_bwd

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernels are for Hopper (sm_90)")
    q, k, v, log_f = make_inputs(1, 2048, 4, 4, 128, torch.bfloat16, device="cuda", seed=23)
    do = torch.randn_like(q)
    launches = []
    monkeypatch.setattr(gluon_bwd, "launch_dkdv",
                        lambda *a, _f=gluon_bwd.launch_dkdv: launches.append(len(a) > 18) or _f(*a))
    monkeypatch.setitem(gluon_bwd.DISPATCH, 128, ("fused", "fused"))
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        grads = [run(q, k, v, log_f, do)[1] for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(was)
    assert launches == [False, False]
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    run(q, k, v, log_f, do)
    assert launches[-1] is True  # the fused dQ outside deterministic mode
