"""torchrun worker: FoX GPT under tensor / pipeline parallelism on CPU (gloo).

    python -m torch.distributed.run --nproc_per_node 2 tests/dist/fox_parallel_worker.py \
        --mode tp --out result.pt [--ckpt-dir DIR]

Modes (each compares against the same model at TP=1/PP=1 run first in the
same job, with the same weights and batch):
  tp  TP=2: loss and every gradient; then a checkpoint written from the TP=2
      shards (whole tensors assembled from sharded_state_dict) is loaded at
      TP=1 and gives the same loss (the TP=1 -> TP=2 direction is the load
      that set the TP=2 model up).
  pp  PP=2, two stages run by hand: stage 0's output is sent to stage 1,
      the gradient of stage 1's input is sent back (Megatron's p2p and
      schedules need CUDA).
Rank 0 writes a dict of results with torch.save.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fox_dist_common import batch, full_tensors, init_parallel, load_full_tensors, small_config  # noqa: E402

VOCAB, SEQ, MBS = 128, 96, 2


def _config(**kw):
    from fox_megatron.model import FoxConfig, FoxTransformerConfig

    fox = FoxConfig(acp=True, forget_gate_bias_init=-1.0)
    return small_config(FoxTransformerConfig, fox=fox, num_layers=4, num_query_groups=2, **kw)


def _model(share: bool):
    from megatron.core import parallel_state as ps
    from fox_megatron.model import build_fox_gpt_model

    # the config carries the parallel sizes (layers per stage come from it)
    cfg = _config(
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        pipeline_dtype=torch.float32,
    )
    return build_fox_gpt_model(cfg, VOCAB, SEQ, share_embeddings_and_output_weights=share)


def _reference(share: bool, seed: int = 7):
    """TP=1, PP=1 (the two ranks are data-parallel replicas)."""
    init_parallel(1, 1)
    torch.manual_seed(seed)
    model = _model(share)
    weights = full_tensors(model)
    tokens, labels, pos = batch(VOCAB, SEQ, MBS, seed=3)
    loss = model(tokens, pos, None, labels=labels).mean()
    loss.backward()
    return weights, float(loss), full_tensors(model, grads=True)


def run_tp(out: str, ckpt_dir: str):
    from megatron.core import parallel_state as ps

    weights, ref_loss, ref_grads = _reference(share=True)
    ps.destroy_model_parallel()
    init_parallel(2, 1)
    torch.manual_seed(99)  # different init: everything must come from the load
    model = _model(share=True)
    load_full_tensors(model, weights)
    tokens, labels, pos = batch(VOCAB, SEQ, MBS, seed=3)
    loss = model(tokens, pos, None, labels=labels).mean()
    loss.backward()
    tp_loss = float(loss)
    tp_grads = full_tensors(model, grads=True)
    local_rows = model.decoder.layers[0].self_attention.linear_in.weight.shape[0]

    # save from TP=2 shards, load at TP=1
    saved = full_tensors(model)
    path = os.path.join(ckpt_dir, "tp2.pt")
    if torch.distributed.get_rank() == 0:
        torch.save(saved, path)
    torch.distributed.barrier()
    ps.destroy_model_parallel()
    init_parallel(1, 1)
    torch.manual_seed(5)
    model1 = _model(share=True)
    load_full_tensors(model1, torch.load(path))
    with torch.no_grad():
        reload_loss = float(model1(tokens, pos, None, labels=labels).mean())
    if torch.distributed.get_rank() == 0:
        torch.save(dict(ref_loss=ref_loss, tp_loss=tp_loss, reload_loss=reload_loss, ref_grads=ref_grads,
                        tp_grads=tp_grads, weights=weights, saved=saved, local_rows=local_rows), out)


def run_pp(out: str):
    from megatron.core import parallel_state as ps

    weights, ref_loss, ref_grads = _reference(share=False)
    ps.destroy_model_parallel()
    init_parallel(1, 2)
    stage = ps.get_pipeline_model_parallel_rank()
    torch.manual_seed(99)
    model = _model(share=False)
    assert len(model.decoder.layers) == 2
    load_full_tensors(model, weights)
    tokens, labels, pos = batch(VOCAB, SEQ, MBS, seed=3)
    hidden_shape = (SEQ, MBS, model.config.hidden_size)
    pp_loss = torch.zeros(())
    if stage == 0:
        model.set_input_tensor(None)
        hidden = model(tokens, pos, None)
        torch.distributed.send(hidden.detach().contiguous(), dst=1)
        grad = torch.empty(hidden_shape)
        torch.distributed.recv(grad, src=1)
        hidden.backward(grad)
    else:
        received = torch.empty(hidden_shape)
        torch.distributed.recv(received, src=0)
        received.requires_grad_(True)
        model.set_input_tensor(received)
        loss = model(None, pos, None, labels=labels).mean()
        loss.backward()
        torch.distributed.send(received.grad.contiguous(), dst=0)
        pp_loss = loss.detach()
    torch.distributed.all_reduce(pp_loss)  # only stage 1 contributes
    pp_grads = full_tensors(model, grads=True)
    if torch.distributed.get_rank() == 0:
        torch.save(dict(ref_loss=ref_loss, pp_loss=float(pp_loss), ref_grads=ref_grads, pp_grads=pp_grads), out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["tp", "pp"], required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ckpt-dir", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.mode == "tp":
        run_tp(a.out, a.ckpt_dir or os.path.dirname(a.out))
    else:
        run_pp(a.out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
