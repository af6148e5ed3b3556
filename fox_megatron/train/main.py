"""fox-train: the trainer's command line.

    python -m fox_megatron.train --config CONFIG.yaml [--set key=value ...]
    torchrun --nproc_per_node N -m fox_megatron.train --config CONFIG.yaml
    fox-train --config CONFIG.yaml
    fox-train prepare --input docs.jsonl --output-prefix data/docs   (see prepare.py)

Usually started by fox-launch, which validates the config, resolves its
paths and writes <run_dir>/config.yaml first; started by hand, the same
steps happen here (relative outputs go to runs/<config name>/).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="fox-train", description="Train a FoX / baseline GPT with megatron-core.")
    p.add_argument("--config", required=True, help="YAML run config (configs/*.yaml or <run_dir>/config.yaml)")
    p.add_argument("--set", dest="overrides", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
                   help="override config keys (dotted for blocks: fox.acp=false)")
    return p.parse_args(argv)


def load_run_config(path: str, overrides=()):
    from fox_megatron import config as C

    cfg = C.load_config(path, list(overrides))
    resolve = getattr(C, "resolve_run_paths", None)
    if resolve is not None:
        name = Path(path).stem
        if name == "config" and cfg.launch.run_dir is None:
            # <run_dir>/config.yaml written by fox-launch: the run dir is its folder.
            cfg.launch.run_dir = str(Path(path).resolve().parent)
        resolve(cfg, name=name)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    C.validate(cfg, world_size=world_size)
    return cfg


def _quiet_known_warnings() -> None:
    import warnings

    # megatron-core announces on every rank that optional accelerators (Apex,
    # Transformer Engine) are missing and that a config default is
    # deprecated; the run does not depend on either.
    for pattern in (r".*Apex.*not installed.*", r".*Transformer Engine.*not installed.*",
                    r".*full scope is deprecated.*"):
        warnings.filterwarnings("ignore", message=pattern)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["prepare"]:
        from .prepare import main as prepare_main

        return prepare_main(argv[1:])
    args = parse_args(argv)
    _quiet_known_warnings()
    from fox_megatron.config import ConfigError

    try:
        cfg = load_run_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"fox-train: error: {err}", file=sys.stderr)
        return 2

    from .loop import train
    from .parallel import shutdown

    try:
        result = train(cfg)
    except SystemExit as err:
        if isinstance(err.code, str):
            rank = os.environ.get("RANK", "0")
            print(f"fox-train: error (rank {rank}): {err.code}", file=sys.stderr, flush=True)
            return 1
        raise
    finally:
        shutdown()
    return result.get("exit_code", 0)


if __name__ == "__main__":
    sys.exit(main())
