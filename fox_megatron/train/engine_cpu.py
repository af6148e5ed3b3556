"""CPU execution path: the demo and CI (gloo, fp32, no megatron-core DDP).

megatron-core's DistributedDataParallel, distributed optimizer, pipeline
schedules and dist_checkpointing allocate on CUDA, so on a CPU-only machine
the same step is written with torch parts, behind the interface the GPU
engine has:

- data parallel: gradients of all micro-batches accumulate locally, then one
  flat all-reduce (sum) over the data(+context)-parallel group and a single
  division by the global token count -- numerically the per-token loss the
  GPU path computes, and deterministic, which the resume test relies on;
- torch.optim.AdamW with Megatron's parameter groups (no weight decay on
  biases and 1-D parameters);
- gradient clipping by the global L2 norm, tensor-parallel shards summed
  across TP and replicated parameters counted once;
- checkpoints: one torch file per model-parallel rank (written by the first
  data-parallel replica), same state as the GPU path.
"""

from __future__ import annotations

import math
import os
from typing import List

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .loss import masked_loss_sum, model_forward
from .schedule import apply_lr


def megatron_param_groups(model):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim == 1 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "wd_mult": 1.0, "lr_mult": 1.0}]
    if no_decay:
        groups.append({"params": no_decay, "wd_mult": 0.0, "lr_mult": 1.0})
    return groups


class CpuEngine:
    format = "torch"

    def __init__(self, cfg, info, model, config):
        from megatron.core import parallel_state

        self.cfg, self.info, self.model, self.config = cfg, info, model, config
        self.optimizer = torch.optim.AdamW(
            megatron_param_groups(model),
            lr=cfg.lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
        )
        self.grad_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        self.grad_group_size = dist.get_world_size(self.grad_group) if dist.is_initialized() else 1
        self.mp_group = parallel_state.get_model_parallel_group()
        self._params = [p for g in self.optimizer.param_groups for p in g["params"]]

    # --- one optimizer step over a global batch ---------------------------
    def train_step(self, micro_batches: List, lr: float) -> dict:
        apply_lr(self.optimizer.param_groups, lr, self.cfg.weight_decay)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=False)
        loss_sum = torch.zeros((), dtype=torch.float32)
        tokens = torch.zeros((), dtype=torch.float32)
        for mb in micro_batches:
            s, n = masked_loss_sum(model_forward(self.model, mb), mb.loss_mask)
            s.backward()
            loss_sum += s.detach()
            tokens += n
        totals = self._reduce_totals(loss_sum, tokens)
        self._reduce_and_scale_grads(totals["tokens_local_group"])
        grad_norm = self._clip_grads(self.cfg.clip_grad)
        self.optimizer.step()
        return {"loss": totals["loss"], "grad_norm": grad_norm, "tokens": totals["tokens"]}

    @torch.no_grad()
    def eval_step(self, micro_batches: List) -> dict:
        self.model.eval()
        loss_sum = torch.zeros((), dtype=torch.float32)
        tokens = torch.zeros((), dtype=torch.float32)
        for mb in micro_batches:
            s, n = masked_loss_sum(model_forward(self.model, mb), mb.loss_mask)
            loss_sum += s
            tokens += n
        totals = self._reduce_totals(loss_sum, tokens)
        return {"loss": totals["loss"], "tokens": totals["tokens"]}

    def _reduce_totals(self, loss_sum, tokens) -> dict:
        # Over the gradient group: the divisor for this replica's gradients.
        local = torch.stack([loss_sum, tokens])
        group_totals = local.clone()
        if self.grad_group_size > 1:
            dist.all_reduce(group_totals, group=self.grad_group)
        # For the log: TP peers hold identical sums, so a world-wide sum
        # keeps the ratio right (numerator and denominator both x TP).
        world = local.clone()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(world)
        return {
            "loss": (world[0] / world[1].clamp(min=1)).item(),
            "tokens": int(world[1].item()) // max(1, self.info.tp),
            "tokens_local_group": group_totals[1].clamp(min=1),
        }

    @torch.no_grad()
    def _reduce_and_scale_grads(self, num_tokens: torch.Tensor) -> None:
        grads = [p.grad for p in self._params if p.grad is not None]
        if self.grad_group_size > 1 and grads:
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=self.grad_group)
            for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                g.copy_(synced)
        for g in grads:
            g.div_(num_tokens)

    @torch.no_grad()
    def _clip_grads(self, max_norm: float) -> float:
        sq = torch.zeros((), dtype=torch.float64)
        for p in self._params:
            if p.grad is None:
                continue
            # Replicated parameters hold the same gradient on every TP rank:
            # count them on TP rank 0 only.
            if getattr(p, "tensor_model_parallel", False) or self.info.tp_rank == 0:
                sq += p.grad.double().pow(2).sum()
        if self.info.tp > 1:
            dist.all_reduce(sq, group=self.mp_group)
        norm = math.sqrt(sq.item())
        if max_norm > 0:
            coeff = max_norm / (norm + 1e-6)
            if coeff < 1.0:
                for p in self._params:
                    if p.grad is not None:
                        p.grad.mul_(coeff)
        return norm

    # --- checkpoints -------------------------------------------------------
    def write_checkpoint(self, tmp_dir: str) -> None:
        from megatron.core import parallel_state

        # One copy per model-parallel rank: the first data-parallel (and
        # context-parallel) replica writes it.
        if parallel_state.get_data_parallel_rank(with_context_parallel=True) != 0:
            return
        ckpt.torch_save(
            {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()},
            ckpt.torch_shard_path(tmp_dir, self.info.tp_rank, self.info.pp_rank),
        )

    def load_checkpoint(self, ckpt_dir: str) -> None:
        path = ckpt.torch_shard_path(ckpt_dir, self.info.tp_rank, self.info.pp_rank)
        if not os.path.isfile(path):
            raise SystemExit(
                f"load: {ckpt_dir} has no state for tensor-parallel rank {self.info.tp_rank}, "
                f"pipeline rank {self.info.pp_rank} (saved with another TP/PP layout?)"
            )
        state = torch.load(path, map_location="cpu", weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
