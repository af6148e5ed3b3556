"""Process groups and seeds.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; a
plain `python -m fox_megatron.train` without them runs as a world of one.
The backend follows the device: NCCL on CUDA, gloo on CPU (the demo and CI).
Megatron-Core's parallel_state then cuts the world into TP x CP x DP x PP
groups (its default order tp-cp-ep-dp-pp).
"""

from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelInfo:
    device: torch.device
    rank: int
    world_size: int
    local_rank: int
    tp: int
    pp: int
    cp: int
    dp: int
    tp_rank: int
    pp_rank: int
    cp_rank: int
    dp_rank: int

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(
                "launch.device: cuda was requested but torch sees no CUDA device "
                "(set launch.device: cpu for a CPU run)"
            )
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_distributed(cfg, timeout_minutes: int = 30) -> ParallelInfo:
    """Start torch.distributed and megatron-core's model-parallel groups."""
    from megatron.core import parallel_state

    device = resolve_device(cfg.launch.device)
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if "MASTER_ADDR" not in os.environ:
        # A single process started by hand: a private rendezvous on localhost.
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if device.type == "cuda":
        torch.cuda.set_device(device)

    tp, pp, cp = (
        cfg.tensor_model_parallel_size,
        cfg.pipeline_model_parallel_size,
        cfg.context_parallel_size,
    )
    if world_size % (tp * pp * cp):
        raise SystemExit(
            f"world size {world_size} is not divisible by tensor x pipeline x context parallel "
            f"= {tp} x {pp} x {cp}"
        )
    if device.type == "cpu" and pp > 1:
        raise SystemExit(
            "pipeline_model_parallel_size: pipeline parallelism needs CUDA (megatron-core's "
            "p2p communication allocates on the GPU); use 1 on CPU"
        )

    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            **({"device_id": device} if device.type == "cuda" else {}),
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            context_parallel_size=cp,
            distributed_timeout_minutes=timeout_minutes,
            # On CPU the default groups are gloo already; extra gloo copies
            # (which the distributed optimizer wants on GPU) would only cost
            # start-up time.
            create_gloo_process_groups=device.type == "cuda",
        )
    return ParallelInfo(
        device=device,
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        tp=tp,
        pp=pp,
        cp=cp,
        dp=parallel_state.get_data_parallel_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        cp_rank=parallel_state.get_context_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
    )


def set_seed(seed: int, info: ParallelInfo) -> None:
    """Seed every generator the run uses.

    As in Megatron-LM's training setup, each pipeline stage gets its own seed
    (its layers are different layers) while data- and tensor-parallel peers
    share one, so replicas start identical.  On CUDA megatron-core's RNG
    tracker adds the per-TP-rank stream that initialises sharded weights and
    drives dropout inside tensor-parallel regions.  On CPU the model is built
    with use_cpu_initialization (the full weight is drawn from the shared CPU
    generator and then split), so the shared seed alone makes TP shards agree.
    """
    seed = seed + 100 * info.pp_rank
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if info.is_cuda:
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    from megatron.core import parallel_state

    if dist.is_initialized():
        try:
            parallel_state.destroy_model_parallel()
        finally:
            dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
