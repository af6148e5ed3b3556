"""Shared helpers for the FoX model tests, in-process and under torchrun.

Process groups are gloo on CPU; Megatron's parallel_state is initialised
with the requested TP/PP sizes.  ``full_tensors`` / ``load_full_tensors``
turn a model's ``sharded_state_dict`` into whole (unsharded) tensors and
back, which is what a resharding checkpoint does: the tests use them to
compare TP layouts and to save with one layout and load with another,
without dist_checkpointing's CUDA-bound save path.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import socket
import warnings
from typing import Dict, Optional

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
warnings.filterwarnings("ignore", message=".*Apex.*")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_parallel(tp: int = 1, pp: int = 1, seed: int = 1234, backend: str = "gloo"):
    """Process group (single process when not under torchrun) + Megatron groups.

    gloo by default (CPU tensors); "nccl" for the GPU-only tests."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        rank = int(os.environ.get("RANK", 0))
        world = int(os.environ.get("WORLD_SIZE", 1))
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.distributed.init_process_group(backend, rank=rank, world_size=world)
    if ps.model_parallel_is_initialized():
        if ps.get_tensor_model_parallel_world_size() == tp and ps.get_pipeline_model_parallel_world_size() == pp:
            return
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    if torch.cuda.is_available():
        model_parallel_cuda_manual_seed(seed)


def small_config(cls=None, **overrides):
    """A tiny GPT config that runs on CPU in fp32 (Megatron-LM-like choices)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    kw = dict(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        ffn_hidden_size=160,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        bias_dropout_fusion=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        init_method_std=0.05,
    )
    kw.update(overrides)
    return (cls or TransformerConfig)(**kw)


def batch(vocab: int, seq: int, batch_size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, seq + 1), generator=g)
    tokens, labels = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    pos = torch.arange(seq)[None].expand(batch_size, -1)
    return tokens, labels, pos


def _sharded_tensors(model):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    sd = model.sharded_state_dict()
    apply_factories(sd)
    return [t for t in nested_values(sd) if isinstance(t, ShardedTensor)]


def _local_shape(t):
    # layer-stacking axes (prepend_axis_num) are in the global shape, not the local one
    return (1,) * t.prepend_axis_num + tuple(t.local_shape)


@contextlib.contextmanager
def _params_hold_grads(model):
    """Temporarily put every parameter's gradient in its place, so the
    sharded state dict describes the gradients instead of the weights."""
    saved = []
    for p in model.parameters():
        saved.append(p.data)
        p.data = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p.data)
    try:
        yield
    finally:
        for p, d in zip(model.parameters(), saved):
            p.data = d


def full_tensors(model, grads: bool = False, group=None) -> Dict[str, torch.Tensor]:
    """{checkpoint key: whole tensor}, assembled from every rank's shards."""
    ctx = _params_hold_grads(model) if grads else contextlib.nullcontext()
    with ctx:
        pieces = [
            (t.key, tuple(t.global_shape), tuple(t.global_offset), _local_shape(t), t.data.detach().float().cpu().clone())
            for t in _sharded_tensors(model)
        ]
    world = torch.distributed.get_world_size(group) if torch.distributed.is_initialized() else 1
    gathered = [None] * world
    if world > 1:
        torch.distributed.all_gather_object(gathered, pieces, group=group)
    else:
        gathered = [pieces]
    full: Dict[str, torch.Tensor] = {}
    for rank_pieces in gathered:
        for key, gshape, goff, lshape, data in rank_pieces:
            out = full.setdefault(key, torch.full(gshape, float("nan")))
            index = tuple(slice(o, o + n) for o, n in zip(goff, lshape))
            piece = data.reshape(lshape)
            seen = out[index]
            written = ~torch.isnan(seen)
            # replicas (DP copies, TP-replicated tensors) must agree: a
            # gradient that should have been reduced across ranks shows here
            if written.any() and not torch.allclose(seen[written], piece[written], rtol=1e-5, atol=1e-7):
                raise AssertionError(f"replicas of {key} disagree at offset {goff}")
            out[index] = piece
    for key, t in full.items():
        if torch.isnan(t).any():
            raise AssertionError(f"{key}: shards do not cover the global tensor")
    return full


def load_full_tensors(model, full: Dict[str, torch.Tensor]):
    """Load whole tensors into a model of any TP/PP layout through its
    sharded state dict (factories split and re-merge fused tensors)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factories, apply_factory_merges
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, extract_matching_values

    sharded = model.sharded_state_dict()
    factories, _ = extract_matching_values(
        sharded, lambda x: isinstance(x, ShardedTensorFactory), return_lists_as_dicts=True
    )
    work = copy.copy(sharded)
    apply_factories(work)

    def fetch(x):
        if isinstance(x, ShardedTensor):
            src = full[x.key]
            index = tuple(slice(o, o + n) for o, n in zip(x.global_offset, _local_shape(x)))
            return src[index].reshape(x.data.shape).to(device=x.data.device, dtype=x.data.dtype).clone()
        if isinstance(x, ShardedObject):
            return None
        return x

    dict_list_map_inplace(fetch, work)
    merged = apply_factory_merges(work, factories)
    state = {k: v for k, v in merged.items() if not k.endswith("_extra_state")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"load_full_tensors: missing {missing}, unexpected {unexpected}")


def write_json(path: Optional[str], obj):
    if path:
        with open(path, "w") as f:
            json.dump(obj, f)
