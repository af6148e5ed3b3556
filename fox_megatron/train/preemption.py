"""Checkpoint-and-exit on SIGTERM / SIGUSR1 (SLURM preemption, time limits).

SLURM sends SIGTERM when a job is preempted, cancelled or reaches its time
limit (and SIGUSR1 ahead of time with ``#SBATCH --signal=USR1@<s>``);
torchrun forwards SIGTERM to its workers.  The handler only records the
request; the loop checks it between steps, all ranks agree through one
all-reduce (a signal may reach ranks at different steps), the step in flight
finishes, a checkpoint is written and the run exits with EXIT_PREEMPTED.
Re-running the same command resumes from that checkpoint.
"""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

# EX_TEMPFAIL: "try again later" -- the run is unfinished but intact
EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self, signals=SIGNALS):
        self.signum = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum

    def agreed(self, device) -> bool:
        """True on every rank once any rank has received a signal."""
        flag = torch.tensor([0.0 if self.signum is None else 1.0], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
