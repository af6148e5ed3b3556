"""Context-parallel attention vs single-device attention, under torchrun.

Every rank builds the same global batch, computes whole-sequence attention
(the CP = 1 answer) and the context-parallel one on its zigzag slice, and
compares outputs and gradients (q, k, v, log forget gates) on its slice.
Rank 0 writes a JSON report: {case: max relative error} plus byte counts.

    python -m torch.distributed.run --nproc_per_node P tests/dist/cp_attention_worker.py OUT.json [--gpu]

--gpu: NCCL, one GPU per rank, bf16 through the Triton kernels, longer
sequences; the CP = 1 answer is the same kernel on the whole sequence.
"""

import json
import os
import sys
import warnings

warnings.filterwarnings("ignore")

import torch
import torch.distributed as dist

from fox_megatron.context_parallel import (
    RingStats, cp_acp_threshold, cp_forgetting_attention, deepspeed_available, shift_tokens_cp, zigzag_slice,
)
from fox_megatron.context_parallel.documents import RingDocuments
from fox_megatron.kernels import AcpConfig, forgetting_attention
from fox_megatron.model.attention import document_start_mask, shift_tokens


def rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12))


DEVICE, DTYPE, BACKEND = "cpu", torch.float32, "torch"


def make(B, T, Hq, Hkv, D, gate_scale, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hq, D, generator=g)
    k = torch.randn(B, T, Hkv, D, generator=g)
    v = torch.randn(B, T, Hkv, D, generator=g)
    # log f in [-gate_scale, 0): large scale = fast forgetting (local gates)
    logf = -gate_scale * torch.rand(B, T, Hq, generator=g)
    do = torch.randn(B, T, Hq, D, generator=g)
    return [t.to(DEVICE, DTYPE if t is not logf else torch.float32) for t in (q, k, v, logf, do)]


def case(group, mode, acp, B=2, T=None, Hq=4, Hkv=2, D=16, gate_scale=1.0, seed=0, skip="acp", stats=None,
         two_way=True, sub_blocks=None, packed=False, use_deepspeed=None, acp_cfg=None, merge_pairs=True,
         precise_decay=False, first_gate=None):
    P, r = dist.get_world_size(group), dist.get_rank(group)
    T = T or 48 * P  # 2P chunks of 24 tokens
    if DEVICE != "cpu":
        T, D = T * 32, 64
    q, k, v, logf, do = make(B, T, Hq, Hkv, D, gate_scale, seed)
    if first_gate is not None:
        # enters no decay (D_ij sums gates j+1..i) but sets |c| everywhere
        logf[:, 0] = first_gate
    if acp_cfg is None:
        acp_cfg = AcpConfig(log_eps=-8.0) if acp else None
    cu = None
    if packed == "short":
        # documents of 3 to 17 tokens (shorter than a chunk), an empty one
        lengths = torch.randint(3, 18, (B * T,), generator=torch.Generator().manual_seed(seed))
        starts = torch.cumsum(lengths, 0) - lengths
        cu = torch.cat([starts[starts < B * T], torch.arange(0, B * T + 1, T), torch.tensor([11])])
        cu = torch.sort(torch.unique(cu)).values
        cu = torch.cat([cu[:3], cu[2:3], cu[3:]]).to(DEVICE).int()  # cu[2] twice: an empty document
    elif packed:
        # documents over the global rows; some cross chunk and rank borders
        cu = torch.tensor([0, 7, 30, T, T + 50, T + 51, 2 * T if B == 2 else B * T], device=DEVICE)
        cu = torch.unique(torch.cat([cu, torch.arange(0, B * T + 1, T, device=DEVICE)])).int()
    ref_in = [t.clone().requires_grad_() for t in (q, k, v, logf)]
    o_ref, ref_stats = forgetting_attention(*ref_in, acp=acp_cfg, backend=BACKEND, cu_seqlens=cu, return_stats=True,
                                            precise_decay=precise_decay)
    o_ref.backward(do)
    sl = lambda t: zigzag_slice(t, 1, r, P)  # noqa: E731
    cp_in = [sl(t).clone().requires_grad_() for t in (q, k, v, logf)]
    o = cp_forgetting_attention(*cp_in, group=group, mode=mode, acp=acp_cfg, backend=BACKEND, skip=skip, stats=stats,
                              two_way=two_way, sub_blocks=sub_blocks, cu_seqlens=cu,
                              use_deepspeed=use_deepspeed, merge_pairs=merge_pairs, precise_decay=precise_decay)
    o.backward(sl(do))
    errs = [rel(o, sl(o_ref))] + [rel(a.grad, sl(b.grad)) for a, b in zip(cp_in, ref_in)]
    names = ["out", "dq", "dk", "dv", "dlogf"]
    if acp_cfg is not None and mode == "ring":
        # the ACP thresholds (per row, or per document when packed) are the single-device ones, bit for bit
        docs = RingDocuments(cu, B, T, P, 1) if cu is not None else None
        thr = cp_acp_threshold(acp_cfg, sl(q), sl(k), 1.0 / D ** 0.5, group, T, docs)
        if DEVICE == "cpu":
            errs.append(float((thr != ref_stats.threshold).sum()))
        else:
            # GPU reductions of the norms may round in another order than the
            # whole-sequence ones: equal to float32 rounding, not bit for bit
            ref = ref_stats.threshold
            errs.append(float(((thr - ref).abs() > 1e-5 * ref.abs().clamp_min(1.0)).sum()))
        names.append("threshold_mismatches")
    e = torch.tensor(errs, dtype=torch.float64, device=DEVICE)
    dist.all_reduce(e, op=dist.ReduceOp.MAX)
    return dict(zip(names, e.tolist()))


def sum_bytes(stats):
    t = torch.tensor([stats.fwd_kv_bytes, stats.bwd_kv_bytes, stats.bwd_grad_bytes, stats.full_ring_kv_bytes],
                     dtype=torch.float64, device=DEVICE)
    dist.all_reduce(t)
    calls = torch.tensor([stats.calls], dtype=torch.float64, device=DEVICE)
    dist.all_reduce(calls, op=dist.ReduceOp.MAX)
    return {"fwd_kv": int(t[0]), "bwd_kv": int(t[1]), "bwd_grad": int(t[2]), "full_ring_kv": int(t[3]),
            "calls": int(calls),
            "steps": stats.steps, "kept_keys": stats.kept_keys, "hidden_sub_blocks": stats.hidden_sub_blocks, "pairs_computed": stats.pairs_computed, "pairs_causal": stats.pairs_causal}


def shift_case(group, packed=False):
    P, r = dist.get_world_size(group), dist.get_rank(group)
    g = torch.Generator().manual_seed(5)
    T, B, H, D = 32 * P, 2, 2, 8
    x, a, dy = (t.to(DEVICE) for t in (torch.randn(T, B, H, D, generator=g), torch.rand(T, B, H, generator=g),
                                        torch.randn(T, B, H, D, generator=g)))
    xr = x.clone().requires_grad_()
    cu = torch.tensor([0, 5, 16, 17, T, T + 33, 2 * T], device=DEVICE) if packed else None
    starts = document_start_mask(cu, T, B, x.device)
    y = shift_tokens(xr, a, starts)
    y.backward(dy)
    xl = zigzag_slice(x, 0, r, P).clone().requires_grad_()
    yl = shift_tokens_cp(xl, zigzag_slice(a, 0, r, P), group, zigzag_slice(starts, 0, r, P) if packed else None)
    yl.backward(zigzag_slice(dy, 0, r, P))
    e = torch.tensor([rel(yl, zigzag_slice(y, 0, r, P)), rel(xl.grad, zigzag_slice(xr.grad, 0, r, P))],
                     dtype=torch.float64, device=DEVICE)
    dist.all_reduce(e, op=dist.ReduceOp.MAX)
    return {"out": e[0].item(), "dx": e[1].item()}


def main():
    global DEVICE, DTYPE, BACKEND
    out_path = sys.argv[1]
    if "--gpu" in sys.argv:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        DEVICE, DTYPE, BACKEND = f"cuda:{local}", torch.bfloat16, "auto"
        dist.init_process_group("nccl")
    else:
        # CP_TEST_BACKEND=triton: the GPU kernels through Triton's interpreter (slow; fp32)
        BACKEND = os.environ.get("CP_TEST_BACKEND", BACKEND)
        dist.init_process_group("gloo")
    group = dist.group.WORLD
    P = dist.get_world_size()
    report = {"cp": P, "device": str(DEVICE), "dtype": str(DTYPE), "cases": {}, "bytes": {}}
    Hkv_u = 2 if P <= 2 else P  # Ulysses: KV heads must divide by P
    for mode in ("ring", "ulysses"):
        for acp in (False, True):
            kw = dict(Hq=4, Hkv=2) if mode == "ring" else dict(Hq=2 * Hkv_u, Hkv=Hkv_u)
            report["cases"][f"{mode}_acp{int(acp)}"] = case(group, mode, acp, **kw)
    # fast forgetting: ACP prunes whole chunk pairs; a dense ring for comparison
    for name, gate_scale in (("local", 8.0), ("flat", 1e-4)):
        for skip in ("acp", "dense"):
            st = RingStats()
            errs = case(group, "ring", True, T=32 * P, gate_scale=gate_scale, skip=skip, stats=st, seed=3)
            report["cases"][f"ring_{name}_{skip}"] = errs
            report["bytes"][f"{name}_{skip}"] = sum_bytes(st)
    # heads that forget at different rates: rows of one chunk pair keep
    # different key suffixes (one merged kernel call, or one per suffix)
    for name, merge in (("mixed_acp", True), ("mixed_acp_split", False)):
        st = RingStats()
        report["cases"][f"ring_{name}"] = case(group, "ring", True, T=32 * P, stats=st, seed=3, merge_pairs=merge,
                                               gate_scale=torch.tensor([0.25, 2.0, 8.0, 32.0]))
        report["bytes"][name] = sum_bytes(st)
    # whole chunks as units (no sub-blocks)
    st = RingStats()
    report["cases"]["ring_local_acp_whole"] = case(group, "ring", True, T=32 * P, gate_scale=8.0, stats=st, seed=3,
                                                   sub_blocks=1)
    report["bytes"]["local_acp_whole"] = sum_bytes(st)
    # a single-direction ring (second chunks forward too)
    for skip in ("acp", "dense"):
        st = RingStats()
        report["cases"][f"ring_oneway_{skip}"] = case(group, "ring", True, T=32 * P, gate_scale=8.0, skip=skip,
                                                      stats=st, seed=3, two_way=False)
        report["bytes"][f"oneway_{skip}"] = sum_bytes(st)
    # packed documents (Ulysses)
    for acp in (False, True):
        report["cases"][f"ulysses_packed_acp{int(acp)}"] = case(group, "ulysses", acp, Hq=2 * Hkv_u, Hkv=Hkv_u,
                                                                 gate_scale=0.3, packed=True)
    # packed documents (ring): documents crossing chunk and rank borders.
    # Through the interpreted Triton kernels only the cases that reach
    # different kernel paths (the others differ in the ring's plan only)
    every = BACKEND != "triton" or DEVICE != "cpu"
    for acp in (False, True) if every else (True,):
        report["cases"][f"ring_packed_acp{int(acp)}"] = case(group, "ring", acp, packed=True)
    # ... with fast forgetting (ACP and the document mask both drop sub-blocks;
    # short documents: fp32 decays as small as the single-device ones)
    report["cases"]["ring_packed_local_acp"] = case(group, "ring", True, T=32 * P, gate_scale=8.0, seed=3,
                                                    packed="short")
    # a tight threshold (large eps, given logit bound): per-document N decides what is pruned
    report["cases"]["ring_packed_tight"] = case(group, "ring", True, gate_scale=0.3, packed=True,
                                                acp_cfg=AcpConfig(log_eps=-2.0, logit_bound=1.0))
    if every:
        # whole chunks as units, the one-way ring
        report["cases"]["ring_packed_whole"] = case(group, "ring", True, packed=True, sub_blocks=1)
        report["cases"]["ring_packed_oneway"] = case(group, "ring", True, packed=True, two_way=False)
        # short documents, slow gates (ACP prunes nothing): only the documents
        # spare work and bytes; compare with the same data unpacked (flat_*)
        for skip in ("acp", "dense"):
            st = RingStats()
            report["cases"][f"ring_short_{skip}"] = case(group, "ring", True, T=32 * P, gate_scale=1e-4,
                                                         skip=skip, stats=st, seed=3, packed="short")
            report["bytes"][f"short_{skip}"] = sum_bytes(st)
    # precise (float64) decays, with |c| ~ 1e4 from the first token on
    for mode in ("ring", "ulysses"):
        kw = dict(Hq=4, Hkv=2) if mode == "ring" else dict(Hq=2 * Hkv_u, Hkv=Hkv_u)
        report["cases"][f"{mode}_precise_acp1"] = case(group, mode, True, precise_decay=True, first_gate=-1e4, **kw)
    # Ulysses through the local all-to-all (the path without DeepSpeed)
    report["cases"]["ulysses_torch_acp1"] = case(group, "ulysses", True, Hq=2 * Hkv_u, Hkv=Hkv_u, use_deepspeed=False)
    # more KV heads than ranks: ACP deals the heads to balance the work (a permutation)
    for ds in (None, False):
        report["cases"][f"ulysses_balanced_ds{int(ds is None)}"] = case(
            group, "ulysses", True, Hq=4 * Hkv_u, Hkv=2 * Hkv_u, gate_scale=2.0, use_deepspeed=ds)
    report["deepspeed"] = deepspeed_available()
    report["shift"] = shift_case(group)
    report["shift_packed"] = shift_case(group, packed=True)
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(report, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # The report is written and the process group is gone.  Leave without
    # running C++ static destructors: DeepSpeed's communication backend can
    # abort at interpreter exit ("terminate called without an active
    # exception"), which would turn a finished, correct run into a failure.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
