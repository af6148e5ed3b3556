"""torchrun worker for the GPU-only FoX model tests (NCCL, 2 GPUs).

    python -m torch.distributed.run --nproc_per_node 2 tests/dist/fox_gpu_worker.py \
        --mode dcp|dcp_pp|pp|sp --out result.pt --ckpt-dir DIR

  dcp  Megatron's dist_checkpointing (torch_dist): save at TP=2, load at
       TP=1 (the two ranks then data-parallel), same loss.
  dcp_pp  dist_checkpointing across pipeline layouts: save at PP=1, load
       at PP=2 (each stage takes its layers), save that, load it at PP=1:
       the same weights and the same loss.
  pp   PP=2 through megatron-core's pipeline schedule (1F1B, 4 micro-
       batches) against the same schedule at PP=1, from the same weights:
       same loss and gradients.
  sp   TP=2 with sequence parallelism against TP=1: same loss and gradients
       (the sequence-parallel norm gradients all-reduced the way Megatron's
       finalize_model_grads does it).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fox_dist_common import batch, full_tensors, init_parallel, load_full_tensors, small_config  # noqa: E402

VOCAB, SEQ, MBS = 128, 128, 2


def _model(sequence_parallel=False, tied=True):
    from megatron.core import parallel_state as ps
    from fox_megatron.model import FoxConfig, FoxTransformerConfig, build_fox_gpt_model

    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    cfg = small_config(
        FoxTransformerConfig, fox=FoxConfig(forget_gate_bias_init=-1.0), num_layers=2, num_query_groups=2,
        use_cpu_initialization=False, tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel,
        pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32,
    )
    return build_fox_gpt_model(cfg, VOCAB, SEQ, share_embeddings_and_output_weights=tied)


def _loss(model, backward=False):
    tokens, labels, pos = (t.cuda() for t in batch(VOCAB, SEQ, MBS, seed=3))
    loss = model(tokens, pos, None, labels=labels).mean()
    if backward:
        loss.backward()
    return loss


def run_dcp(out, ckpt_dir):
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    init_parallel(2, 1, backend="nccl")
    torch.manual_seed(1)
    model = _model()
    with torch.no_grad():
        loss_tp2 = float(_loss(model))
    if torch.distributed.get_rank() == 0:
        os.makedirs(ckpt_dir, exist_ok=True)  # dist_checkpointing.save wants an existing, empty folder
    torch.distributed.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)
    torch.distributed.barrier()
    ps.destroy_model_parallel()
    init_parallel(1, 1, backend="nccl")
    torch.manual_seed(2)
    model1 = _model()
    state = dist_checkpointing.load(model1.sharded_state_dict(), ckpt_dir)
    model1.load_state_dict(state, strict=False)
    with torch.no_grad():
        loss_tp1 = float(_loss(model1))
    if torch.distributed.get_rank() == 0:
        torch.save(dict(loss_tp2=loss_tp2, loss_tp1=loss_tp1), out)


def _save(model, ckpt_dir):
    from megatron.core import dist_checkpointing

    if torch.distributed.get_rank() == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)
    torch.distributed.barrier()


def _load(model, ckpt_dir):
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir)
    model.load_state_dict(state, strict=False)


def run_dcp_pp(out, ckpt_dir):
    from megatron.core import parallel_state as ps

    init_parallel(1, 1, backend="nccl")
    torch.manual_seed(1)
    ref = _model(tied=False)
    ref_weights = full_tensors(ref, group=ps.get_pipeline_model_parallel_group())  # one rank's copy
    with torch.no_grad():
        ref_loss = float(_loss(ref))
    _save(ref, os.path.join(ckpt_dir, "pp1"))
    ps.destroy_model_parallel()

    init_parallel(1, 2, backend="nccl")
    torch.manual_seed(2)
    staged = _model(tied=False)
    stage_keys = sorted(t for t in staged.state_dict() if "decoder.layers" in t)
    _load(staged, os.path.join(ckpt_dir, "pp1"))
    pp_weights = full_tensors(staged)  # both stages' pieces
    _save(staged, os.path.join(ckpt_dir, "pp2"))
    ps.destroy_model_parallel()

    init_parallel(1, 1, backend="nccl")
    torch.manual_seed(3)
    back = _model(tied=False)
    _load(back, os.path.join(ckpt_dir, "pp2"))
    with torch.no_grad():
        back_loss = float(_loss(back))
    if torch.distributed.get_rank() == 0:
        torch.save(dict(ref_loss=ref_loss, back_loss=back_loss, ref_weights=ref_weights,
                        pp_weights=pp_weights, stage_keys=stage_keys), out)


def _schedule_loss(model, n_micro=4):
    """Mean loss of ``n_micro`` micro-batches through get_forward_backward_func
    (gradients accumulate in .grad); every pipeline rank returns it."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    micro = [batch(VOCAB, SEQ, MBS, seed=10 + i) for i in range(n_micro)]

    def forward_step(data_iterator, m):
        tokens, labels, pos = (t.cuda() for t in next(data_iterator))
        out = m(tokens, pos, None, labels=labels)

        def loss_func(per_token):
            loss = per_token.float().mean()
            return loss, {"loss": loss.detach()}

        return out, loss_func

    reports = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(micro), model=[model], num_microbatches=n_micro,
        seq_length=SEQ, micro_batch_size=MBS, forward_only=False,
    )
    loss = torch.zeros((), device="cuda")
    if reports:  # last stage only
        loss = torch.stack([r["loss"] for r in reports]).mean()
    torch.distributed.all_reduce(loss, group=ps.get_pipeline_model_parallel_group())
    return float(loss)


def run_pp(out):
    from megatron.core import parallel_state as ps

    init_parallel(1, 1, backend="nccl")
    torch.manual_seed(1)
    ref = _model(tied=False)
    group = ps.get_pipeline_model_parallel_group()  # this rank alone: a whole model
    weights = full_tensors(ref, group=group)
    ref_loss = _schedule_loss(ref)
    ref_grads = full_tensors(ref, grads=True, group=group)
    ps.destroy_model_parallel()
    init_parallel(1, 2, backend="nccl")
    torch.manual_seed(2)
    staged = _model(tied=False)
    layers = len(staged.decoder.layers)
    load_full_tensors(staged, weights)
    pp_loss = _schedule_loss(staged)
    pp_grads = full_tensors(staged, grads=True)
    if torch.distributed.get_rank() == 0:
        torch.save(dict(ref_loss=ref_loss, pp_loss=pp_loss, ref_grads=ref_grads, pp_grads=pp_grads,
                        stage_layers=layers), out)


def run_sp(out):
    from megatron.core import parallel_state as ps
    from megatron.core.distributed.finalize_model_grads import _allreduce_non_tensor_model_parallel_grads

    init_parallel(1, 1, backend="nccl")
    torch.manual_seed(1)
    ref = _model()
    weights = full_tensors(ref)
    ref_loss = float(_loss(ref, backward=True))
    ref_grads = full_tensors(ref, grads=True)
    ps.destroy_model_parallel()
    init_parallel(2, 1, backend="nccl")
    model = _model(sequence_parallel=True)
    load_full_tensors(model, weights)
    sp_loss = float(_loss(model, backward=True))
    for p in model.parameters():  # what Megatron's DDP wrapper provides
        p.main_grad = p.grad
    model.ddp_config = type("C", (), {"use_megatron_fsdp": False})()
    _allreduce_non_tensor_model_parallel_grads([model], model.config, ps.get_tensor_model_parallel_group())
    sp_grads = full_tensors(model, grads=True)
    if torch.distributed.get_rank() == 0:
        torch.save(dict(ref_loss=ref_loss, sp_loss=sp_loss, ref_grads=ref_grads, sp_grads=sp_grads), out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["dcp", "dcp_pp", "pp", "sp"], required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ckpt-dir", default=None)
    a = ap.parse_args()
    if a.mode == "dcp":
        run_dcp(a.out, a.ckpt_dir)
    elif a.mode == "dcp_pp":
        run_dcp_pp(a.out, a.ckpt_dir)
    elif a.mode == "pp":
        run_pp(a.out)
    else:
        run_sp(a.out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
