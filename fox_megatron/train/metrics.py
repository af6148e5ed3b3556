"""Throughput arithmetic and the three log sinks (console, JSONL, TensorBoard).

Model FLOPs per token (BENCH.md, "Training step"):
    6 x parameters + 3.5 x 2 x L x hidden x layers
(weights: forward + backward; causal attention counted unpruned for every
variant, so ACP's savings show as a higher rate, not a smaller count).
MFU = tokens/s x FLOPs per token / (GPUs x 989e12), the H100/H200 dense bf16
peak; a CPU run reports n/a.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from typing import Optional

PEAK_FLOPS_PER_GPU = 989e12


def flops_per_token(num_params: int, seq_length: int, hidden_size: int, num_layers: int) -> float:
    return 6.0 * num_params + 3.5 * 2.0 * seq_length * hidden_size * num_layers


def memory_gib(is_cuda: bool) -> float:
    if is_cuda:
        import torch

        return torch.cuda.max_memory_allocated() / 2**30
    try:
        with open("/proc/self/statm") as handle:
            resident_pages = int(handle.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError, IndexError):
        # ru_maxrss is in KiB on Linux (the peak, not the current size).
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def format_duration(seconds: float) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "n/a"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class MetricsLogger:
    """Rank 0 only (other ranks get a logger that drops everything)."""

    def __init__(self, enabled: bool, metrics_file: Optional[str], tensorboard_dir: Optional[str],
                 total_iters: int, flops_per_token: float, world_size: int, is_cuda: bool):
        self.enabled = enabled
        self.total_iters = total_iters
        self.flops_per_token = flops_per_token
        self.world_size = world_size
        self.is_cuda = is_cuda
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        if metrics_file:
            os.makedirs(os.path.dirname(os.path.abspath(metrics_file)), exist_ok=True)
            # Appending: a resumed run continues the same file.
            self._jsonl = open(metrics_file, "a", buffering=1)
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception:  # tensorboard is optional
                print("[fox-train] tensorboard is not installed; tensorboard_dir ignored", file=sys.stderr)
            else:
                self._tb = SummaryWriter(log_dir=tensorboard_dir)

    def throughput(self, tokens: int, seconds: float) -> dict:
        tokens_per_s = tokens / seconds if seconds > 0 else float("nan")
        tflops_per_gpu = tokens_per_s * self.flops_per_token / self.world_size / 1e12
        mfu = tflops_per_gpu * 1e12 / PEAK_FLOPS_PER_GPU if self.is_cuda else None
        return {"tokens_per_s": tokens_per_s, "tflops_per_gpu": tflops_per_gpu, "mfu": mfu}

    def log_train(self, record: dict) -> None:
        if not self.enabled:
            return
        r = record
        kept = r.get("acp_kept_fraction")
        mfu = r.get("mfu")
        line = (
            f"iter {r['iteration']:>7d}/{self.total_iters} | loss {r['loss']:.4f} | lr {r['lr']:.3e} | "
            f"grad norm {r['grad_norm']:.3f} | tokens/s {r['tokens_per_s']:,.0f} | "
            f"TFLOP/s/GPU {r['tflops_per_gpu']:.3g} | MFU {'n/a' if mfu is None else f'{mfu:.3f}'} | "
            f"ACP kept {'n/a' if kept is None else f'{kept:.3f}'} | "
            f"mem {r['mem_gib']:.2f} GiB | elapsed {format_duration(r['elapsed_s'])} | "
            f"ETA {format_duration(r['eta_s'])}"
        )
        print(line, flush=True)
        self._write(r, "train")

    def log_eval(self, record: dict) -> None:
        if not self.enabled:
            return
        print(f"eval at iter {record['iteration']} | loss {record['eval_loss']:.4f} | "
              f"ppl {math.exp(min(record['eval_loss'], 50)):.2f}", flush=True)
        self._write(record, "eval")

    def _write(self, record: dict, kind: str) -> None:
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(dict(record, kind=kind)) + "\n")
        if self._tb is not None:
            step = record["iteration"]
            for key, value in record.items():
                if key != "iteration" and isinstance(value, (int, float)) and value is not None:
                    self._tb.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


class Clock:
    """Wall time of the training loop, for rates and the ETA."""

    def __init__(self, start_iteration: int):
        self.t0 = time.time()
        self.start_iteration = start_iteration
        self.last = self.t0

    def interval(self) -> float:
        now = time.time()
        dt, self.last = now - self.last, now
        return dt

    def pause(self, seconds: float) -> None:
        # Time spent in checkpoints and evaluation is not training time.
        self.last += seconds

    def eta(self, iteration: int, total: int) -> float:
        done = iteration - self.start_iteration
        if done <= 0:
            return float("nan")
        return (time.time() - self.t0) / done * (total - iteration)
