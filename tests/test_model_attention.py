"""FoxSelfAttention against FoX (Pro) written out in plain torch."""

import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "dist"))
from fox_dist_common import init_parallel, small_config  # noqa: E402

from megatron.core.packed_seq_params import PackedSeqParams  # noqa: E402

from fox_megatron.model import FoxConfig, FoxSelfAttention, FoxTransformerConfig  # noqa: E402
from fox_megatron.model.attention import document_start_mask, shift_tokens  # noqa: E402


@pytest.fixture(autouse=True)
def _parallel():
    init_parallel(1, 1)


def _module(fox, heads=4, groups=4, hidden=64, seed=0):
    cfg = small_config(
        FoxTransformerConfig, fox=fox, hidden_size=hidden, num_attention_heads=heads,
        num_query_groups=groups, params_dtype=torch.float64,
    )
    torch.manual_seed(seed)
    attn = FoxSelfAttention(cfg, layer_number=1)
    with torch.no_grad():  # non-trivial norm weights and gate bias
        for p in (attn.q_norm, attn.k_norm, attn.out_norm):
            if p is not None:
                p.weight.uniform_(0.5, 1.5)
        attn.forget_gate_bias.uniform_(-2.0, 1.0)
    return attn


def _reference(attn, x, starts_rows, rope=None):
    """FoX Pro from the paper's equations, per batch row and document, with
    explicit loops over documents (no shared code with the module).

    starts_rows[b]: sorted document start positions in row b (0 included).
    """
    fox = attn.fox
    T, B, _ = x.shape
    Hq, Hk, D = attn.num_heads, attn.num_groups, attn.head_dim
    W = attn.linear_in.weight
    sizes = dict(attn._parts)
    offs, o = {}, 0
    for name, w in attn._parts:
        offs[name] = (o, o + w)
        o += w

    def proj(name):
        a, b = offs[name]
        return x @ W[a:b].t()

    q = proj("query").reshape(T, B, Hq, D)
    k = proj("key").reshape(T, B, Hk, D)
    v = proj("value").reshape(T, B, Hk, D)
    logf = F.logsigmoid(proj("forget_gate") + attn.forget_gate_bias)  # T B Hq
    out = torch.zeros(T, B, Hq, D, dtype=x.dtype)
    for b in range(B):
        bounds = list(starts_rows[b]) + [T]
        for s, e in zip(bounds[:-1], bounds[1:]):
            qd, kd, vd, fd = q[s:e, b], k[s:e, b], v[s:e, b], logf[s:e, b]
            if fox.kv_shift:
                ak = torch.sigmoid(proj("key_shift")[s:e, b])[..., None]
                av = torch.sigmoid(proj("value_shift")[s:e, b])[..., None]
                kprev = torch.cat([torch.zeros_like(kd[:1]), kd[:-1]])
                vprev = torch.cat([torch.zeros_like(vd[:1]), vd[:-1]])
                kd = ak * kprev + (1 - ak) * kd
                vd = av * vprev + (1 - av) * vd
            if fox.qk_norm:
                rms = lambda t, w: t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + attn.q_norm.eps) * w
                qd, kd = rms(qd, attn.q_norm.weight), rms(kd, attn.k_norm.weight)
            if rope is not None:
                qd, kd = rope(qd, s, b), rope(kd, s, b)
            g = Hq // Hk
            kd, vd = kd.repeat_interleave(g, 1), vd.repeat_interleave(g, 1)
            c = fd.cumsum(0)  # L H
            L = e - s
            logits = torch.einsum("ihd,jhd->hij", qd, kd) / math.sqrt(D) + (c.t()[:, :, None] - c.t()[:, None, :])
            mask = torch.ones(L, L, dtype=torch.bool).tril()
            p = torch.softmax(logits.masked_fill(~mask, float("-inf")), -1)
            od = torch.einsum("hij,jhd->ihd", p, vd)
            if fox.output_norm:
                od = od / torch.sqrt(od.pow(2).mean(-1, keepdim=True) + attn.out_norm.eps) * attn.out_norm.weight
            out[s:e, b] = od
    out = out.reshape(T, B, Hq * D)
    if fox.output_gate:
        out = out * torch.sigmoid(proj("output_gate"))
    return out @ attn.linear_proj.weight.t()


FEATURES = [
    FoxConfig(acp=False),
    FoxConfig.basic(acp=False),
    FoxConfig(acp=False, qk_norm=False),
    FoxConfig(acp=False, kv_shift=False, output_gate=False),
]


@pytest.mark.parametrize("fox", FEATURES, ids=["pro", "basic", "no_qk_norm", "no_shift_no_gate"])
@pytest.mark.parametrize("groups", [4, 2])
def test_matches_reference(fox, groups):
    attn = _module(fox, groups=groups)
    T, B = 40, 2
    x = torch.randn(T, B, 64, dtype=torch.float64, requires_grad=True)
    out, bias = attn(x, attention_mask=None)
    assert bias is None
    ref = _reference(attn, x, [[0], [0]])
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    # gradients with respect to the input and every parameter
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [x] + list(attn.parameters()), grad)
    want = torch.autograd.grad(ref, [x] + list(attn.parameters()), grad)
    for g1, g2 in zip(got, want):
        torch.testing.assert_close(g1, g2, rtol=1e-8, atol=1e-9)


def test_packed_documents_respect_boundaries():
    attn = _module(FoxConfig(acp=False), groups=2)
    T, B = 32, 2
    starts = [[0, 5, 19], [0, 13]]
    cu = torch.tensor([0, 5, 19, 32, 32 + 13, 64], dtype=torch.int32)
    x = torch.randn(T, B, 64, dtype=torch.float64)
    packed = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu)
    out, _ = attn(x, None, packed_seq_params=packed)
    torch.testing.assert_close(out, _reference(attn, x, starts), rtol=1e-9, atol=1e-9)
    # a document's output depends on nothing outside it, shift included
    x2 = x.clone()
    x2[:5, 0] += 10.0 * torch.randn(5, 64, dtype=torch.float64)
    out2, _ = attn(x2, None, packed_seq_params=packed)
    torch.testing.assert_close(out2[5:], out[5:], rtol=0, atol=1e-12)


def test_rope_applied_when_enabled():
    attn = _module(FoxConfig(acp=False, use_rope=True))
    T, B, D = 24, 2, attn.head_dim
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    freqs = torch.outer(torch.arange(T, dtype=torch.float64), inv)
    emb = torch.cat([freqs, freqs], -1)[:, None, None, :]  # Megatron's [s, 1, 1, d] layout

    def rope(t, s, b):  # rotate-half on [L, H, D] starting at position s
        f = emb[s:s + t.shape[0], 0]
        x1, x2 = t.chunk(2, -1)
        return t * f.cos() + torch.cat([-x2, x1], -1) * f.sin()

    x = torch.randn(T, B, 64, dtype=torch.float64)
    out, _ = attn(x, None, rotary_pos_emb=emb)
    torch.testing.assert_close(out, _reference(attn, x, [[0], [0]], rope=rope), rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="use_rope"):
        attn(x, None)


def test_rope_ignored_with_warning_when_disabled():
    attn = _module(FoxConfig(acp=False))
    x = torch.randn(8, 1, 64, dtype=torch.float64)
    emb = torch.randn(8, 1, 1, attn.head_dim, dtype=torch.float64)
    with pytest.warns(UserWarning, match="use_rope is off"):
        out, _ = attn(x, None, rotary_pos_emb=emb)
    torch.testing.assert_close(out, attn(x, None)[0])


def test_shift_helpers():
    x = torch.arange(1.0, 7.0).reshape(6, 1, 1, 1)
    starts = document_start_mask(torch.tensor([0, 3, 6]), 6, 1, "cpu")
    assert starts[:, 0].tolist() == [True, False, False, True, False, False]
    y = shift_tokens(x, torch.full((6, 1, 1), 0.5), starts)
    assert y.flatten().tolist() == [0.5, 1.5, 2.5, 2.0, 4.5, 5.5]


def test_acp_uses_qk_norm_bound_and_changes_little():
    # same weights with ACP on and off: the difference is bounded by the
    # pruned attention mass (<= eps per query, see test_model_acp for the bound)
    on = _module(FoxConfig(acp=True, acp_log_eps=-12.0))
    off = _module(FoxConfig(acp=False))
    off.load_state_dict(on.state_dict())
    with torch.no_grad():
        on.forget_gate_bias.fill_(-3.0)
        off.forget_gate_bias.fill_(-3.0)
    x = torch.randn(256, 1, 64, dtype=torch.float64)
    a, _ = on(x, None)
    b, _ = off(x, None)
    assert on.acp_kept_fraction is not None and float(on.acp_kept_fraction) < 1.0
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    # below acp_min_seqlen the layer runs unpruned: the result of ACP off
    short = _module(FoxConfig(acp=True, acp_log_eps=-12.0, acp_min_seqlen=257))
    short.load_state_dict(on.state_dict())
    c, _ = short(x, None)
    assert float(short.acp_kept_fraction) == 1.0
    torch.testing.assert_close(c, b, rtol=0, atol=0)


def test_fused_elementwise_functions_compile_to_the_eager_math():
    # What the GPU path compiles (torch.compile, fullgraph) computes the eager
    # functions' values and gradients; Inductor's CPU backend stands in for
    # the GPU one here.
    from fox_megatron.model import fused

    g = torch.Generator().manual_seed(0)
    T, B, H, D = 9, 2, 3, 8
    starts = torch.zeros(T, B, dtype=torch.bool)
    starts[0] = True
    starts[4, 1] = True
    w = lambda *shape: torch.rand(*shape, generator=g) + 0.5  # noqa: E731
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    cases = [
        # q, k, v, shift logits k / v, (starts), q / k norm weights, (eps), forget logits, forget bias
        (fused.before_attention,
         lambda: (r(T, B, H, D), r(T, B, 1, D), r(T, B, 1, D), r(T, B, 1), r(T, B, 1), w(H, D), w(1, D), r(T, B, H), r(H)),
         lambda xs: (*xs[:5], starts, xs[5], xs[6], 1e-6, xs[7], xs[8])),
        # o, out norm weight, (eps), gate logits
        (fused.after_attention, lambda: (r(T, B, H, D), w(H, D), r(T, B, H * D)),
         lambda xs: (xs[0], xs[1], 1e-6, xs[2])),
    ]
    for fn, make, arrange in cases:
        inputs = make()
        results = []
        for f in (fn, torch.compile(fn, fullgraph=True, dynamic=False)):
            xs = [t.clone().requires_grad_() for t in inputs]
            out = f(*arrange(xs))
            outs = out if isinstance(out, tuple) else (out,)
            sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in outs).backward()
            results.append([o.detach() for o in outs] + [x.grad for x in xs])
        for a, b in zip(*results):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=fn.__name__)
    # without shift logits and norm weights only the forget gate is computed
    q = torch.randn(T, B, H, D)
    out = fused.before_attention(q, q, q, None, None, None, None, None, 0.0, torch.zeros(T, B, H), torch.zeros(H))
    assert out[0] is q and torch.allclose(out[3], torch.full((T, B, H), -math.log(2.0)))
    # the layer calls the compiled functions only for CUDA tensors below fp64
    x = torch.randn(2, 2)
    assert fused.maybe_compiled(fused.gate_output, x, True) is fused.gate_output
