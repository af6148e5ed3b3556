"""End to end on the CPU: real processes, torchrun + gloo, the demo config.

- the demo through fox-launch on 2 processes: loss falls, metrics and a
  checkpoint are written; resuming from the iteration-8 checkpoint gives
  bit-for-bit the losses of the uninterrupted run;
- prepared (packed) byte data with TP=2 and a restarted job that picks up
  its own latest checkpoint, and a restart with another TP size refused;
- the standard-transformer baseline on packed data.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def _run(cmd, timeout=240):
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    return proc.stdout


def _torchrun(nproc, config, *overrides):
    return _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                 "--master_port", "0", "--rdzv_backend", "c10d", "--rdzv_endpoint", "127.0.0.1:0",
                 "-m", "fox_megatron.train", "--config", str(config), "--set", *overrides])


def _records(path, kind="train"):
    return [r for r in map(json.loads, Path(path).read_text().splitlines()) if r["kind"] == kind]


@pytest.mark.skipif(not DEMO.exists(), reason="configs/demo.yaml not present")
def test_demo_two_processes_then_bit_exact_resume(tmp_path):
    run1 = tmp_path / "run1"
    out = _run([sys.executable, "-m", "fox_megatron.launch", str(DEMO), "--set", "train_iters=16",
                "save_interval=8", "log_interval=1", "eval_interval=8", f"launch.run_dir={run1}"])
    assert "iter      16/16" in out
    rec = _records(run1 / "metrics.jsonl")
    assert [r["iteration"] for r in rec] == list(range(1, 17))
    losses = [r["loss"] for r in rec]
    assert losses[-1] < losses[0] - 1.0, losses
    assert sum(losses[-4:]) < sum(losses[:4])
    first = rec[0]
    for key in ("lr", "grad_norm", "tokens_per_s", "tflops_per_gpu", "mem_gib", "eta_s", "elapsed_s"):
        assert first[key] is not None and first[key] == first[key], key
    assert first["mfu"] is None  # CPU: no meaningful peak
    assert 0.0 < first["acp_kept_fraction"] <= 1.0
    assert len(_records(run1 / "metrics.jsonl", "eval")) == 2
    ckpt = run1 / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "iter_0000016"
    assert (ckpt / "iter_0000008" / "torch" / "mp_rank_00_000.pt").is_file()
    assert {p.name for p in (ckpt / "iter_0000016" / "rng").iterdir()} == {"rank_00000.pt", "rank_00001.pt"}

    # Resume from iteration 8 into a fresh run dir: same losses, bit for bit.
    run2 = tmp_path / "run2"
    out = _torchrun(2, run1 / "config.yaml", f"launch.run_dir={run2}", f"save={run2 / 'checkpoints'}",
                    f"load={ckpt / 'iter_0000008'}", f"metrics_file={run2 / 'metrics.jsonl'}")
    assert "resumed from" in out and "at iteration 8" in out
    resumed = _records(run2 / "metrics.jsonl")
    assert [r["iteration"] for r in resumed] == list(range(9, 17))
    assert [r["loss"] for r in resumed] == losses[8:]
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in rec[8:]]


@pytest.fixture(scope="module")
def packed_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed")
    words = "the quick brown fox forgets what it saw long ago and keeps what is near".split()
    lines = []
    for i in range(300):
        n = 5 + (i * 7) % 23  # documents of varied length, many per sequence
        lines.append(json.dumps({"text": " ".join(words[(i + j) % len(words)] for j in range(n))}))
    (root / "docs.jsonl").write_text("\n".join(lines) + "\n")
    _run([sys.executable, "-m", "fox_megatron.train.prepare", "--input", str(root / "docs.jsonl"),
          "--output-prefix", str(root / "docs")])
    return root / "docs"


def _packed_overrides(data, run_dir, iters):
    return [f"launch.run_dir={run_dir}", "mock_data=false", f"data_path=[{data}]", "split=98,2,0",
            "reset_attention_mask=true", "eod_mask_loss=true", f"train_iters={iters}", "log_interval=1",
            "eval_interval=null", "save_interval=null", "seq_length=128", "micro_batch_size=2",
            "global_batch_size=8", "lr_warmup_iters=2"]


@pytest.mark.skipif(not DEMO.exists(), reason="configs/demo.yaml not present")
def test_packed_tensor_parallel_and_restart(tmp_path, packed_data):
    run = tmp_path / "tp2"
    common = _packed_overrides(packed_data, run, 6) + ["tensor_model_parallel_size=2"]
    out = _torchrun(2, DEMO, *common)
    assert "TP 2 x PP 1 x CP 1 x DP 1" in out
    rec = _records(run / "metrics.jsonl")
    losses = [r["loss"] for r in rec]
    assert len(losses) == 6 and losses[-1] < losses[0]
    # A restarted job with a longer schedule continues from its own `latest`.
    out = _torchrun(2, DEMO, *common[:-1], "tensor_model_parallel_size=2", "train_iters=8")
    assert "at iteration 6" in out
    assert [r["iteration"] for r in _records(run / "metrics.jsonl")] == list(range(1, 9))
    # Resuming with another tensor-parallel size is refused before any
    # state is read, naming both layouts; the checkpoint stays as it was.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "0",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", "127.0.0.1:0", "-m", "fox_megatron.train",
           "--config", str(DEMO), "--set", *common[:-1], "tensor_model_parallel_size=1", "train_iters=10"]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    assert "saved with TP 2 x PP 1; this run has TP 1 x PP 1" in proc.stdout + proc.stderr
    assert (run / "checkpoints" / "latest").read_text().strip() == "iter_0000008"


@pytest.mark.skipif(not DEMO.exists(), reason="configs/demo.yaml not present")
def test_baseline_transformer_packed(tmp_path, packed_data):
    run = tmp_path / "base"
    out = _run([sys.executable, "-m", "fox_megatron.train", "--config", str(DEMO), "--set",
                *_packed_overrides(packed_data, run, 4), "fox.enabled=false", "fox.acp=false",
                "position_embedding_type=rope", "launch.nproc_per_node=1"])
    assert "standard transformer" in out
    rec = _records(run / "metrics.jsonl")
    assert len(rec) == 4 and all(r["acp_kept_fraction"] is None for r in rec)
    assert rec[-1]["loss"] < rec[0]["loss"]
