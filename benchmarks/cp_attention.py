"""Context-parallel FoX attention benchmark (forward + backward, one node).

Dense ring vs ACP ring vs Ulysses (ACP on and off) at L = 64k and 128k with
the "paper-like" gates of BENCH.md (head h: per-token log-decay
-r_h * exp(0.5 z), r_h log-uniform over [1e-4, 1]; q and k RMS-normalised,
U = sqrt(D), delta = -2U - log L - 10), bf16 q/k/v, one sequence (B = 1).

    python -m torch.distributed.run --nproc_per_node 4 benchmarks/cp_attention.py
    python benchmarks/cp_attention.py            # CP = 1 reference (if it fits)

Each run adds its records to benchmarks/results/cp_attention_<gpu>.json
(replacing records with the same key).  kv_bytes: bytes all ranks sent for
attention in one fwd+bwd step (ring: KV + key decays both passes plus the
returned dK/dV; Ulysses: the all-to-all volume, counted from the shapes).
Times are the median over timed steps, each fenced by a barrier so every
rank runs the same number of collectives (triton's do_bench picks its own
repetition count per rank, which a collective cannot survive).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.attention import log_gates  # noqa: E402
from fox_megatron.context_parallel import RingStats, cp_forgetting_attention  # noqa: E402
from fox_megatron.kernels import AcpConfig, forgetting_attention  # noqa: E402


def local_inputs(T, H, D, seed, device):
    """This rank's T tokens (zigzag slices of an i.i.d. sequence are i.i.d.)."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(1, T, H, D, device=device, generator=g)
    k = torch.randn(1, T, H, D, device=device, generator=g)
    v = torch.randn(1, T, H, D, device=device, generator=g)
    q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True))
    k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True))
    r = torch.exp(torch.linspace(math.log(1e-4), math.log(1.0), H, device=device))
    log_f = log_gates(r, torch.randn(1, T, H, device=device, generator=g))
    q, k, v = (t.to(torch.bfloat16).requires_grad_() for t in (q, k, v))
    return q, k, v, log_f.float().requires_grad_()


def timed(fn, inputs, steps, warmup, group):
    dout = None
    times = []
    for i in range(warmup + steps):
        for t in inputs:
            t.grad = None
        if group is not None:
            dist.barrier(group)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        if dout is None:
            dout = torch.randn_like(out)
        out.backward(dout)
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    ms = torch.tensor([statistics.median(times)], device="cuda")
    if group is not None:
        dist.all_reduce(ms, op=dist.ReduceOp.MAX, group=group)  # the step ends when the slowest rank ends
    return float(ms)


def profile_step(fn, inputs, group, rank, path):
    """One fwd+bwd step under torch.profiler; rank 0 writes the operator table."""
    from torch.profiler import ProfilerActivity, profile

    for t in inputs:
        t.grad = None
    if group is not None:
        dist.barrier(group)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        out = fn()
        out.backward(torch.ones_like(out))
        torch.cuda.synchronize()
    if rank == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        ka = prof.key_averages()
        with open(path, "w") as f:
            f.write(ka.table(sort_by="cuda_time_total", row_limit=40) + "\n")
            f.write(ka.table(sort_by="cpu_time_total", row_limit=40) + "\n")


def host_profile_steps(fn, inputs, steps, group, rank, path):
    """``steps`` fwd+bwd steps under cProfile (Python time on the host, per
    function); rank 0 writes the functions by own time and by cumulative
    time.  Shows where a step bound by the host spends it."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    for _ in range(steps):
        for t in inputs:
            t.grad = None
        if group is not None:
            dist.barrier(group)
        torch.cuda.synchronize()
        prof.enable()
        out = fn()
        out.backward(torch.ones_like(out))
        prof.disable()
        torch.cuda.synchronize()
    if rank == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        buf = io.StringIO()
        st = pstats.Stats(prof, stream=buf)
        buf.write(f"{steps} fwd+bwd steps\n")
        st.sort_stats("tottime").print_stats(35)
        st.sort_stats("cumulative").print_stats(35)
        with open(path, "w") as f:
            f.write(buf.getvalue())


def ulysses_bytes(P, T_local, H, D, elem=2):
    """All-to-all bytes of one fwd+bwd step, all ranks: q, k, v, gate (fp32)
    and output out; their gradients back.  Each rank keeps 1/P of a tensor."""
    per_rank = T_local * H * ((3 + 1) * D * elem + 4)  # q k v o + gate
    return int(2 * P * per_rank * (P - 1) / P)  # forward + backward


def gpu_tag(name):
    for tag in ("h200", "h100", "a100", "b200"):
        if tag in name.lower():
            return tag
    return name.lower().replace(" ", "_")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="65536,131072")
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--sub-blocks", type=int, default=None, help="ring: parts per chunk sent and pruned separately")
    ap.add_argument("--out", default=None, help="default benchmarks/results/cp_attention_<gpu>.json")
    ap.add_argument("--variants", default=None,
                    help="comma list of mode:acp:skip to run (e.g. ring:1:acp,ulysses:1:-); default all")
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="after timing, profile one step of each variant with torch.profiler; rank 0 writes "
                         "the operator table (CUDA and CPU time) to DIR")
    ap.add_argument("--host-profile", default=None, metavar="DIR",
                    help="after timing, run a few steps of each variant under cProfile; rank 0 writes the "
                         "Python functions by host time to DIR")
    args = ap.parse_args()

    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if distributed:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl")
        group, P, rank = dist.group.WORLD, dist.get_world_size(), dist.get_rank()
    else:
        group, P, rank = None, 1, 0
    H, D = args.heads, args.head_dim
    acp_cfg = AcpConfig(log_eps=-10.0, logit_bound=math.sqrt(D))  # QK-norm, unit weights
    records = []
    for L in (int(x) for x in args.lengths.split(",")):
        T = L // P
        q, k, v, log_f = local_inputs(T, H, D, seed=1000 + rank, device="cuda")
        inputs = (q, k, v, log_f)
        if P == 1:
            variants = [("single", False, None), ("single", True, None)]
        else:
            variants = [("ring", False, "dense"), ("ring", True, "dense"), ("ring", True, "acp"),
                        ("ring", True, "acp_split"), ("ring_oneway", True, "acp"),
                        ("ulysses", False, None), ("ulysses", True, None)]
        if args.variants:
            want = {tuple(v.split(":")) for v in args.variants.split(",")}
            variants = [x for x in variants if (x[0], str(int(x[1])), x[2] or "-") in want]
        for mode, acp, skip in variants:
            stats = RingStats() if mode.startswith("ring") else None
            acp_arg = acp_cfg if acp else None
            if mode == "single":
                fn = lambda: forgetting_attention(q, k, v, log_f, acp=acp_arg)  # noqa: E731
            else:
                fn = lambda: cp_forgetting_attention(  # noqa: E731
                    q, k, v, log_f, group=group, mode="ulysses" if mode == "ulysses" else "ring",
                    acp=acp_arg, skip="dense" if skip == "dense" else "acp", stats=stats,
                    two_way=mode != "ring_oneway", sub_blocks=args.sub_blocks, merge_pairs=skip != "acp_split")
            try:
                ms = timed(fn, inputs, args.steps, args.warmup, group)
            except torch.OutOfMemoryError:
                ms = None
                torch.cuda.empty_cache()
            rec = {"bench": "cp_attention", "mode": "ring" if mode.startswith("ring") else mode, "acp": acp,
                   "cp": P, "L": L, "H": H, "D": D, "ms": ms}
            if mode.startswith("ring"):
                t = torch.tensor([stats.fwd_kv_bytes, stats.bwd_kv_bytes, stats.bwd_grad_bytes,
                                  stats.full_ring_kv_bytes], dtype=torch.float64, device="cuda")
                dist.all_reduce(t, group=group)
                calls = torch.tensor([stats.calls], dtype=torch.float64, device="cuda")
                dist.all_reduce(calls, op=dist.ReduceOp.MAX, group=group)
                rec["kernel_calls_per_pass_max_rank"] = int(calls)
                rec.update(kv_bytes=int(t[0] + t[1] + t[2]), fwd_kv_bytes=int(t[0]), bwd_kv_bytes=int(t[1]),
                           bwd_grad_bytes=int(t[2]), full_ring_kv_bytes_per_pass=int(t[3]), skip=skip,
                           two_way=mode != "ring_oneway", ring_steps=stats.steps,
                           kept_pairs=stats.pairs_computed / max(stats.pairs_causal, 1),
                           kept_keys=stats.kept_keys, sub_blocks=args.sub_blocks or 4)
            elif mode == "ulysses":
                rec["kv_bytes"] = ulysses_bytes(P, T, H, D)
            else:
                rec["kv_bytes"] = 0
            records.append(rec)
            if rank == 0:
                print(json.dumps(rec), flush=True)
            if args.profile and ms is not None:
                profile_step(fn, inputs, group, rank, os.path.join(
                    args.profile, f"profile_{mode}_acp{int(acp)}_{skip or '-'}_cp{P}_L{L}.txt"))
            if args.host_profile and ms is not None:
                host_profile_steps(fn, inputs, 3, group, rank, os.path.join(
                    args.host_profile, f"host_{mode}_acp{int(acp)}_{skip or '-'}_cp{P}_L{L}.txt"))
        del q, k, v, log_f, inputs
        torch.cuda.empty_cache()

    if rank == 0:
        import triton

        name = torch.cuda.get_device_name()
        out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                       f"cp_attention_{gpu_tag(name)}.json")
        doc = {"records": []}
        if os.path.exists(out):
            with open(out) as f:
                doc = json.load(f)
        key = lambda r: (r["mode"], r["acp"], r["cp"], r["L"], r.get("skip"), r.get("two_way"))  # noqa: E731
        new = {key(r) for r in records}
        doc["records"] = [r for r in doc.get("records", []) if key(r) not in new] + records
        # one file gathers runs at several CP sizes: keep every command
        cmd = ("python -m torch.distributed.run --nproc_per_node %d " % P if distributed else "python ") + \
            " ".join(sys.argv)
        commands = doc.get("commands", [])
        commands = [c for c in commands if c != cmd] + [cmd]
        doc.pop("command", None)
        doc.update(gpu=name, gpus=max(P, doc.get("gpus", 0)), torch=torch.__version__, triton=triton.__version__,
                   date=datetime.date.today().isoformat(), commands=commands)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as f:
            json.dump(doc, f, indent=1)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
