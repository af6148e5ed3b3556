"""Faults mid-run with launch.max_restarts set, on the 2-process CPU demo
launched through fox-launch: a worker killed (SIGKILL: a crash, an OOM
kill, a lost process) or hung (SIGSTOP; the other rank's collective times
out).  torchrun stops the workers and starts them again, the trainer
resumes from the latest checkpoint, and the run ends as an uninterrupted
one does, loss for loss, bit for bit.  Without restarts the launcher
reports the failure."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train_preemption import DEMO, ENV, REPO, _train_records

ITERS, SAVE_EVERY = 12, 3
# the LR schedule must not depend on train_iters; log every step
COMMON = ["log_interval=1", "eval_interval=null", "lr_decay_iters=400", f"train_iters={ITERS}",
          f"save_interval={SAVE_EVERY}"]


def _launch(run_dir, *overrides):
    return [sys.executable, "-m", "fox_megatron.launch", str(DEMO), "--set", *COMMON,
            f"launch.run_dir={run_dir}", *overrides]


def trainer_pid(run_dir, rank):
    """The trainer process of one rank of the run in run_dir (its workers are
    started with --config <run_dir>/config.yaml; torchrun's own command line
    names the module too, and is left out), found in /proc (Linux), or None."""
    config = str(Path(run_dir) / "config.yaml").encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"fox_megatron.train" in argv and config in argv and b"torch.distributed.run" not in argv \
                and f"RANK={rank}".encode() in env:
            return int(entry.name)
    return None


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory):
    """The losses of an uninterrupted run."""
    ref = tmp_path_factory.mktemp("reference")
    done = subprocess.run(_launch(ref), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [r["loss"] for r in _train_records(ref)]


def _fault_mid_run(run, fault, *overrides, rank=1, after=SAVE_EVERY + 2):
    """Launch the demo, apply fault(pid of rank's worker) once `after`
    iterations are logged (by default past the first checkpoint), wait for
    the end: (exit code, output, the number of iterations logged before the
    fault)."""
    proc = subprocess.Popen(_launch(run, *overrides), cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while len(_train_records(run)) < after:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() < deadline, f"the run did not reach iteration {after}"
            time.sleep(0.2)
        victim = trainer_pid(run, rank)
        assert victim is not None, f"no worker of rank {rank} found"
        logged = len(_train_records(run))
        fault(victim)
        out, _ = proc.communicate(timeout=420)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out, logged


def _restarted(run, fault, *overrides):
    """_fault_mid_run with one restart allowed; the run must succeed."""
    rc, out, logged = _fault_mid_run(run, fault, "launch.max_restarts=1", *overrides)
    assert rc == 0, out[-4000:]
    return out, logged


def _check_resumed(run, out, logged, reference_losses):
    assert "torchrun restart 1: training goes on from iteration" in out, out[-4000:]
    resumed_at = int(out.split("torchrun restart 1: training goes on from iteration")[1].split()[0])
    # the latest checkpoint when the fault struck: a save_interval multiple
    # from iteration 3 on, no later than one step past the last logged one
    assert resumed_at % SAVE_EVERY == 0 and SAVE_EVERY <= resumed_at <= logged + 1
    records = _train_records(run)
    # the iterations after that checkpoint ran again: the log holds both runs
    assert [r["iteration"] for r in records[-(ITERS - resumed_at):]] == list(range(resumed_at + 1, ITERS + 1))
    final = {r["iteration"]: r["loss"] for r in records}  # the last record of each iteration
    assert sorted(final) == list(range(1, ITERS + 1))
    assert (run / "checkpoints" / "latest").read_text().strip() == f"iter_{ITERS:07d}"
    # as an uninterrupted run, bit for bit
    assert [final[i] for i in range(1, ITERS + 1)] == reference_losses


def test_killed_worker_restarts_and_resumes_bit_exact(tmp_path, reference_losses):
    run = tmp_path / "killed"
    out, logged = _restarted(run, lambda pid: os.kill(pid, signal.SIGKILL))
    _check_resumed(run, out, logged, reference_losses)


def test_hung_worker_times_out_restarts_and_resumes(tmp_path, reference_losses):
    """A worker that stops answering (SIGSTOP: a hung GPU, a stalled node):
    the other rank's collective gives up after distributed_timeout_minutes,
    its failure takes the group down and torchrun restarts it."""
    run = tmp_path / "hung"
    t0 = time.time()
    out, logged = _restarted(run, lambda pid: os.kill(pid, signal.SIGSTOP), "distributed_timeout_minutes=1")
    assert time.time() - t0 > 60  # the restart waited for the timeout
    _check_resumed(run, out, logged, reference_losses)


def test_without_restarts_a_killed_worker_fails_the_run(tmp_path):
    """max_restarts = 0 (the default): the launcher reports the failure."""
    rc, out, _ = _fault_mid_run(tmp_path / "fails", lambda pid: os.kill(pid, signal.SIGKILL), "train_iters=400",
                                "save_interval=null", "save=null", "load=null", rank=0, after=1)
    assert rc != 0
    assert "torchrun restart" not in out
