"""The scaling sweep's plumbing on the CPU: benchmarks/scaling.py launches
the demo config through fox-launch on 1 and 2 processes (weak scaling over
data parallel) and writes BENCH.md scaling records.  CPU throughput says
nothing about GPUs; what is checked is that every record is complete and
consistent with the runs it came from."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REQUIRED = ("bench", "model", "size", "L", "gpus", "dp", "tp", "pp", "cp", "acp", "tokens_per_s", "efficiency")


def test_scaling_sweep_writes_complete_records(tmp_path):
    out = tmp_path / "scaling.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "benchmarks/scaling.py", "configs/demo.yaml", "--gpus", "1,2", "--iters", "5",
           "--warmup", "2", "--size", "demo", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads(out.read_text())
    assert {"gpu", "torch", "triton", "date", "command"} <= set(result)
    one, two = result["records"]
    for rec, n in ((one, 1), (two, 2)):
        assert all(key in rec for key in REQUIRED), rec
        assert (rec["bench"], rec["gpus"], rec["dp"], rec["L"], rec["acp"]) == ("scaling", n, n, 256, True)
        assert rec["tokens_per_s"] > 0 and rec["steps_measured"] == 3
        assert 0.0 < rec["kept_fraction"] <= 1.0
    # weak scaling: efficiency against the 1-process run's throughput per process
    assert one["efficiency"] == 1.0
    assert abs(two["efficiency"] - two["tokens_per_s"] / (2 * one["tokens_per_s"])) < 1e-9
