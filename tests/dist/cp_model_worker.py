"""FoX GPT loss and gradients with context parallelism vs CP = 1 (gloo).

    python -m torch.distributed.run --nproc_per_node P tests/dist/cp_model_worker.py OUT.json

The same weights and global batch run first at CP = 1 (every rank alone),
then at CP = P with Megatron's zigzag slices of tokens and labels
(get_batch_on_this_cp_rank's layout).  Parameters are replicated over the CP
group, so each rank's gradient is a partial sum: all-reduced over the group
it must equal the CP = 1 gradient.  Packed documents (both modes): the same
cu_seqlens over the global rows at CP = 1 and CP = P.  Rank 0 writes
{case: errors}.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fox_dist_common import batch, init_parallel, small_config  # noqa: E402

VOCAB, SEQ, MBS = 128, 64, 2


def _model(cp: int, **fox_kw):
    from fox_megatron.model import FoxConfig, FoxTransformerConfig, build_fox_gpt_model

    # a strongly forgetting gate bias so that ACP prunes whole chunk pairs
    fox = FoxConfig(forget_gate_bias_init=-3.0, **fox_kw)
    cfg = small_config(FoxTransformerConfig, fox=fox, num_layers=2, num_query_groups=2, context_parallel_size=cp)
    return build_fox_gpt_model(cfg, VOCAB, SEQ)


def _set_groups(cp: int):
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(context_parallel_size=cp)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def main():
    from fox_megatron.context_parallel import zigzag_slice

    out_path = sys.argv[1]
    init_parallel(1, 1)
    P = dist.get_world_size()
    r = dist.get_rank()
    tokens, labels, pos = batch(VOCAB, SEQ, MBS, seed=3)
    report = {"cp": P, "cases": {}}
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = torch.tensor([0, 9, 40, SEQ, SEQ + 17, 2 * SEQ], dtype=torch.int32)  # over the global rows
    packed = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=47, max_seqlen_kv=47)
    for acp, pk in ((False, None), (True, None), (True, packed)):
        _set_groups(1)
        torch.manual_seed(11)
        ref = _model(1, acp=acp)
        state = {k: v.clone() for k, v in ref.state_dict().items() if v is not None and torch.is_tensor(v)}
        ref_loss = ref(tokens, pos, None, labels=labels, packed_seq_params=pk).sum()
        ref_loss.backward()
        ref_grads = _grads(ref)
        for mode in ("ring", "ulysses"):
            _set_groups(P)
            model = _model(P, acp=acp, cp_mode=mode)
            model.load_state_dict(state, strict=False)
            sl = lambda t: zigzag_slice(t, 1, r, P)  # noqa: E731
            loss = model(sl(tokens), sl(pos), None, labels=sl(labels), packed_seq_params=pk).sum()
            loss.backward()
            total = loss.detach().clone()
            dist.all_reduce(total)
            errs = {"loss": abs(float(total) - float(ref_loss)) / abs(float(ref_loss))}
            worst = 0.0
            for n, g in _grads(model).items():
                dist.all_reduce(g)
                e = float((g - ref_grads[n]).abs().max() / ref_grads[n].abs().max().clamp_min(1e-12))
                worst = max(worst, e)
            errs["grad"] = worst
            errs["n_grads"] = len(ref_grads)
            kept = model.decoder.layers[0].self_attention.acp_kept_fraction
            errs["kept"] = None if kept is None else float(kept)
            report["cases"][f"{mode}_acp{int(acp)}" + ("_packed" if pk is not None else "")] = errs
    if r == 0:
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
