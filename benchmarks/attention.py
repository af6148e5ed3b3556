"""Attention kernel benchmark (forward + backward), protocol of BENCH.md.

bf16 q/k/v, fp32 log forget gates, causal, 32768 tokens per batch
(B = 32768 / L); "paper-like" gates: head h has per-token log-decay
-r_h * exp(0.5 z), z ~ N(0, 1), r_h log-uniform over [1e-4, 1]; q and k are
RMS-normalised, so U = sqrt(D) and delta = -2U - log L - 10.

Peers in the same run: torch SDPA (FLASH_ATTENTION and CUDNN_ATTENTION
backends), FLA's parallel_forgetting_attn (FoX without pruning) and torch
FlexAttention with a plain causal BlockMask.

    python benchmarks/attention.py --out benchmarks/results/attention_h100.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
import triton
import triton.testing

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.result_file import run_header, write_result  # noqa: E402
from fox_megatron.kernels import AcpConfig, forgetting_attention  # noqa: E402

TOKENS = 32768
VARIANTS = ("full", "acp", "docs", "docs_acp", "separate", "separate_acp")


def paper_like_inputs(B, L, H, D, seed, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, L, H, D, device=device, generator=g)
    k = torch.randn(B, L, H, D, device=device, generator=g)
    v = torch.randn(B, L, H, D, device=device, generator=g)
    # QK-norm with unit weights: every row has RMS 1, so ||q|| = sqrt(D)
    q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True))
    k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True))
    log_f = paper_like_log_gates(B, L, H, g)
    q, k, v = (t.to(torch.bfloat16).requires_grad_() for t in (q, k, v))
    return q, k, v, log_f.float().requires_grad_()


def paper_like_log_gates(B, L, H, generator, dtype=torch.float32):
    """[B, L, H] log forget gates: head h forgets at -r_h * exp(0.5 z) per
    token, z ~ N(0, 1), r_h log-uniform over [1e-4, 1] (on the generator's
    device)."""
    device = generator.device
    r = torch.exp(torch.linspace(math.log(1e-4), math.log(1.0), H, device=device, dtype=dtype))
    z = torch.randn(B, L, H, device=device, generator=generator, dtype=dtype)
    return log_gates(r, z)


def log_gates(rates, z):
    """The benchmarks' gate model: log forget gates -rates * exp(0.5 z), a
    per-token log-normal spread (z ~ N(0, 1)) around each rate."""
    return -rates * torch.exp(0.5 * z)


def flops(B, H, D, L):
    # causal fwd + bwd: 3.5 x (4 B H D L^2) / 2, unpruned for every variant
    return 3.5 * 4 * B * H * D * L * L / 2


def time_step(fn, inputs, warmup_ms, rep_ms):
    out = fn()
    dout = torch.randn_like(out)

    def step():
        o = fn()
        o.backward(dout)

    ms = triton.testing.do_bench(step, warmup=warmup_ms, rep=rep_ms, grad_to_none=list(inputs), return_mode="median")
    return ms


def make_sdpa(q, k, v, backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]
    qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))

    def fn():
        with sdpa_kernel(be):
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True)

    return fn, (qt, kt, vt)


def make_flex(q, k, v):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, L, H, D = q.shape
    qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
    mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, L, L, device=q.device)
    compiled = torch.compile(flex_attention)

    def fn():
        return compiled(qt, kt, vt, block_mask=mask)

    return fn, (qt, kt, vt)


def make_fla(q, k, v, log_f, cu_seqlens=None):
    from fla.ops.forgetting_attn import parallel_forgetting_attn

    B, L, H, D = q.shape
    if cu_seqlens is not None:
        args = [t.detach().reshape(1, B * L, *t.shape[2:]).requires_grad_() for t in (q, k, v, log_f)]
    else:
        args = [t.detach().requires_grad_() for t in (q, k, v, log_f)]

    def fn():
        return parallel_forgetting_attn(*args, scale=1 / math.sqrt(D), cu_seqlens=cu_seqlens)

    return fn, tuple(args)


def doc_cu_seqlens(B, L, docs, device):
    per = L // docs
    starts = [r * L + i * per for r in range(B) for i in range(docs)]
    return torch.tensor(starts + [B * L], dtype=torch.int32, device=device)


def summarize(records):
    """Ratios to the peers measured on the same work (same shape, length and
    documents per row) and ACP's translation efficiency
    E = (1 - t_acp / t_full) / (1 - kept_tiles)."""
    summary = []
    for r in records:
        if r["impl"] != "fox":
            continue
        same = [p for p in records if (p["H"], p["D"], p["L"], p["docs"]) == (r["H"], r["D"], r["L"], r["docs"])]
        row = dict(H=r["H"], D=r["D"], L=r["L"], docs=r["docs"], acp=r["acp"], ms=r["ms"])
        for p in same:
            # packed vs the same documents unpacked: like for like (ACP or not)
            if p["impl"] != "fox" and (p["impl"] != "fox_separate" or p["acp"] == r["acp"]):
                row[f"speedup_vs_{p['impl']}"] = round(p["ms"] / r["ms"], 3)
        full = next((p for p in same if p["impl"] == "fox" and not p["acp"]), None)
        if r["acp"]:
            kept = row["kept_tiles"] = r["kept_tiles"]
        if r["acp"] and full is not None:
            row["acp_efficiency"] = round((1 - r["ms"] / full["ms"]) / max(1 - kept, 1e-9), 3)
        summary.append(row)
    return summary


def print_summary(summary):
    nan = float("nan")
    print(f"{'H':>3} {'D':>4} {'L':>6} {'docs':>4} {'acp':>5} {'ms':>8} {'kept':>6} {'E':>6} "
          f"{'xflash':>7} {'xcudnn':>7} {'xfla':>6} {'xflex':>6} {'xsep':>6}")
    for s in summary:
        print(f"{s['H']:>3} {s['D']:>4} {s['L']:>6} {s['docs']:>4} {str(s['acp']):>5} {s['ms']:>8.2f} "
              f"{s.get('kept_tiles', 1.0):>6.3f} {s.get('acp_efficiency', nan):>6.2f} "
              f"{s.get('speedup_vs_sdpa_flash', nan):>7.2f} {s.get('speedup_vs_sdpa_cudnn', nan):>7.2f} "
              f"{s.get('speedup_vs_fla_fox', nan):>6.2f} {s.get('speedup_vs_flex_plain', nan):>6.2f} "
              f"{s.get('speedup_vs_fox_separate', nan):>6.2f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="4096,8192,16384,32768")
    ap.add_argument("--shapes", default="24x64,16x128")
    ap.add_argument("--docs", type=int, default=8, help="documents per row for the packed variant")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="FoX variants: one document per row (full, acp), packed (docs, docs_acp), the packed "
                         "documents as separate rows (separate, separate_acp)")
    ap.add_argument("--peers", default="sdpa_flash,sdpa_cudnn,fla_fox,flex_plain")
    ap.add_argument("--warmup-ms", type=float, default=200)
    ap.add_argument("--rep-ms", type=float, default=1000)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    records = []
    header = run_header(gpus=1)

    def dump(extra=None):
        if args.out:
            write_result(args.out, {**header, "records": records, **(extra or {})})

    peers = [p for p in args.peers.split(",") if p]
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown --variants {sorted(unknown)} (choose from {','.join(VARIANTS)})")
    for shape in args.shapes.split(","):
        H, D = (int(x) for x in shape.split("x"))
        for L in (int(x) for x in args.lengths.split(",")):
            B = max(TOKENS // L, 1)
            q, k, v, log_f = paper_like_inputs(B, L, H, D, seed=L + H)
            acp = AcpConfig(log_eps=-10.0, logit_bound=math.sqrt(D))
            base = dict(H=H, D=D, L=L, B=B)
            fl = flops(B, H, D, L)

            def rec(impl, ms, **extra):
                r = dict(bench="attention", impl=impl, ms=round(ms, 4), tflops=round(fl / ms * 1e-9, 2), **base, **extra)
                records.append(r)
                dump()
                print(json.dumps(r), flush=True)
                return r

            # FoX without and with ACP: one document per row, packed
            # documents, and the same documents as separate batch rows (the
            # work of the packed call without packing)
            for variant in variants:
                use_acp = variant.endswith("acp")
                docs = 1 if variant in ("full", "acp") else args.docs
                separate = variant.startswith("separate")
                cu = doc_cu_seqlens(B, L, docs, q.device) if docs > 1 and not separate else None
                # packed documents come as a trainer gives them (Megatron's
                # PackedSeqParams): cu_seqlens on the GPU and max_seqlen
                mx = L // docs if cu is not None else None
                ins = (q, k, v, log_f)
                if separate:
                    ins = tuple(t.view(B * docs, L // docs, *t.shape[2:]) for t in ins)
                fn = lambda: forgetting_attention(*ins, cu_seqlens=cu, max_seqlen=mx,  # noqa: E731
                                                  acp=acp if use_acp else None)
                ms = time_step(fn, (q, k, v, log_f), args.warmup_ms, args.rep_ms)
                extra = dict(acp=use_acp, docs=docs)
                if use_acp:
                    _, st = forgetting_attention(*ins, cu_seqlens=cu, acp=acp, return_stats=True)
                    extra["kept_tiles"] = round(st.kept_fraction, 4)
                rec("fox_separate" if separate else "fox", ms, **extra)
            for peer in peers:
                try:
                    if peer.startswith("sdpa_"):
                        fn, ins = make_sdpa(q, k, v, peer[5:])
                    elif peer == "flex_plain":
                        fn, ins = make_flex(q, k, v)
                    elif peer == "fla_fox":
                        fn, ins = make_fla(q, k, v, log_f)
                    ms = time_step(fn, ins, args.warmup_ms, args.rep_ms)
                    rec(peer, ms, acp=False, docs=1)
                    if peer == "fla_fox" and args.docs > 1:
                        fn, ins = make_fla(q, k, v, log_f, doc_cu_seqlens(B, L, args.docs, q.device))
                        rec(peer, time_step(fn, ins, args.warmup_ms, args.rep_ms), acp=False, docs=args.docs)
                except Exception as e:  # a missing peer is reported, not fatal
                    print(f"peer {peer} failed at H={H} D={D} L={L}: {type(e).__name__}: {e}", flush=True)
            del q, k, v, log_f
            torch.cuda.empty_cache()

    summary = summarize(records)
    dump({"summary": summary})
    print()
    print_summary(summary)


if __name__ == "__main__":
    main()
