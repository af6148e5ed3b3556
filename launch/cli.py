"""fox-launch: a YAML config -> a validated run, through torchrun or SLURM.

    fox-launch CONFIG.yaml [--set key=value ...] [--dry-run]
               [--local | --slurm] [--print-sbatch] [--print-config]
               [--node-rank N] [--master-addr ADDR]

Steps: load the config and apply overrides, validate it (one line naming the
key on error, before anything starts), make its paths absolute, write the
resolved config to <run_dir>/config.yaml, then
  local, one node:    run torchrun here; its exit status becomes ours;
  local, many nodes:  --dry-run prints the torchrun line for every node;
                      --node-rank N runs node N's line here;
  slurm:              write <run_dir>/sbatch.sh and submit it with sbatch.
--dry-run writes the resolved config (and the sbatch script) so that what it
prints can be run as shown, but starts no process and submits no job.

No torch import here: this runs on login nodes without torch.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from fox_megatron.config import ConfigError, dump_config, load_config, resolve_run_paths, validate

from . import slurm
from .torchrun import LaunchError, config_path, local_command, node_commands, run_env, shell_join


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fox-launch",
        description="Validate a fox-megatron YAML config and run it with torchrun or submit it to SLURM.",
    )
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("--set", dest="overrides", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
                   help="override a config key (dotted for blocks: fox.acp=true, launch.nproc_per_node=8); "
                        "values are YAML scalars")
    p.add_argument("--dry-run", action="store_true",
                   help="validate and print what would run; start nothing, submit nothing")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--local", dest="scheduler", action="store_const", const="local",
                       help="run torchrun on this machine (overrides launch.scheduler)")
    where.add_argument("--slurm", dest="scheduler", action="store_const", const="slurm",
                       help="submit an sbatch job (overrides launch.scheduler)")
    p.add_argument("--print-sbatch", action="store_true",
                   help="print only the sbatch script (implies --slurm; submits nothing)")
    p.add_argument("--print-config", action="store_true",
                   help="print only the resolved config as YAML and exit")
    p.add_argument("--node-rank", type=int, default=None,
                   help="multi-node without SLURM: run this node's share (0 .. nnodes-1)")
    p.add_argument("--master-addr", default=None,
                   help="multi-node without SLURM: address of node 0 (the rendezvous host)")
    p.add_argument("--skip-file-checks", action="store_true",
                   help="do not require data and tokenizer files to exist here "
                        "(e.g. they exist only on the compute nodes)")
    p.add_argument("--run-name", default=None,
                   help="name of the run (default: the config file name); sets runs/<name> as run dir")
    return p


def _fail(msg: str, code: int = 2) -> int:
    print(f"fox-launch: error: {msg}", file=sys.stderr)
    return code


def _run(cmd: list[str], env: dict[str, str]) -> int:
    """Run torchrun in the foreground; pass its exit status through. Ctrl-C
    reaches torchrun directly (same process group); we only wait for it."""
    full_env = dict(os.environ)
    full_env.update(env)
    proc = subprocess.Popen(cmd, env=full_env)
    while True:
        try:
            rc = proc.wait()
            break
        except KeyboardInterrupt:
            continue  # torchrun got the same SIGINT and shuts its workers down
    if rc < 0:  # killed by a signal: report it the way a shell would
        return 128 + (-rc)
    return rc


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.print_sbatch:
        args.scheduler = "slurm"
    name = args.run_name or Path(args.config).stem

    inspect_only = args.dry_run or args.print_sbatch or args.print_config
    try:
        cfg = load_config(args.config, args.overrides)
        validate(cfg, check_files=False)
    except ConfigError as e:
        return _fail(str(e))
    if not args.skip_file_checks:
        try:
            validate(cfg, check_files=True)
        except ConfigError as e:
            if not inspect_only:
                return _fail(str(e))
            # Inspecting a cluster recipe on a machine without its data is
            # fine; launching it is not.
            print(f"fox-launch: warning: {e} (a real launch stops here)", file=sys.stderr)
    resolve_run_paths(cfg, name)
    la = cfg.launch
    scheduler = args.scheduler or la.scheduler

    if args.master_addr is not None:
        la.master_addr = args.master_addr
    if args.node_rank is not None and not 0 <= args.node_rank < la.nnodes:
        return _fail(f"--node-rank: {args.node_rank} is not in 0 .. launch.nnodes-1 = {la.nnodes - 1}")

    if args.print_config:
        import yaml

        sys.stdout.write(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0

    cfg_file = config_path(cfg)
    env = run_env(cfg)

    if scheduler == "slurm":
        script = slurm.render_sbatch(cfg, name)
        if args.print_sbatch:
            sys.stdout.write(script)
            return 0
        dump_config(cfg, cfg_file)
        script_path = os.path.join(la.run_dir, slurm.SCRIPT_NAME)
        Path(script_path).write_text(script)
        if args.dry_run:
            print(f"# resolved config: {cfg_file}")
            print(f"# sbatch script:   {script_path} (not submitted: --dry-run)")
            print(script, end="")
            return 0
        try:
            job_id = slurm.submit(script_path)
        except (FileNotFoundError, RuntimeError) as e:
            return _fail(str(e), 1)
        Path(la.run_dir, slurm.JOB_ID_FILE).write_text(job_id + "\n")
        print(f"Submitted job {job_id}: {la.nnodes} node(s) x {la.nproc_per_node} process(es)")
        print(f"  run dir: {la.run_dir}")
        print(f"  output:  {slurm.output_path(cfg).replace('%j', job_id)}")
        return 0

    # Local torchrun.
    env_prefix = " ".join(f"{k}={shell_join([v])}" for k, v in env.items())
    if la.nnodes == 1:
        cmd = local_command(cfg)
        line = f"{env_prefix} {shell_join(cmd)}"
        dump_config(cfg, cfg_file)
        if args.dry_run:
            print(f"# resolved config: {cfg_file}")
            print(line)
            return 0
        Path(la.run_dir, "command.sh").write_text("#!/bin/sh\n" + line + "\n")
        print(f"fox-launch: {line}", file=sys.stderr, flush=True)
        return _run(cmd, env)

    try:
        cmds = node_commands(cfg, args.master_addr)
    except LaunchError as e:
        return _fail(str(e))
    dump_config(cfg, cfg_file)
    if args.dry_run:
        print(f"# resolved config: {cfg_file} (must be readable at this path on every node)")
        for rank, cmd in enumerate(cmds):
            print(f"# node {rank}:")
            print(f"{env_prefix} {shell_join(cmd)}")
        return 0
    if args.node_rank is None:
        return _fail(f"launch.nnodes: {la.nnodes} nodes without SLURM: run this on every node with "
                     "--node-rank N (or use --slurm; --dry-run prints each node's command)")
    cmd = cmds[args.node_rank]
    print(f"fox-launch: node {args.node_rank}: {env_prefix} {shell_join(cmd)}", file=sys.stderr, flush=True)
    return _run(cmd, env)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
