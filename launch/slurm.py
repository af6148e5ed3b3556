"""sbatch scripts for a run: one task per node, each runs one torchrun.

The rendezvous comes from SLURM itself: the first host of the job's node list
is the master (``scontrol show hostnames``), node ranks come from
``$SLURM_NODEID``. The master port is derived from the job id unless the
config fixes one, so two jobs that share a node do not collide.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from typing import Optional

from fox_megatron.config import RunConfig

from .torchrun import Rendezvous, config_path, run_env, shell_join, torchrun_args

SCRIPT_NAME = "sbatch.sh"
JOB_ID_FILE = "slurm_job_id"


def job_name(cfg: RunConfig, name: str) -> str:
    if cfg.launch.slurm.job_name:
        return cfg.launch.slurm.job_name
    return name if name.startswith("fox") else f"fox-{name}"


def output_path(cfg: RunConfig) -> str:
    return cfg.launch.slurm.output or os.path.join(cfg.launch.run_dir, "slurm-%j.out")


def sbatch_directives(cfg: RunConfig, name: str, workdir: str) -> list[str]:
    la, sl = cfg.launch, cfg.launch.slurm
    lines = [
        f"--job-name={job_name(cfg, name)}",
        f"--nodes={la.nnodes}",
        # One task per node: it runs torchrun, which starts the node's workers.
        "--ntasks-per-node=1",
    ]
    gpus = sl.gpus_per_node if sl.gpus_per_node is not None else (
        la.nproc_per_node if la.device == "cuda" else 0)
    if gpus:
        lines.append(f"--gpus-per-node={gpus}")
    if sl.cpus_per_task is not None:
        lines.append(f"--cpus-per-task={sl.cpus_per_task}")
    if sl.mem is not None:
        lines.append(f"--mem={sl.mem}")
    for opt in ("partition", "account", "qos", "time"):
        v = getattr(sl, opt)
        if v is not None:
            lines.append(f"--{opt}={v}")
    if sl.exclusive:
        lines.append("--exclusive")
    lines.append(f"--output={output_path(cfg)}")
    if sl.error is not None:
        lines.append(f"--error={sl.error}")
    lines.append(f"--chdir={workdir}")
    for extra in sl.extra_sbatch:
        extra = extra.strip()
        lines.append(extra[len("#SBATCH"):].strip() if extra.startswith("#SBATCH") else extra)
    return lines


def render_sbatch(cfg: RunConfig, name: str, workdir: Optional[str] = None) -> str:
    """The batch script for ``cfg`` (whose paths are already absolute)."""
    la, sl = cfg.launch, cfg.launch.slurm
    workdir = workdir or os.getcwd()
    out = ["#!/bin/bash"]
    out += [f"#SBATCH {d}" for d in sbatch_directives(cfg, name, workdir)]
    out += [
        "",
        f"# fox-megatron run '{name}': {la.nnodes} node(s) x {la.nproc_per_node} process(es), "
        f"device {la.device}.",
        # No pipefail: "scontrol ... | head -n1" may end scontrol with SIGPIPE.
        "set -eu",
        "",
    ]
    env = run_env(cfg)
    for k, v in env.items():
        out.append(f"export {k}={shlex.quote(v)}")
    if sl.setup:
        out.append("")
        out += list(sl.setup)
    out += [
        "",
        "# Node 0 of the allocation hosts the rendezvous.",
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
    ]
    if la.master_port is not None:
        out.append(f"MASTER_PORT={la.master_port}")
    else:
        out.append("MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))")
    out += ["export MASTER_ADDR MASTER_PORT", ""]

    if (la.nnodes == 1 and not la.max_restarts) or la.rdzv_backend == "static":
        rdzv = Rendezvous(nnodes="$SLURM_NNODES", backend="static", master_addr="$MASTER_ADDR",
                          master_port="$MASTER_PORT", node_rank="$SLURM_NODEID")
    else:
        rdzv = Rendezvous(nnodes="$SLURM_NNODES", backend="c10d",
                          endpoint="$MASTER_ADDR:$MASTER_PORT", rdzv_id="$SLURM_JOB_ID")
    inner = shell_join(torchrun_args(cfg, rdzv, config_path(cfg)),
                       dynamic=("$SLURM_NNODES", "$MASTER_ADDR", "$MASTER_PORT", "$SLURM_NODEID",
                                "$MASTER_ADDR:$MASTER_PORT", "$SLURM_JOB_ID"))
    srun = ('srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1'
            + "".join(" " + shlex.quote(a) for a in sl.srun_args))
    out += [
        "# One torchrun per node. The command is single-quoted so that $SLURM_NODEID",
        "# is expanded by each node's own shell.",
        f"{srun} bash -c {shlex.quote('exec ' + inner)}",
        "",
    ]
    return "\n".join(out)


def parse_job_id(stdout: str) -> str:
    """Job id from ``sbatch --parsable`` ("123" or "123;cluster") or from the
    plain "Submitted batch job 123" line."""
    text = stdout.strip()
    m = re.search(r"Submitted batch job (\d+)", text)
    if m:
        return m.group(1)
    m = re.fullmatch(r"(\d+)(?:;\S+)?", text.splitlines()[-1].strip() if text else "")
    if m:
        return m.group(1)
    raise RuntimeError(f"could not read a job id from sbatch's output: {text!r}")


def submit(script: str, sbatch: str = "sbatch") -> str:
    """Submit a written script; returns the job id."""
    exe = shutil.which(sbatch)
    if exe is None:
        raise FileNotFoundError(f"{sbatch} not found on PATH (is this a SLURM login node?)")
    proc = subprocess.run([exe, "--parsable", script], capture_output=True, text=True)
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise RuntimeError(f"sbatch failed ({proc.returncode}): {msg[-1] if msg else 'no output'}")
    return parse_job_id(proc.stdout)
