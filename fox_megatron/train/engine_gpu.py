"""GPU execution path: megatron-core end to end.

- megatron-core DistributedDataParallel (contiguous fp32 gradient buckets)
  and its optimizer (`get_megatron_optimizer`: mixed precision with fp32 main
  weights under bf16/fp16, the distributed optimizer when
  `use_distributed_optimizer`, gradient clipping inside `step()`);
- `get_forward_backward_func()`: no pipelining, or 1F1B when PP > 1;
- per-token loss (config.calculate_per_token_loss): each micro-batch returns
  its loss sum and token count, finalize_model_grads divides by the global
  count after the data-parallel reduction;
- checkpoints through dist_checkpointing (torch_dist), resharding across DP.
"""

from __future__ import annotations

import os
from typing import List

import torch
import torch.distributed as dist

from .loss import masked_loss_sum, model_forward
from .schedule import apply_lr

DIST_SUBDIR = "torch_dist"
# Optimizer state layout in the checkpoint: fully parallel save/load, and the
# data-parallel size may change on resume (TP/PP may not).
OPTIMIZER_SHARDING = {"distrib_optim_sharding_type": "dp_reshardable"}


class MegatronEngine:
    format = "torch_dist"

    def __init__(self, cfg, info, model, config):
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.cfg, self.info, self.config = cfg, info, config
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=cfg.use_distributed_optimizer,
            check_for_nan_in_grad=True,
        )
        self.model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
        opt_config = OptimizerConfig(
            optimizer="adam",
            lr=cfg.lr,
            min_lr=cfg.min_lr,
            weight_decay=cfg.weight_decay,
            adam_beta1=cfg.adam_beta1,
            adam_beta2=cfg.adam_beta2,
            adam_eps=cfg.adam_eps,
            clip_grad=cfg.clip_grad,
            bf16=cfg.bf16,
            fp16=cfg.fp16,
            params_dtype=config.params_dtype,
            use_distributed_optimizer=cfg.use_distributed_optimizer,
        )
        self.optimizer = get_megatron_optimizer(opt_config, [self.model])
        # The schedule calls these around the micro-batch loop: no gradient
        # reduction until the last micro-batch, then the DP reduction and the
        # division by the global token count.
        config.no_sync_func = self.model.no_sync
        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = self.optimizer.scale_loss
        self.forward_backward = get_forward_backward_func()

    def _forward_step(self, data_iterator, model):
        mb = next(data_iterator)
        output = model_forward(model, mb)

        def loss_func(output_tensor):
            loss_sum, n = masked_loss_sum(output_tensor, mb.loss_mask)
            report = torch.stack([loss_sum.detach(), n.detach()])
            return loss_sum, n.to(torch.int), {"lm loss": report}

        return output, loss_func

    def _run(self, micro_batches: List, forward_only: bool):
        return self.forward_backward(
            forward_step_func=self._forward_step,
            data_iterator=iter(micro_batches),
            model=[self.model],
            num_microbatches=len(micro_batches),
            seq_length=self.cfg.seq_length,
            micro_batch_size=self.cfg.micro_batch_size,
            forward_only=forward_only,
        )

    def _totals(self, reports) -> dict:
        # Only the last pipeline stage has losses; TP peers hold copies (the
        # ratio is unaffected), CP ranks hold parts.  One world-wide sum gives
        # every rank (rank 0 logs) the global mean.
        local = torch.zeros(2, dtype=torch.float32, device=self.info.device)
        for r in reports:
            local += r["lm loss"].float()
        dist.all_reduce(local)
        tp_copies = max(1, self.info.tp)
        return {"loss": (local[0] / local[1].clamp(min=1)).item(), "tokens": int(local[1].item()) // tp_copies}

    def train_step(self, micro_batches: List, lr: float) -> dict:
        apply_lr(self.optimizer.param_groups, lr, self.cfg.weight_decay)
        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        reports = self._run(micro_batches, forward_only=False)
        ok, grad_norm, _ = self.optimizer.step()
        totals = self._totals(reports)
        totals["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        totals["skipped"] = not ok
        return totals

    @torch.no_grad()
    def eval_step(self, micro_batches: List) -> dict:
        self.model.eval()
        reports = self._run(micro_batches, forward_only=True)
        return self._totals(reports)

    # --- checkpoints -------------------------------------------------------
    def _sharded_state(self, is_loading: bool):
        model_sd = self.model.module.sharded_state_dict()
        return {
            "model": model_sd,
            "optimizer": self.optimizer.sharded_state_dict(
                model_sd, is_loading=is_loading, metadata=OPTIMIZER_SHARDING
            ),
        }

    def _create_optimizer_state(self) -> None:
        """Give torch's Adam the (zero) state it creates at its first step.

        A process that loads before it has stepped has an empty optimizer
        state, and the distributed optimizer's sharded_state_dict reads the
        step count from that state when neither Apex nor Transformer Engine
        provides the Adam (megatron-core asserts one step value).  The load
        then overwrites these tensors."""
        for inner in self._torch_optimizers():
            for group in inner.param_groups:
                for p in group["params"]:
                    state = inner.state[p]
                    if not state:
                        state["step"] = torch.tensor(0.0)
                        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _torch_optimizers(self):
        """The torch optimizers inside megatron-core's (chained) optimizer."""
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            inner = getattr(opt, "optimizer", None)
            if isinstance(inner, torch.optim.Optimizer):
                yield inner

    def write_checkpoint(self, tmp_dir: str) -> None:
        from megatron.core import dist_checkpointing

        target = os.path.join(tmp_dir, DIST_SUBDIR)
        if self.info.rank == 0:
            os.makedirs(target, exist_ok=True)
        dist.barrier()
        dist_checkpointing.save(self._sharded_state(is_loading=False), target)

    def load_checkpoint(self, ckpt_dir: str) -> None:
        from megatron.core import dist_checkpointing

        source = os.path.join(ckpt_dir, DIST_SUBDIR)
        if not os.path.isdir(source):
            raise SystemExit(f"load: {ckpt_dir} holds no torch_dist checkpoint (written by a CPU run?)")
        self._create_optimizer_state()
        state = dist_checkpointing.load(self._sharded_state(is_loading=True), source)
        self.model.module.load_state_dict(state["model"])
        # no_grad: in fp32 the distributed optimizer's main parameters are
        # views of the model's (leaf) parameters, and its load copies into them.
        with torch.no_grad():
            self.optimizer.load_state_dict(state["optimizer"])
        step = saved_adam_step(state["optimizer"])
        if step is not None:
            for inner in self._torch_optimizers():
                restore_adam_steps(inner, step)


def saved_adam_step(optimizer_state):
    """Adam's step count as megatron-core's distributed optimizer saves it.

    Without Apex / Transformer Engine the distributed optimizer keeps torch
    Adam's per-parameter ``step`` out of its sharded buckets and writes one
    value into every param group instead.  Returns that value (None when the
    checkpoint holds none, e.g. the plain optimizer, which keeps ``step`` in
    the per-parameter state it saves whole)."""
    steps = set()

    def walk(node):
        if isinstance(node, dict):
            groups = node.get("param_groups")
            if isinstance(groups, list):
                steps.update(g["step"] for g in groups if isinstance(g, dict) and "step" in g)
            for value in node.values():
                walk(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                walk(value)

    walk(optimizer_state)
    if len(steps) > 1:
        raise RuntimeError(f"checkpoint holds different Adam step counts {sorted(steps)}")
    return float(steps.pop()) if steps else None


def restore_adam_steps(optimizer: torch.optim.Optimizer, step: float) -> None:
    """Give every parameter its own step tensor holding the saved count.

    Needed after megatron-core's distributed-optimizer load without Apex /
    Transformer Engine (megatron-core 0.16): its load puts *one* step tensor
    into every parameter's state (torch's foreach Adam then adds 1 to it once
    per parameter, so the count races ahead), and the bucket load that
    follows copies into it the step of the optimizer state that existed
    before the load (0 on a fresh process), so the resumed run's bias
    correction restarts and its first update is several times too large."""
    for state in optimizer.state.values():
        old = state.get("step")
        if isinstance(old, torch.Tensor):
            state["step"] = torch.full_like(old, step)
