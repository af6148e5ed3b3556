"""The header and the writing of a benchmark result file (BENCH.md, "Result files").

Every script here that times kernels or models on a GPU starts its result
with ``run_header()``: the GPU's name, the torch and Triton versions, the
date and the command line that ran it, which tests/test_results_metadata.py
asks of every committed ``benchmarks/results/*.json``; ``write_result``
writes the document there (indented, its folder made if missing).
"""

from __future__ import annotations

import datetime
import json
import os
import sys


def command_line() -> str:
    """The command that ran this script, as a user would type it."""
    return " ".join(["python"] + sys.argv)


def run_header(gpus: int | None = None, **extra) -> dict:
    """{gpu, [gpus], torch, triton, date, command} of this run, then extra's
    fields; gpu is "cpu" on a machine without one."""
    import torch
    import triton

    doc = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    if gpus is not None:
        doc["gpus"] = gpus
    doc.update(torch=torch.__version__, triton=triton.__version__, date=datetime.date.today().isoformat(),
               command=command_line())
    doc.update(extra)
    return doc


def write_result(path: str, doc: dict) -> None:
    """doc as indented JSON at path (its folder made if missing)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
