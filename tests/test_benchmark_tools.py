"""Benchmark tools on the CPU.

- The scaling sweep's plumbing: benchmarks/scaling.py launches the demo
  config through fox-launch on 1 and 2 processes (weak scaling over data
  parallel) and writes BENCH.md scaling records.  CPU throughput says
  nothing about GPUs; what is checked is that every record is complete and
  consistent with the runs it came from.
- The ACP work model (benchmarks/acp_work_model.py) counts tiles by its own
  copy of the kernels' tile rule: its kept tiles must be the boundary
  kernel's; it reads the Hopper kernels' profiles by their names.
- The gate-gradient rounding emulation (benchmarks/gate_grad_rounding.py)
  tells the row sums of dS from none.
- kernel_versions.py's plumbing: loading the base module, capturing and
  replaying a launch.
- acp_probe.py's uniform gates keep as many tiles as the gates they stand
  in for.
- train_step.py --repeats interleaves the variants' runs and combines each
  variant's runs into one record (median, every run, spread).
- fwd_timeline.py's stamps still apply to the Gluon forward's source and
  compile for sm_90; its summary reads phases off the stamps.  So do
  dkdv_timeline.py's to the Gluon dK / dV kernel's (with and without the
  fused dQ).
- tree_ab.py refuses a base that is not a checkout of the project.
- result_file.py's header carries what every committed result must (GPU,
  versions, date, the command as typed) and its writer makes the folder.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def test_work_model_counts_the_kernels_kept_tiles():
    import math

    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    from acp_work_model import paper_like_decay, tile_counts

    from fox_megatron.kernels.forgetting_attn.interface import SequenceTable
    from fox_megatron.kernels.forgetting_attn.triton_ops import _PairTable, block_boundaries

    # 4 documents of 300 tokens, 6 heads; float32 decays, time innermost, as
    # the kernel reads and compares them (float64 arithmetic would round a
    # tile on the edge the other way)
    c = paper_like_decay(2, 600, 6, 2, seed=3).float().contiguous()
    S, H, T = c.shape
    thr = torch.full((S, H), -2 * math.sqrt(16) - math.log(T) - 10.0)
    pairs = _PairTable.self_attention(SequenceTable.build(S, T, None, "cpu"))
    for bm, bn in ((64, 32), (32, 64)):
        tiles = torch.empty(S, H, 2, dtype=torch.int32)
        block_boundaries(c, c, pairs, thr, bm, bn, True, want_kblo=True, tiles=tiles)
        _, plain, masked = tile_counts("fwd", c, thr, bm, bn, acp=True)
        _, plain_d, masked_d = tile_counts("fwd", c, thr, bm, bn, acp=False)
        assert plain + masked == int(tiles[..., 0].sum())  # kept tiles
        assert plain_d + masked_d == int(tiles[..., 1].sum())  # causal tiles
        assert 0 < plain + masked < plain_d + masked_d  # something pruned, something kept
        # the dK / dV kernel's query ranges: from its diagonal block to the kept end
        _, qbhi = block_boundaries(c, c, pairs, thr, bm, bn, True, want_kblo=False, want_qbhi=True)
        diag_first = (torch.arange(qbhi.shape[-1]) * bn) // bm
        _, plain, masked = tile_counts("dkdv", c, thr, bm, bn, acp=True)
        assert plain + masked == int((qbhi - diag_first).clamp_min(0).sum())


def test_work_model_reads_the_gluon_kernels_profiles():
    """The gluon_dispatch set reads the Hopper kernels' names from its
    profiles, with their own tile shapes: no dQ kernel at head dim 128 (the
    fused dK / dV kernel does its work), all three at head dim 64."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import acp_work_model as model

    names, blocks = model.SET_KERNELS["gluon_dispatch"]
    rows = model.load_profiles(model.PROFILE_SETS["gluon_dispatch"], names)
    assert {(r["L"], r["docs"], r["acp"]) for r in rows} == {(L, d, a) for L, d in ((16384, 1), (8192, 1), (4096, 8))
                                                              for a in (False, True)}
    for r in rows:
        assert set(r["ms"]) == ({"fwd", "dkdv", "dq"} if r["D"] == 64 else {"fwd", "dkdv"}), r
        assert all(ms > 0 for ms in r["ms"].values())
    assert blocks("fwd", 64) == blocks("fwd", 128) == (128, 128) and blocks("dkdv", 64) == (64, 128)
    # the dQ kernel is Triton's: its configured tiles
    assert blocks("dq", 64) == model.triton_blocks("dq", 64)


def test_kernel_ab_dispatch_option():
    """kernel_ab.py --dispatch sets gluon_bwd.DISPATCH rows for a run (to time
    a mode the defaults do not run, such as the fused dQ without ACP);
    anything but 'D=MODE,MODE' with known modes is refused."""
    sys.path.insert(0, str(REPO))
    from benchmarks.kernel_ab import parse_dispatch

    assert parse_dispatch("128=fused,fused;64=none,dkdv") == {128: ("fused", "fused"), 64: (None, "dkdv")}
    for bad in ("128=fast,dkdv", "128=dkdv", "x=dkdv,dkdv"):
        with pytest.raises(SystemExit, match="--dispatch"):
            parse_dispatch(bad)


def test_kernel_versions_loads_the_base_and_replays_the_launch(tmp_path):
    """kernel_versions.py: the base file loads as a module of the kernels'
    package (its relative imports resolve) beside the tree's; the launch's
    arguments are captured as called; each replay gets zeroed copies of the
    tensors the launch writes (outputs and accumulator tuples) and the same
    inputs."""
    sys.path.insert(0, str(REPO))
    pytest.importorskip("triton")
    import torch

    from benchmarks import kernel_versions as kv
    from fox_megatron.kernels.forgetting_attn import gluon_fwd

    copy = tmp_path / "gluon_fwd_copy.py"
    copy.write_text((REPO / "kernels" / "forgetting_attn" / "gluon_fwd.py").read_text() + "\nCOPY_MARKER = 7\n")
    base = kv.load_base(str(copy), "fwd")
    assert base is not gluon_fwd and base.COPY_MARKER == 7 and base.CONFIGS == gluon_fwd.CONFIGS
    assert not hasattr(gluon_fwd, "COPY_MARKER")

    class Module:
        @staticmethod
        def launch(*args):
            return len(args)

    original = Module.launch
    assert kv.capture(Module, "launch", lambda: Module.launch(1, 2, 3)) == (1, 2, 3)
    assert Module.launch is original
    with pytest.raises(SystemExit, match="was not called"):
        kv.capture(Module, "launch", lambda: None)

    x, out, acc = torch.ones(3), torch.ones(2), (torch.ones(4), torch.ones(5))
    args, written = kv.fresh((x, out, 0.5, acc), outputs=(1,), accumulators=(3,))
    assert args[0] is x and args[2] == 0.5
    assert args[1] is not out and args[3][0] is not acc[0]
    assert [t.shape[0] for t in written] == [2, 4, 5] and all(bool((t == 0).all()) for t in written)
    assert bool((out == 1).all()) and bool((acc[1] == 1).all())
    # an accumulator position the call does not have (the dK / dV launch without the fused dQ)
    args, written = kv.fresh((x, out), outputs=(1,), accumulators=(3,))
    assert len(args) == 2 and len(written) == 1


def test_gate_gradient_needs_the_row_sums_of_ds():
    """benchmarks/gate_grad_rounding.py: in an emulation of the kernels'
    rounding, the gate gradient taken from dS's row and column sums stays
    near float64, and dropping the row sums (zero in exact arithmetic) costs
    accuracy for a fast-forgetting head."""
    sys.path.insert(0, str(REPO))
    import torch

    from benchmarks.gate_grad_rounding import one_head

    row = one_head(256, 64, 1.0, torch.Generator().manual_seed(0))
    assert row["rows_cols_fp32"]["max_rel"] < 1e-2 and row["rows_cols_bf16"]["max_rel"] < 1e-2
    assert row["cols_only_bf16"]["rms_rel"] > 3 * row["rows_cols_bf16"]["rms_rel"]


def test_probe_uniform_gates_keep_the_target_fraction():
    """acp_probe's ``uniform`` case: one decay rate for every head, found by
    bisection on the kept fraction (the CPU path applies the same pruning
    rule as the kernels)."""
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "benchmarks"))
    import acp_probe
    from attention import paper_like_inputs

    from fox_megatron.kernels import AcpConfig

    q, k, v, log_f = paper_like_inputs(1, 512, 4, 32, seed=3, device="cpu")
    acp = AcpConfig(logit_bound=32 ** 0.5)
    target = acp_probe.kept_fraction(q, k, v, log_f.detach(), acp)
    assert 0.2 < target < 0.95  # the paper-like heads prune some tiles, not all
    gates = acp_probe.uniform_gates(log_f.detach(), target, q, k, v, acp, iters=16)
    assert (gates < 0).all()
    # one rate for every head: the heads' gates differ only by the shared noise
    assert torch.equal(gates[..., 0], gates[..., 3])
    assert abs(acp_probe.kept_fraction(q, k, v, gates, acp) - target) < 0.05


def test_train_step_repeats_interleave_and_combine(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO))
    from benchmarks import train_step

    order = []
    fake_tps = {"fox_pro_acp": [100.0, 130.0, 110.0], "fox_pro_full": [80.0, 90.0, 70.0],
                "transformer": [120.0, 100.0, 110.0]}

    def fake_run(config, label, overrides, iters, warmup, gpus, workdir):
        variant, rep = label.rsplit("_", 1)
        order.append(label)
        acp = "fox.acp=true" in overrides
        return {"tokens_per_s": fake_tps[variant][int(rep)], "tflops_per_gpu": 1.0 + int(rep), "mfu": 0.1,
                "peak_mem_gb": 10.0 + int(rep), "kept_fraction": 0.5 if acp else None, "L": 16384,
                "micro_batch_size": 1, "global_batch_size": 8, "steps_measured": 12, "final_loss": 5.0 - int(rep)}

    monkeypatch.setattr(train_step, "run_variant", fake_run)
    out = tmp_path / "train.json"
    monkeypatch.setattr(sys, "argv", ["train_step.py", "--fox", "configs/fox_pro_125m_16k.yaml", "--baseline",
                                      "configs/transformer_125m_16k.yaml", "--repeats", "3", "--out", str(out)])
    train_step.main()
    # A B C A B C A B C: drift between runs falls on every variant alike
    assert order == [f"{v}_{r}" for r in range(3) for v in ("fox_pro_acp", "fox_pro_full", "transformer")]
    result = json.loads(out.read_text())
    assert result["repeats"] == 3
    recs = {(r["model"], r["acp"]): r for r in result["records"]}
    acp = recs[("fox_pro", True)]
    assert acp["tokens_per_s"] == 110.0 and acp["tokens_per_s_runs"] == [100.0, 130.0, 110.0]
    assert acp["tokens_per_s_spread"] == pytest.approx(30.0 / 110.0)
    assert acp["peak_mem_gb"] == 12.0 and acp["tflops_per_gpu"] == 2.0 and acp["kept_fraction"] == 0.5
    assert recs[("fox_pro", False)]["tokens_per_s"] == 80.0
    assert recs[("transformer", False)]["tokens_per_s"] == 110.0 and recs[("transformer", False)]["kept_fraction"] is None


def test_train_step_rejects_zero_repeats(monkeypatch):
    sys.path.insert(0, str(REPO))
    from benchmarks import train_step

    monkeypatch.setattr(sys, "argv", ["train_step.py", "--fox", "a.yaml", "--baseline", "b.yaml", "--repeats", "0"])
    with pytest.raises(SystemExit):
        train_step.main()


@pytest.mark.parametrize("tool", ["fwd_timeline", "dkdv_timeline"])
def test_timeline_stamps_apply_and_compile(tool):
    pytest.importorskip("triton.experimental.gluon")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, f"benchmarks/{tool}.py", "--compile-only"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert proc.stdout.count("compiled:") == 4


def test_fwd_timeline_summary_reads_the_phases():
    sys.path.insert(0, str(REPO))
    from benchmarks import fwd_timeline as t

    def program(start, plain, masked, sm, clocks_per_ns=2.0):
        r = [0] * t.SLOTS
        ns = lambda x: int(x * clocks_per_ns)  # noqa: E731
        r[t.START], r[t.SM], r[t.TILES], r[t.MASKED] = start, sm, plain + masked, masked
        r[t.FIRST_TMA] = start + ns(500)
        r[t.FIRST_DATA] = start + ns(2000)
        r[t.FIRST_TILE] = r[t.FIRST_DATA] + ns(1700)
        r[t.LOOP_END] = r[t.FIRST_DATA] + ns(1000 + 1300 * plain + 2000 * masked)
        r[t.END] = r[t.LOOP_END] + ns(900)
        r[t.GT_START], r[t.GT_END] = 10_000, 10_000 + (r[t.END] - start) / clocks_per_ns
        return r

    a = program(4000, 2, 1, 7)
    b = program(a[t.END] + 3000, 8, 1, 7)  # 1.5 us later on the same SM
    c = program(5000, 4, 2, 8)
    d = program(6000, 6, 3, 9)
    s = t.summarise([a, b, [0] * t.SLOTS, c, d])
    assert s["programs"] == 4 and s["sms"] == 3 and s["clocks_per_ns"] == 2.0
    assert s["start_to_first_tma_us"] == pytest.approx(0.5) and s["start_to_first_data_us"] == pytest.approx(2.0)
    assert s["first_tile_us"] == pytest.approx(1.7) and s["epilogue_us"] == pytest.approx(0.9)
    assert s["gap_to_next_program_us"] == pytest.approx(1.5) and s["mean_masked_tiles"] == pytest.approx(1.75)
    fit = s["loop_fit_plain_masked_us"]
    assert fit["a"] == pytest.approx(1.0, abs=1e-3) and fit["b"] == pytest.approx(1.3, abs=1e-3)
    assert fit["c"] == pytest.approx(2.0, abs=1e-3)


def test_tree_ab_wants_a_checkout_as_its_base(tmp_path):
    # a base that is not a checkout of the project is refused with its name
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "tree_ab.py"), "--base", str(tmp_path)],
                         capture_output=True, text=True)
    assert run.returncode != 0 and "--base: expected a checkout of the project" in run.stderr
    assert str(tmp_path) in run.stderr


def test_result_header_and_writer(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO))
    from benchmarks.result_file import run_header, write_result

    import triton

    monkeypatch.setattr(sys, "argv", ["benchmarks/attention.py", "--lengths", "8192", "--out", "x.json"])
    doc = run_header(gpus=2, records=[1])
    assert doc["gpu"] == (torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    assert (doc["gpus"], doc["torch"], doc["triton"]) == (2, torch.__version__, triton.__version__)
    assert doc["command"] == "python benchmarks/attention.py --lengths 8192 --out x.json"
    assert len(doc["date"]) == 10 and doc["records"] == [1]
    assert "gpus" not in run_header()
    path = tmp_path / "new" / "folder" / "r.json"
    write_result(str(path), doc)
    assert json.loads(path.read_text()) == doc
