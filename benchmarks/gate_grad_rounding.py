"""How the gate gradient's error depends on where the row sums of dS come from (CPU, no kernels).

dL/dlog f_t sums dS_ij over the pairs that cross token t (j < t <= i).  The
kernels get it as a suffix sum of dc_i = rowsum_i(dS) - colsum_i(dS), in
which every pair that does not cross t is added once and subtracted once.
In exact arithmetic rowsum_i(dS) = 0 (a row's softmax does not change when
its logits shift together), so the row sums could be dropped, saving the
fused backward the work of producing them per tile.  This script emulates
the kernels' arithmetic in float32 (bf16 q, k, v, dO; P rounded to bf16
before P V in the forward; the output rounded to bf16; delta = dO . O) for
one head of paper-like gates and compares dL/dlog f against float64 for:

- rows_cols_fp32: row and column sums of the float32 dS (the Triton kernels),
- rows_cols_bf16: both from the bf16 dS the tensor cores see (the fused
  Gluon backward),
- cols_only_bf16 / cols_only_fp32: row sums dropped,
- cols_only_fp32_out: row sums dropped, delta taken from the forward's
  float32 output before its bf16 rounding (which the forward could keep
  as a residual): what is left is the forward's rounding of P.

    python benchmarks/gate_grad_rounding.py --length 2048 --out benchmarks/results/gate_grad_rounding_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.attention import log_gates  # noqa: E402


def bf16(x):
    return x.to(torch.bfloat16).to(x.dtype)


def suffix_sum(x):
    return torch.flip(torch.cumsum(torch.flip(x.double(), [0]), 0), [0])


def one_head(L, D, rate, generator):
    q, k, v = (torch.randn(L, D, generator=generator) for _ in range(3))
    # QK-norm with unit weights, as BENCH.md's inputs
    q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True))
    k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True))
    q, k, v = bf16(q), bf16(k), bf16(v)
    log_f = log_gates(rate, torch.randn(L, generator=generator))
    do = bf16(torch.randn(L, D, generator=generator))
    c = torch.cumsum(log_f, 0)
    scale = 1 / math.sqrt(D)
    causal = torch.ones(L, L, dtype=torch.bool).tril()

    # float64 reference
    s64 = (scale * q.double() @ k.double().T + c.double()[:, None] - c.double()[None, :]).masked_fill(~causal, -math.inf)
    p64 = torch.softmax(s64, -1)
    o64 = p64 @ v.double()
    ds64 = p64 * (do.double() @ v.double().T - (do.double() * o64).sum(-1)[:, None])
    reference = suffix_sum(ds64.sum(1) - ds64.sum(0))

    # the kernels' arithmetic
    s = (scale * q @ k.T + c[:, None] - c[None, :]).masked_fill(~causal, -math.inf)
    m = s.max(-1).values
    p = torch.exp(s - m[:, None])
    l_sum = p.sum(-1)
    out32 = (bf16(p) @ v) / l_sum[:, None]
    out = bf16(out32)
    lse = m + torch.log(l_sum)
    delta = (do * out).sum(-1)
    ds = torch.exp(s - lse[:, None]) * (do @ v.T - delta[:, None])
    ds16 = bf16(ds)
    ds16_out32 = bf16(torch.exp(s - lse[:, None]) * (do @ v.T - (do * out32).sum(-1)[:, None]))
    variants = {
        "rows_cols_fp32": ds.double().sum(1) - ds.double().sum(0),
        "rows_cols_bf16": ds16.double().sum(1) - ds16.double().sum(0),
        "cols_only_bf16": -ds16.double().sum(0),
        "cols_only_fp32": -ds.double().sum(0),
        "cols_only_fp32_out": -ds16_out32.double().sum(0),
    }
    row = {}
    for name, dc in variants.items():
        err = suffix_sum(dc) - reference
        row[name] = dict(max_rel=round((err.abs().max() / reference.abs().max()).item(), 5),
                         rms_rel=round((err.pow(2).mean().sqrt() / reference.pow(2).mean().sqrt()).item(), 5))
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--rates", default="1e-4,1e-3,1e-2,1e-1,1", help="per-token log-decay rates, one head each")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    records = []
    for seed in range(args.seeds):
        g = torch.Generator().manual_seed(seed)
        for rate in (float(r) for r in args.rates.split(",")):
            rec = dict(seed=seed, rate=rate, L=args.length, D=args.head_dim,
                       **one_head(args.length, args.head_dim, rate, g))
            records.append(rec)
            print(json.dumps(rec), flush=True)
    worst = {name: max(r[name]["max_rel"] for r in records) for name in records[0] if isinstance(records[0][name], dict)}
    print("worst max_rel:", worst)
    if args.out:
        result = dict(device="cpu", machine=platform.machine(), torch=torch.__version__,
                      date=datetime.date.today().isoformat(), command=" ".join(["python"] + sys.argv),
                      records=records, worst_max_rel=worst)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
