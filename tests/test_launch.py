"""fox-launch: torchrun command lines, sbatch scripts, dry runs, exit codes.

No process here starts torch: a stand-in interpreter (launch.python) records
the command line it was given, and stand-ins for sbatch/srun/scontrol play
SLURM's part.
"""

import json
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fox_megatron.config import load_config, resolve_run_paths
from fox_megatron.launch import cli, slurm
from fox_megatron.launch.torchrun import local_command, node_commands, run_env

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "configs" / "demo.yaml"
PRESET = REPO / "configs" / "fox_pro_760m_16k.yaml"


def write_exe(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def fake_python(tmp_path):
    """Stand-in for the trainer's interpreter: appends its argv (one JSON list
    per call, with FOX_DEVICE and SLURM_NODEID) to calls.jsonl, exits with
    $FAKE_RC."""
    log = tmp_path / "calls.jsonl"
    exe = write_exe(tmp_path / "fake-python", f"""
{shlex.quote(sys.executable)} - "$@" <<'EOF'
import json, os, sys
with open({str(log)!r}, "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "FOX_DEVICE": os.environ.get("FOX_DEVICE"),
                        "node": os.environ.get("SLURM_NODEID"),
                        "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}}) + "\\n")
EOF
exit "${{FAKE_RC:-0}}"
""")

    return _Recorder(exe, log)


class _Recorder:
    def __init__(self, exe: Path, log: Path):
        self.exe, self.log = exe, log

    def __str__(self):
        return str(self.exe)

    def calls(self):
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]


def opt(argv, name):
    return argv[argv.index(name) + 1]


def launch(*argv):
    return cli.main([str(a) for a in argv])


# --- torchrun command lines ---


def test_local_command_one_node(tmp_path):
    cfg = load_config(DEMO, [f"launch.run_dir={tmp_path}/run", "launch.master_port=29555"])
    resolve_run_paths(cfg, "demo")
    cmd = local_command(cfg)
    assert cmd[1:] == ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                       "--master_addr", "127.0.0.1", "--master_port", "29555",
                       "-m", "fox_megatron.train", "--config", f"{tmp_path}/run/config.yaml"]
    assert cmd[0] == sys.executable


def test_max_restarts_reach_torchrun(tmp_path):
    cfg = load_config(DEMO, [f"launch.run_dir={tmp_path}/run", "launch.max_restarts=3",
                             "launch.master_port=29556"])
    resolve_run_paths(cfg, "demo")
    cmd = local_command(cfg)
    # restarts go through a c10d rendezvous, even on one node, whose store
    # the workers do not share
    assert opt(cmd, "--max-restarts") == "3" and opt(cmd, "--rdzv_backend") == "c10d"
    assert opt(cmd, "--rdzv_endpoint") == "127.0.0.1:29556" and opt(cmd, "--rdzv_id") == "run"
    assert run_env(cfg)["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    plain = load_config(DEMO, [f"launch.run_dir={tmp_path}/r0"])
    assert "--max-restarts" not in local_command(plain) and "--master_port" in local_command(plain)
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in run_env(plain)
    for config in (PRESET, DEMO):  # many nodes, one node
        _, script = render(config, f"launch.run_dir={tmp_path}/s", "launch.max_restarts=2", name="p")
        srun = [line for line in script.splitlines() if line.startswith("srun ")]
        assert "--max-restarts 2" in srun[0] and "--rdzv_backend c10d" in srun[0], srun
        assert "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in script


def test_local_command_picks_free_port(tmp_path):
    cfg = load_config(DEMO, [f"launch.run_dir={tmp_path}"])
    resolve_run_paths(cfg, "demo")
    port = int(opt(local_command(cfg), "--master_port"))
    assert 0 < port < 65536


def test_node_commands_static(tmp_path):
    cfg = load_config(PRESET, [f"launch.run_dir={tmp_path}", "launch.rdzv_backend=static",
                               "launch.nnodes=3", "launch.master_port=6000", "global_batch_size=96"])
    resolve_run_paths(cfg, "x")
    cmds = node_commands(cfg, master_addr="10.1.2.3")
    assert len(cmds) == 3
    for rank, cmd in enumerate(cmds):
        assert opt(cmd, "--nnodes") == "3" and opt(cmd, "--nproc_per_node") == "8"
        assert opt(cmd, "--node_rank") == str(rank)
        assert opt(cmd, "--master_addr") == "10.1.2.3" and opt(cmd, "--master_port") == "6000"


def test_node_commands_c10d(tmp_path):
    cfg = load_config(PRESET, [f"launch.run_dir={tmp_path}/r", "launch.rdzv_endpoint=head:7000"])
    resolve_run_paths(cfg, "x")
    cmds = node_commands(cfg)
    assert len(cmds) == 2 and cmds[0] == cmds[1]  # the rendezvous assigns ranks
    cmd = cmds[0]
    assert opt(cmd, "--rdzv_backend") == "c10d" and opt(cmd, "--rdzv_endpoint") == "head:7000"
    assert opt(cmd, "--rdzv_id") == "r" and "--node_rank" not in cmd


def test_multi_node_dry_run_prints_every_node(tmp_path, capsys):
    rc = launch(PRESET, "--local", "--dry-run", "--master-addr", "node0", "--skip-file-checks",
                "--set", f"launch.run_dir={tmp_path}")
    assert rc == 0
    out = capsys.readouterr().out
    assert "# node 0:" in out and "# node 1:" in out
    lines = [line for line in out.splitlines() if "torch.distributed.run" in line]
    assert len(lines) == 2
    argv = shlex.split(lines[0])
    assert argv[:2] == ["FOX_DEVICE=cuda", "CUDA_DEVICE_MAX_CONNECTIONS=1"]
    assert opt(argv, "--rdzv_endpoint") == "node0:29500"
    assert (tmp_path / "config.yaml").exists()  # so that the printed lines can run as shown


def test_multi_node_needs_an_address(tmp_path, capsys):
    rc = launch(PRESET, "--local", "--dry-run", "--skip-file-checks", "--set", f"launch.run_dir={tmp_path}")
    assert rc == 2
    assert "launch.rdzv_endpoint" in capsys.readouterr().err


def test_multi_node_run_needs_node_rank(tmp_path, capsys, fake_python):
    rc = launch(PRESET, "--local", "--master-addr", "node0", "--skip-file-checks",
                "--set", f"launch.run_dir={tmp_path}", f"launch.python={fake_python}")
    assert rc == 2 and "--node-rank" in capsys.readouterr().err
    assert fake_python.calls() == []


def test_multi_node_runs_this_nodes_share(tmp_path, fake_python):
    rc = launch(PRESET, "--local", "--node-rank", "1", "--master-addr", "10.0.0.1", "--skip-file-checks",
                "--set", f"launch.run_dir={tmp_path}", f"launch.python={fake_python}",
                "launch.rdzv_backend=static")
    assert rc == 0
    (call,) = fake_python.calls()
    assert opt(call["argv"], "--node_rank") == "1" and opt(call["argv"], "--master_addr") == "10.0.0.1"


def test_node_rank_out_of_range(tmp_path, capsys):
    rc = launch(PRESET, "--local", "--node-rank", "2", "--dry-run", "--skip-file-checks",
                "--set", f"launch.run_dir={tmp_path}")
    assert rc == 2 and "--node-rank" in capsys.readouterr().err


# --- local runs ---


def test_local_run_success(tmp_path, fake_python):
    run_dir = tmp_path / "run"
    rc = launch(DEMO, "--set", f"launch.run_dir={run_dir}", f"launch.python={fake_python}", "train_iters=17")
    assert rc == 0
    (call,) = fake_python.calls()
    argv = call["argv"]
    assert argv[:2] == ["-m", "torch.distributed.run"]
    assert argv[-4:] == ["-m", "fox_megatron.train", "--config", str(run_dir / "config.yaml")]
    assert call["FOX_DEVICE"] == "cpu" and call["cuda"] == ""
    # The resolved config carries the override, absolute paths and derived values.
    written = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert written["train_iters"] == 17
    assert written["launch"]["run_dir"] == str(run_dir)
    assert written["save"] == str(run_dir / "checkpoints")
    assert written["metrics_file"] == str(run_dir / "metrics.jsonl")
    assert written["ffn_hidden_size"] == 256
    assert (run_dir / "command.sh").exists()


def test_local_run_exit_code_propagates(tmp_path, fake_python, monkeypatch):
    monkeypatch.setenv("FAKE_RC", "3")
    rc = launch(DEMO, "--set", f"launch.run_dir={tmp_path}", f"launch.python={fake_python}")
    assert rc == 3


def test_local_dry_run_starts_nothing(tmp_path, fake_python, capsys):
    rc = launch(DEMO, "--dry-run", "--set", f"launch.run_dir={tmp_path}", f"launch.python={fake_python}")
    assert rc == 0
    assert fake_python.calls() == []
    out = capsys.readouterr().out
    (line,) = [l for l in out.splitlines() if not l.startswith("#")]
    argv = shlex.split(line)
    assert argv[0] == "FOX_DEVICE=cpu" and str(fake_python) in argv
    assert opt(argv, "--nproc_per_node") == "2"


def test_invalid_config_starts_nothing(tmp_path, fake_python, capsys):
    rc = launch(DEMO, "--set", f"launch.run_dir={tmp_path}", f"launch.python={fake_python}",
                "tensor_model_parallel_size=3")
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fox-launch: error: tensor_model_parallel_size:") and "\n" not in err
    assert fake_python.calls() == [] and not (tmp_path / "config.yaml").exists()


def test_missing_data_fails_a_real_launch(tmp_path, fake_python, capsys):
    rc = launch(DEMO, "--set", f"launch.run_dir={tmp_path}", f"launch.python={fake_python}",
                "mock_data=false", f"data_path={tmp_path}/nothing")
    assert rc == 2 and "data_path[0]" in capsys.readouterr().err
    assert fake_python.calls() == []


def test_print_config(tmp_path, capsys):
    assert launch(DEMO, "--print-config", "--set", f"launch.run_dir={tmp_path}", "fox.acp=false") == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["fox"]["acp"] is False and printed["launch"]["run_dir"] == str(tmp_path)


def test_python_dash_m_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fox_megatron.launch", str(DEMO), "--dry-run",
                           "--set", f"launch.run_dir={tmp_path}"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "torch.distributed.run" in proc.stdout


# --- SLURM ---


def render(config, *overrides, name="x"):
    cfg = load_config(config, list(overrides))
    resolve_run_paths(cfg, name)
    return cfg, slurm.render_sbatch(cfg, name, workdir="/work/dir")


def directives(script):
    return [l[len("#SBATCH "):] for l in script.splitlines() if l.startswith("#SBATCH ")]


def test_sbatch_one_node(tmp_path):
    cfg, script = render(DEMO, f"launch.run_dir={tmp_path}", "launch.slurm.partition=debug",
                         "launch.slurm.account=proj", "launch.slurm.qos=normal",
                         "launch.slurm.extra_sbatch=['#SBATCH --constraint=x', '--hint=nomultithread']",
                         name="demo")
    d = directives(script)
    assert d[:3] == ["--job-name=fox-demo", "--nodes=1", "--ntasks-per-node=1"]
    for want in ("--cpus-per-task=2", "--time=00:10:00", "--partition=debug", "--account=proj",
                 "--qos=normal", f"--output={tmp_path}/slurm-%j.out", "--chdir=/work/dir",
                 "--constraint=x", "--hint=nomultithread"):
        assert want in d
    assert not any(x.startswith("--gpus-per-node") for x in d)  # a CPU run asks for no GPU
    assert 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)' in script
    assert "export FOX_DEVICE=cpu" in script and "export OMP_NUM_THREADS=1" in script
    srun = [l for l in script.splitlines() if l.startswith("srun ")]
    assert len(srun) == 1
    assert '--nnodes "$SLURM_NNODES"' in srun[0] and '--node_rank "$SLURM_NODEID"' in srun[0]
    assert f"--config {tmp_path}/config.yaml" in srun[0]
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # valid shell


def test_sbatch_many_nodes(tmp_path):
    cfg, script = render(PRESET, f"launch.run_dir={tmp_path}", "launch.slurm.error=err-%j.log",
                         "launch.slurm.setup=['source /opt/venv/bin/activate']", name="fox_pro_760m_16k")
    d = directives(script)
    assert "--nodes=2" in d and "--ntasks-per-node=1" in d and "--gpus-per-node=8" in d
    assert "--job-name=fox_pro_760m_16k" in d and "--exclusive" in d and "--mem=0" in d
    assert "--time=3-00:00:00" in d and f"--error={tmp_path}/err-%j.log" in d
    assert "source /opt/venv/bin/activate" in script
    assert "MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))" in script
    srun = [l for l in script.splitlines() if l.startswith("srun ")][0]
    assert "--cpu-bind=none" in srun and "--kill-on-bad-exit=1" in srun
    assert '--rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$SLURM_JOB_ID"' in srun
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_sbatch_static_rendezvous_and_fixed_port(tmp_path):
    _, script = render(PRESET, f"launch.run_dir={tmp_path}", "launch.rdzv_backend=static",
                       "launch.master_port=12345", "launch.slurm.gpus_per_node=4")
    assert "MASTER_PORT=12345" in script and "--gpus-per-node=4" in directives(script)
    assert '--node_rank "$SLURM_NODEID"' in script and "rdzv" not in script.split("srun ")[1]


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """sbatch that records its arguments and prints a job id; srun that runs
    the task once per node with SLURM_NODEID set; scontrol that lists hosts."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "sbatch.log"
    write_exe(bin_dir / "sbatch", f'echo "$@" >> {shlex.quote(str(log))}\necho "4242;cluster"\n')
    write_exe(bin_dir / "scontrol", 'echo node-a\necho node-b\n')
    write_exe(bin_dir / "srun", '''
while [[ "$1" == -* ]]; do shift; done
for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i "$@" || exit $?; done
''')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


def test_slurm_dry_run_submits_nothing(tmp_path, fake_slurm, capsys):
    run_dir = tmp_path / "run"
    rc = launch(DEMO, "--slurm", "--dry-run", "--set", f"launch.run_dir={run_dir}")
    assert rc == 0
    assert not fake_slurm.exists()
    out = capsys.readouterr().out
    assert "#SBATCH --nodes=1" in out and "not submitted" in out
    assert (run_dir / "sbatch.sh").exists() and (run_dir / "config.yaml").exists()
    assert not (run_dir / "slurm_job_id").exists()


def test_print_sbatch_only_prints(tmp_path, fake_slurm, capsys):
    rc = launch(DEMO, "--print-sbatch", "--set", f"launch.run_dir={tmp_path}/run")
    assert rc == 0 and not fake_slurm.exists()
    out = capsys.readouterr().out
    assert out.startswith("#!/bin/bash\n#SBATCH")
    assert not (tmp_path / "run").exists()


def test_slurm_submit_parses_job_id(tmp_path, fake_slurm, capsys):
    run_dir = tmp_path / "run"
    rc = launch(DEMO, "--slurm", "--set", f"launch.run_dir={run_dir}")
    assert rc == 0
    assert fake_slurm.read_text().split() == ["--parsable", str(run_dir / "sbatch.sh")]
    assert (run_dir / "slurm_job_id").read_text().strip() == "4242"
    assert "Submitted job 4242" in capsys.readouterr().out


def test_scheduler_from_config(tmp_path, fake_slurm):
    rc = launch(DEMO, "--set", f"launch.run_dir={tmp_path}", "launch.scheduler=slurm")
    assert rc == 0 and fake_slurm.exists()


def test_sbatch_failure_is_reported(tmp_path, monkeypatch, capsys):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_exe(bin_dir / "sbatch", 'echo "sbatch: error: invalid partition specified: nope" >&2\nexit 1\n')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    rc = launch(DEMO, "--slurm", "--set", f"launch.run_dir={tmp_path}/run", "launch.slurm.partition=nope")
    assert rc == 1 and "invalid partition" in capsys.readouterr().err


def test_parse_job_id():
    assert slurm.parse_job_id("123\n") == "123"
    assert slurm.parse_job_id("123;big\n") == "123"
    assert slurm.parse_job_id("Submitted batch job 77\n") == "77"
    with pytest.raises(RuntimeError):
        slurm.parse_job_id("sbatch: error")


@pytest.mark.parametrize("nnodes,backend", [(1, "c10d"), (3, "c10d"), (3, "static")])
def test_sbatch_script_runs_one_torchrun_per_node(tmp_path, fake_slurm, fake_python, nnodes, backend):
    """Execute the generated script with SLURM's variables and stand-in
    srun/scontrol: every node's torchrun gets the right rank and rendezvous."""
    cfg, script = render(PRESET, f"launch.run_dir={tmp_path}", f"launch.nnodes={nnodes}",
                         f"launch.python={fake_python}", f"launch.rdzv_backend={backend}",
                         f"global_batch_size={8 * nnodes}")
    env = dict(os.environ, SLURM_JOB_NODELIST="node-[a-b]", SLURM_NNODES=str(nnodes), SLURM_JOB_ID="31337")
    subprocess.run(["bash", "-c", script], env=env, check=True, cwd=tmp_path)
    calls = fake_python.calls()
    assert [c["node"] for c in calls] == [str(i) for i in range(nnodes)]
    for i, c in enumerate(calls):
        argv = c["argv"]
        assert opt(argv, "--nnodes") == str(nnodes) and c["FOX_DEVICE"] == "cuda"
        if nnodes == 1 or backend == "static":
            assert opt(argv, "--node_rank") == str(i)
            assert opt(argv, "--master_addr") == "node-a" and opt(argv, "--master_port") == str(20000 + 31337 % 20000)
        else:
            assert opt(argv, "--rdzv_endpoint") == f"node-a:{20000 + 31337 % 20000}"
            assert opt(argv, "--rdzv_id") == "31337"


# --- no torch on login nodes ---


def test_no_torch_import(tmp_path):
    """The config and the launcher work when torch cannot be imported."""
    code = f"""
import sys
sys.modules["torch"] = None  # any "import torch" now raises ImportError
import fox_megatron.config, fox_megatron.launch, fox_megatron.launch.cli
from fox_megatron.launch.cli import main
assert main([{str(DEMO)!r}, "--dry-run", "--set", "launch.run_dir={tmp_path}/a"]) == 0
assert main([{str(PRESET)!r}, "--print-sbatch", "--skip-file-checks", "--set", "launch.run_dir={tmp_path}/b"]) == 0
assert main([{str(PRESET)!r}, "--local", "--dry-run", "--master-addr", "n0", "--skip-file-checks",
             "--set", "launch.run_dir={tmp_path}/c"]) == 0
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
