"""Atomic checkpoints: a crash mid-save never changes what `latest` names."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fox_megatron.train import checkpoint as ckpt


def _writer(value):
    def write(tmp_dir):
        ckpt.torch_save({"value": value}, os.path.join(tmp_dir, "torch", "mp_rank_00_000.pt"))

    return write


def _value(ckpt_dir):
    return torch.load(os.path.join(ckpt_dir, "torch", "mp_rank_00_000.pt"))["value"]


def test_save_publishes_latest(tmp_path):
    save = str(tmp_path / "ckpt")
    assert ckpt.resolve_checkpoint(save) is None
    ckpt.save_checkpoint(save, 10, _writer(1), {"consumed_samples": 80})
    ckpt.save_checkpoint(save, 20, _writer(2), {"consumed_samples": 160})
    found, it = ckpt.latest_iteration(save)
    assert it == 20 and found.endswith("iter_0000020") and _value(found) == 2
    assert open(os.path.join(save, "latest")).read().strip() == "iter_0000020"
    meta = ckpt.read_meta(found)
    assert meta["consumed_samples"] == 160 and meta["iteration"] == 20
    assert os.path.isfile(os.path.join(found, "rng", "rank_00000.pt"))
    # An iteration directory can be named directly.
    assert ckpt.resolve_checkpoint(os.path.join(save, "iter_0000010")).endswith("iter_0000010")
    # Saving the same iteration again replaces it.
    ckpt.save_checkpoint(save, 20, _writer(3), {"consumed_samples": 160})
    assert _value(ckpt.resolve_checkpoint(save)) == 3
    assert sorted(os.listdir(save)) == ["iter_0000010", "iter_0000020", "latest"]


def test_exception_mid_save_keeps_previous(tmp_path):
    save = str(tmp_path / "ckpt")
    ckpt.save_checkpoint(save, 10, _writer(1), {})

    def failing(tmp_dir):
        _writer(2)(tmp_dir)
        raise RuntimeError("disk full")

    try:
        ckpt.save_checkpoint(save, 20, failing, {})
    except RuntimeError:
        pass
    found = ckpt.resolve_checkpoint(save)
    assert found.endswith("iter_0000010") and _value(found) == 1
    assert not os.path.exists(os.path.join(save, "iter_0000020"))
    # The next save clears the half-written directory.
    ckpt.save_checkpoint(save, 30, _writer(3), {})
    assert sorted(os.listdir(save)) == ["iter_0000010", "iter_0000030", "latest"]


def test_hard_crash_mid_save_keeps_previous(tmp_path):
    """The process dies (no exception handling, no cleanup) after writing
    part of the new checkpoint; `latest` still names the old one."""
    save = str(tmp_path / "ckpt")
    ckpt.save_checkpoint(save, 10, _writer(1), {})
    script = textwrap.dedent(
        f"""
        import os
        from fox_megatron.train import checkpoint as ckpt

        def write(tmp_dir):
            ckpt.torch_save({{"value": 2}}, os.path.join(tmp_dir, "torch", "mp_rank_00_000.pt"))
            os._exit(9)  # killed mid-save

        ckpt.save_checkpoint({save!r}, 20, write, {{}})
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    assert os.path.isdir(os.path.join(save, "iter_0000020.tmp"))
    found = ckpt.resolve_checkpoint(save)
    assert found.endswith("iter_0000010") and _value(found) == 1
    # Crash after the rename but before `latest` moved: the new directory is
    # complete, yet `latest` still names the old one until it is replaced.
    script2 = script.replace("os._exit(9)  # killed mid-save", "pass").replace(
        "ckpt.save_checkpoint(", "ckpt.write_text_atomic = lambda *a: os._exit(7)\nckpt.save_checkpoint("
    )
    proc = subprocess.run([sys.executable, "-c", script2], capture_output=True, text=True)
    assert proc.returncode == 7, proc.stderr
    assert ckpt.resolve_checkpoint(save).endswith("iter_0000010")
    assert ckpt.is_complete(os.path.join(save, "iter_0000020"))


def test_rng_roundtrip(tmp_path):
    save = str(tmp_path / "ckpt")
    torch.manual_seed(3)
    final = ckpt.save_checkpoint(save, 1, lambda d: None, {})
    expected = torch.rand(4)
    torch.manual_seed(99)
    assert ckpt.restore_rng_state(final)
    assert torch.equal(torch.rand(4), expected)


def test_adam_steps_restored_after_a_load_that_shares_and_resets_them():
    # megatron-core's distributed optimizer (without Apex/TE) loads one step
    # tensor into every parameter's state and then overwrites its value with
    # the pre-load count; the trainer restores the saved count per parameter
    from fox_megatron.train.engine_gpu import restore_adam_steps, saved_adam_step

    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(4)]
    opt = torch.optim.AdamW(params, lr=1e-3)
    for p in params:
        p.grad = torch.ones(3)
    opt.step()
    sd = opt.state_dict()
    shared = torch.tensor(0.0)
    for s in sd["state"].values():
        s["step"] = shared
    opt.load_state_dict(sd)
    # the distributed optimizer's saved state: nested, the count in param groups
    saved = {0: {"optimizer": {"param_groups": [{"lr": 1.0, "step": 6}, {"lr": 1.0, "step": 6}]}},
             1: {"optimizer": {"param_groups": [{"step": 6}]}, "param_state": [{"step": None}]}}
    step = saved_adam_step(saved)
    assert step == 6.0
    restore_adam_steps(opt, step)
    opt.step()
    assert [float(opt.state[p]["step"]) for p in params] == [7.0] * 4
    assert saved_adam_step({"optimizer": {"param_groups": [{"lr": 1.0}]}}) is None
    with pytest.raises(RuntimeError, match="different Adam step"):
        saved_adam_step([{"param_groups": [{"step": 6}]}, {"param_groups": [{"step": 5}]}])


def test_resume_layout_check():
    """Another TP or PP size than the checkpoint's is refused with both
    layouts named; another DP size, and checkpoints that recorded no
    layout, pass."""
    meta = {"parallel": {"tp": 2, "pp": 1, "cp": 1, "dp": 4, "world_size": 8}}
    ckpt.check_layout("ck", meta, tp=2, pp=1)  # DP may change: not asked
    ckpt.check_layout("ck", {}, tp=4, pp=2)
    with pytest.raises(SystemExit, match=r"ck was saved with TP 2 x PP 1; this run has TP 1 x PP 1"):
        ckpt.check_layout("ck", meta, tp=1, pp=1)
    with pytest.raises(SystemExit, match=r"this run has TP 2 x PP 2"):
        ckpt.check_layout("ck", meta, tp=2, pp=2)
