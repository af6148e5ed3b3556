"""The trainer with context parallelism on CPU: CP = 2 (two ranks, zigzag
slices, ring attention) follows the same loss curve as CP = 1 on one rank
(same global batch, same data order: data parallelism is 1 in both)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def _losses(run_dir, *overrides):
    cmd = [sys.executable, "-m", "fox_megatron.launch", str(DEMO), "--set", "train_iters=12", "log_interval=1",
           "eval_interval=100", "save_interval=100", f"launch.run_dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rec = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rec if r["kind"] == "train"]


@pytest.mark.skipif(not DEMO.exists(), reason="configs/demo.yaml not present")
def test_trainer_cp2_matches_cp1(tmp_path):
    cp1 = _losses(tmp_path / "cp1", "launch.nproc_per_node=1")
    cp2 = _losses(tmp_path / "cp2", "launch.nproc_per_node=2", "context_parallel_size=2")
    assert len(cp1) == len(cp2) == 12
    assert max(abs(a - b) for a, b in zip(cp1, cp2)) < 1e-3, (cp1, cp2)
    assert cp2[-1] < cp2[0] - 1.0
