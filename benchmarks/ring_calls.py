"""Kernel calls and host time of the context-parallel ring, kernels stubbed out.

Runs under torchrun on CPU (gloo).  The chunk kernels are replaced by
functions that only count their calls, so what remains is the ring's own
machinery: the plan, the gathers and index tables, the point-to-point
exchanges.  Reports, per fwd + bwd step, the kernel calls of the busiest
rank (the ring waits for it at every step) and the host time.  Small
shapes keep the torch work small next to the dispatch cost.

    python -m torch.distributed.run --nproc_per_node 4 benchmarks/ring_calls.py --gate 300 --out results.json

REPO=/path/to/checkout imports the ring from another checkout (to compare
two versions with the same script).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.environ.get("REPO", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")))

import fox_megatron.context_parallel.ring as ring_mod  # noqa: E402
from fox_megatron.context_parallel import RingStats, cp_forgetting_attention  # noqa: E402
from fox_megatron.kernels import AcpConfig  # noqa: E402

CALLS = [0]


def _forward_into(acc_o, acc_lse, q, k, v, c_q, c_k, query_rows, **kw):
    CALLS[0] += 1


def _backward_into(dq, dcq, do, q, k, v, c_q, c_k, lse, delta, query_rows, **kw):
    CALLS[0] += 1
    n, t, d = k.shape[0], k.shape[1], k.shape[-1]
    return torch.empty(n, t, 1, d), torch.empty(n, t, 1, d), torch.empty(n, 1, t)


def _row_delta(out, do, backend=None):
    return torch.empty(out.shape[0], out.shape[2], out.shape[1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=128, help="tokens per rank")
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--head-dim", type=int, default=16)
    ap.add_argument("--gate", type=float, default=300.0, help="scale of the paper-like log forget gates")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default=None, help="JSON file the record is appended to (rank 0)")
    args = ap.parse_args()
    ring_mod.attention_chunk_forward_into = _forward_into
    ring_mod.attention_chunk_backward_into = _backward_into
    ring_mod.attention_row_delta = _row_delta

    dist.init_process_group("gloo")
    P, r = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(r)
    H, D, T = args.heads, args.head_dim, args.tokens
    q, k, v = (torch.randn(1, T, H, D) for _ in range(3))
    q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True))
    k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True))
    rates = torch.exp(torch.linspace(math.log(1e-4), math.log(1.0), H))
    # benchmarks/attention.py's log_gates, written out: importing it would
    # import fox_megatron from this checkout, not from REPO
    log_f = -rates * torch.exp(0.5 * torch.randn(1, T, H)) * args.gate
    inputs = [t.requires_grad_() for t in (q, k, v, log_f)]
    acp, stats = AcpConfig(logit_bound=math.sqrt(D)), RingStats()

    def step():
        for t in inputs:
            t.grad = None
        o = cp_forgetting_attention(*inputs, group=dist.group.WORLD, mode="ring", acp=acp, stats=stats,
                                    backend="torch")
        o.backward(torch.ones_like(o))

    for _ in range(3):
        step()
    dist.barrier()
    CALLS[0] = 0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    dist.barrier()
    ms = (time.perf_counter() - t0) / args.steps * 1e3
    calls = torch.tensor([CALLS[0] / args.steps])
    dist.all_reduce(calls, op=dist.ReduceOp.MAX)
    if r == 0:
        rec = dict(bench="ring_calls", cp=P, tokens_per_rank=T, H=H, D=D, gate=args.gate,
                   calls_per_step_busiest_rank=float(calls), host_ms_per_step=round(ms, 2),
                   kept_pairs=stats.pairs_computed / max(stats.pairs_causal, 1), ring_steps=stats.steps,
                   repo=os.environ.get("REPO", "."))
        print(json.dumps(rec))
        if args.out:
            doc = {"records": []}
            if os.path.exists(args.out):
                with open(args.out) as f:
                    doc = json.load(f)
            doc.update(device="cpu", cpu=platform.processor() or platform.machine(), cores=os.cpu_count(),
                       torch=torch.__version__, date=datetime.date.today().isoformat())
            doc.setdefault("commands", [])
            cmd = f"REPO={rec['repo']} python -m torch.distributed.run --nproc_per_node {P} " + " ".join(sys.argv)
            doc["commands"].append(cmd)
            doc["records"].append(rec)
            with open(args.out, "w") as f:
                json.dump(doc, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
