"""Every Triton and Gluon kernel compiles for an H100 / H200 (sm_90) on a machine without a GPU.

TRITON_INTERPRET=1 runs the kernels' semantics on the CPU but not Triton's
compiler, which is stricter (a name reused with another type inside a loop,
for one, becomes a loop-carried variable and fails to compile).  A worker
process without the interpreter takes every kernel through Triton's whole
pipeline down to a cubin for sm_90, with the argument types and the tile
shapes, warps and stages of the real launches.  The Gluon kernels' API
moves between Triton releases (the TMA load was renamed in 3.7): compiling
them with the installed Triton catches that before a GPU does.  The
worker also digests each kernel's machine code (``--sass-digest``), so that
a change meant to leave a kernel's code as it was can be checked without a
GPU.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = ["boundary_causal=True", "boundary_causal=False", "boundary_precise", "decay_scan", "decay_scan_precise",
         "decay_grad", "row_delta"] + [
    f"{kind}{precise}_d{d}" for kind in ("fwd", "dkdv", "dq") for precise in ("", "_precise") for d in (64, 128)] + [
    f"{kind}_accumulate_d{d}" for kind in ("fwd", "dq") for d in (64, 128)] + [
    f"dkdv_fp32_grads_d{d}" for d in (64, 128)] + [
    f"gluon_fwd{persistent}{precise}_d{d}" for persistent in ("", "_persistent") for precise in ("", "_precise")
    for d in (64, 128)] + [
    f"gluon_dkdv{dq}{precise}_d{d}" for dq in ("", "_dq", "_persistent", "_persistent_group1")
    for precise in ("", "_precise") for d in (64, 128)]


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "triton_compile_worker.py"), "--sass-digest"],
                          capture_output=True, text=True, timeout=1200, env=env)
    if proc.returncode != 0:
        pytest.fail(f"compile worker failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASES)
def test_kernel_compiles_for_sm90(compiled, case):
    assert compiled.get(case) == "ok", compiled.get(case, "case missing from the worker's report")


def test_only_precise_decays_do_float64_work(compiled):
    """float64 arithmetic in the tile loops costs 4-15% of a step: the
    default kernels must have none, the precise ones must have it."""
    f64 = compiled["f64_instructions"]
    for case in CASES:
        if "precise" in case:
            assert f64[case] > 0, case
        else:
            assert f64[case] == 0, (case, f64[case])


def test_machine_code_digests_tell_kernels_apart_and_repeat(compiled):
    """Every compiled case has a digest of its instructions; a second
    compile of a case gives the same digest, and kernels that differ (the
    persistent kernels and the per-block ones) give different ones."""
    digests = compiled["sass_digest"]
    assert set(CASES) <= set(digests)
    assert digests["gluon_fwd_d64"] != digests["gluon_fwd_persistent_d64"]
    assert digests["gluon_dkdv_d64"] != digests["gluon_dkdv_persistent_d64"]
    assert all(int(d.split(":")[1]) > 100 for d in digests.values())
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "triton_compile_worker.py"), "--sass-digest",
                           "gluon_fwd_d64"], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads(proc.stdout.strip().splitlines()[-1])
    assert again["sass_digest"] == {"gluon_fwd_d64": digests["gluon_fwd_d64"]}
