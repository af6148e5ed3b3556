"""torchrun command lines for a run: one node, or one line per node.

Everything here is plain string work (no torch import): the launcher runs on
login nodes. torchrun is started as ``python -m torch.distributed.run`` so
that it works without the ``torchrun`` script on PATH and always uses the
same interpreter as the trainer.
"""

from __future__ import annotations

import os
import shlex
import socket
import sys
from dataclasses import dataclass
from typing import Optional

from fox_megatron.config import RunConfig

TRAIN_MODULE = "fox_megatron.train"
CONFIG_NAME = "config.yaml"


def config_path(cfg: RunConfig) -> str:
    """Where the resolved config lives (inside the run dir)."""
    return os.path.join(cfg.launch.run_dir, CONFIG_NAME)


def python_executable(cfg: RunConfig) -> str:
    return cfg.launch.python or sys.executable


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_env(cfg: RunConfig) -> dict[str, str]:
    """Environment added for every trainer process."""
    env = {"FOX_DEVICE": cfg.launch.device}
    if cfg.launch.device == "cpu":
        # Hide GPUs so that every library agrees this is a CPU run (gloo,
        # no CUDA allocations), even on a machine that has GPUs.
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        # megatron-core expects one connection per device so that
        # communication and computation kernels overlap in issue order.
        env["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    if cfg.launch.max_restarts:
        # restarted workers must not share the rendezvous' TCP store with
        # the failed ones: its keys from before the failure (process groups'
        # addresses) would send them to dead peers (pytorch/pytorch#135712)
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    env.update(cfg.launch.env)
    return env


@dataclass
class Rendezvous:
    """How the torchrun agents of a run find each other.

    Values may be literal or shell expressions (``"$MASTER_ADDR"``) when the
    command is rendered into a script.
    """

    nnodes: str
    backend: str  # "static" or "c10d"
    master_addr: Optional[str] = None
    master_port: Optional[str] = None
    node_rank: Optional[str] = None
    endpoint: Optional[str] = None
    rdzv_id: Optional[str] = None


def torchrun_args(cfg: RunConfig, rdzv: Rendezvous, config_file: Optional[str] = None) -> list[str]:
    """The argument vector: python -m torch.distributed.run ... -m fox_megatron.train --config FILE."""
    args = [python_executable(cfg), "-m", "torch.distributed.run",
            "--nnodes", rdzv.nnodes, "--nproc_per_node", str(cfg.launch.nproc_per_node)]
    if cfg.launch.max_restarts:
        # a failed worker takes the others down and all start again (the
        # trainer resumes from its latest checkpoint)
        args += ["--max-restarts", str(cfg.launch.max_restarts)]
    if rdzv.backend == "static":
        if rdzv.node_rank is not None:
            args += ["--node_rank", rdzv.node_rank]
        args += ["--master_addr", rdzv.master_addr, "--master_port", rdzv.master_port]
    else:
        args += ["--rdzv_backend", "c10d", "--rdzv_endpoint", rdzv.endpoint, "--rdzv_id", rdzv.rdzv_id]
    args += ["-m", TRAIN_MODULE, "--config", config_file or config_path(cfg)]
    return args


def shell_join(args: list[str], dynamic: tuple[str, ...] = ()) -> str:
    """Quote ``args`` for a POSIX shell. Arguments listed in ``dynamic`` are
    shell expressions and are only double-quoted, so they still expand."""
    return " ".join(f'"{a}"' if a in dynamic else shlex.quote(a) for a in args)


def local_command(cfg: RunConfig, master_port: Optional[int] = None) -> list[str]:
    """torchrun for a single-node run on this machine."""
    port = master_port or cfg.launch.master_port or free_port()
    if cfg.launch.max_restarts:
        # restarts form the group again through a c10d rendezvous
        rdzv = Rendezvous(nnodes="1", backend="c10d", endpoint=f"{cfg.launch.master_addr}:{port}",
                          rdzv_id=run_id(cfg))
    else:
        rdzv = Rendezvous(nnodes="1", backend="static", master_addr=cfg.launch.master_addr,
                          master_port=str(port))
    return torchrun_args(cfg, rdzv)


def run_id(cfg: RunConfig) -> str:
    """The c10d rendezvous id: launch.rdzv_id, else the run directory's name."""
    return cfg.launch.rdzv_id or os.path.basename(cfg.launch.run_dir.rstrip("/")) or "fox"


class LaunchError(ValueError):
    """The launch cannot be carried out as asked (one line, names the key or flag)."""


def node_commands(cfg: RunConfig, master_addr: Optional[str] = None) -> list[list[str]]:
    """One torchrun command per node, for multi-node runs without SLURM.

    static: every node gets its own --node_rank and the same master address
    (node 0's); c10d: every node runs the same command and the rendezvous at
    launch.rdzv_endpoint assigns ranks.
    """
    la = cfg.launch
    port = la.master_port or 29500  # must be known to every node in advance
    if la.rdzv_backend == "static":
        addr = master_addr or la.master_addr
        if addr in ("127.0.0.1", "localhost"):
            raise LaunchError("launch.master_addr: multi-node runs need node 0's address "
                              "(set launch.master_addr or pass --master-addr)")
        return [torchrun_args(cfg, Rendezvous(nnodes=str(la.nnodes), backend="static", master_addr=addr,
                                              master_port=str(port), node_rank=str(rank)))
                for rank in range(la.nnodes)]
    endpoint = la.rdzv_endpoint
    if master_addr is not None:
        endpoint = f"{master_addr}:{port}"
    elif endpoint is None and la.master_addr not in ("127.0.0.1", "localhost"):
        endpoint = f"{la.master_addr}:{port}"
    if endpoint is None:
        raise LaunchError("launch.rdzv_endpoint: multi-node runs need a rendezvous host:port on one "
                          "of the nodes (set launch.rdzv_endpoint or pass --master-addr)")
    if ":" not in endpoint:
        endpoint = f"{endpoint}:{port}"
    cmd = torchrun_args(cfg, Rendezvous(nnodes=str(la.nnodes), backend="c10d",
                                        endpoint=endpoint, rdzv_id=run_id(cfg)))
    return [cmd for _ in range(la.nnodes)]
