"""Checkpoint directory layout, atomic publication, and the two formats.

Layout (Megatron-LM-like, with its own `latest` file):

    <save>/iter_0000100/            one complete checkpoint
        meta.json                   iteration, consumed samples, parallel layout, config
        rng/rank_00000.pt           every rank's RNG states
        torch/mp_rank_00_000.pt     CPU path: model + optimizer of TP rank 00, PP rank 000
        torch_dist/...              GPU path: megatron-core dist_checkpointing (torch_dist)
    <save>/latest                   text: "iter_0000100"

Atomicity: all ranks write into <save>/iter_0000100.tmp; every file is
fsynced before the ranks meet at a barrier; then rank 0 writes meta.json,
renames the directory to its final name and replaces `latest` through a
write-temp-fsync-rename of its own.  A crash at any point leaves `latest`
naming the previous complete checkpoint; a leftover *.tmp directory is
ignored by readers and removed by the next save.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from typing import Callable, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

LATEST = "latest"
META = "meta.json"
FORMAT_VERSION = 1


def iter_dirname(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def fsync_dir(path: str) -> None:
    # Makes a rename or a new file in `path` durable (POSIX needs the
    # directory itself synced, not just the file).
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


def torch_save(obj, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


def write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def save_checkpoint(save_dir: str, iteration: int, write_fn: Callable[[str], None], meta: dict,
                    keep_tmp_on_error: bool = False) -> str:
    """Collective: every rank calls it.  `write_fn(tmp_dir)` writes this
    rank's part; returns the final directory."""
    final = os.path.join(save_dir, iter_dirname(iteration))
    tmp = final + ".tmp"
    if _rank() == 0:
        os.makedirs(save_dir, exist_ok=True)
        _remove_stale_tmp(save_dir)
        os.makedirs(tmp)
    _barrier()
    write_fn(tmp)
    torch_save(capture_rng_state(), os.path.join(tmp, "rng", f"rank_{_rank():05d}.pt"))
    _barrier()
    if _rank() == 0:
        # Every rank has finished writing: make all of it durable (files
        # written by a library, such as dist_checkpointing's, included)
        # before anything names it.
        fsync_tree(tmp)
        meta = dict(meta, iteration=iteration, format_version=FORMAT_VERSION, saved_at=time.time())
        with open(os.path.join(tmp, META), "w") as handle:
            json.dump(meta, handle, indent=2, sort_keys=True, default=str)
            handle.flush()
            os.fsync(handle.fileno())
        fsync_dir(tmp)
        if os.path.exists(final):
            # Saving the same iteration again (e.g. a rerun): move the old
            # copy aside first; rename cannot replace a non-empty directory.
            old = final + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(save_dir)
        write_text_atomic(os.path.join(save_dir, LATEST), iter_dirname(iteration) + "\n")
    _barrier()
    return final


def _remove_stale_tmp(save_dir: str) -> None:
    for name in os.listdir(save_dir):
        if name.startswith("iter_") and (name.endswith(".tmp") or name.endswith(".old")):
            shutil.rmtree(os.path.join(save_dir, name), ignore_errors=True)


def is_complete(ckpt_dir: str) -> bool:
    return os.path.isfile(os.path.join(ckpt_dir, META))


def resolve_checkpoint(path: Optional[str]) -> Optional[str]:
    """The checkpoint directory `path` stands for, or None.

    `path` may be a save directory (its `latest` names the checkpoint) or
    one iter_XXXXXXX directory.  Only complete checkpoints are returned.
    """
    if not path or not os.path.isdir(path):
        return None
    if is_complete(path):
        return path
    latest = os.path.join(path, LATEST)
    if not os.path.isfile(latest):
        return None
    with open(latest) as handle:
        name = handle.read().strip()
    ckpt = os.path.join(path, name)
    if not is_complete(ckpt):
        raise SystemExit(f"{latest} names {name}, which is not a complete checkpoint")
    return ckpt


def read_meta(ckpt_dir: str) -> dict:
    with open(os.path.join(ckpt_dir, META)) as handle:
        return json.load(handle)


def check_layout(ckpt_dir: str, meta: dict, tp: int, pp: int) -> None:
    """Refuse, with the two layouts named, a resume whose tensor- or
    pipeline-parallel size differs from the checkpoint's: neither format
    reshards across them (the CPU one holds a file per TP / PP rank, the
    GPU one's optimizer state is sharded by data-parallel rank within each),
    and a mismatch would otherwise fail deep inside a load.  The
    data-parallel size may change."""
    saved = meta.get("parallel") or {}
    if "tp" not in saved or "pp" not in saved:
        return  # written before layouts were recorded
    if (int(saved["tp"]), int(saved["pp"])) != (tp, pp):
        raise SystemExit(
            f"load: {ckpt_dir} was saved with TP {saved['tp']} x PP {saved['pp']}; this run has "
            f"TP {tp} x PP {pp}. Resuming with another tensor- or pipeline-parallel size is not "
            f"supported (the data-parallel size may change): set tensor_model_parallel_size and "
            f"pipeline_model_parallel_size as they were, or start from a new save directory"
        )


# --- RNG -------------------------------------------------------------------

def capture_rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
        try:
            from megatron.core.tensor_parallel import get_cuda_rng_tracker

            state["cuda_tracker"] = get_cuda_rng_tracker().get_states()
        except Exception:  # the tracker is optional (CPU runs never set it)
            pass
    return state


def restore_rng_state(ckpt_dir: str) -> bool:
    """Restore this rank's generators; False when the checkpoint has no
    state for this rank (it was written with another world size)."""
    path = os.path.join(ckpt_dir, "rng", f"rank_{_rank():05d}.pt")
    if not os.path.isfile(path):
        return False
    state = torch.load(path, map_location="cpu", weights_only=False)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
        if "cuda_tracker" in state:
            from megatron.core.tensor_parallel import get_cuda_rng_tracker

            get_cuda_rng_tracker().set_states(state["cuda_tracker"])
    return True


# --- CPU format: one torch file per model-parallel rank ----------------------

def torch_shard_path(ckpt_dir: str, tp_rank: int, pp_rank: int) -> str:
    return os.path.join(ckpt_dir, "torch", f"mp_rank_{tp_rank:02d}_{pp_rank:03d}.pt")


def latest_iteration(path: Optional[str]) -> Tuple[Optional[str], int]:
    ckpt = resolve_checkpoint(path)
    if ckpt is None:
        return None, 0
    return ckpt, int(read_meta(ckpt)["iteration"])
