"""Committed benchmark results carry what makes them comparable, and the README cites only files that exist.

Every JSON under benchmarks/results/ names the device it ran on, the torch
version, the date and the command(s) that produced it (top level, or per
run for files that collect several runs); every file that the README and
the kernels' history (benchmarks/kernel_history.md) link to is present.
Numbers in the README come from these files, so a missing or anonymous
file would leave a claim without its source.
"""

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
FILES = sorted(RESULTS.glob("*.json"))


def commands_of(result):
    if "command" in result:
        return [result["command"]]
    if "commands" in result:
        return list(result["commands"])
    return [run.get("command") for run in result.get("runs", [])]


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_result_file_says_where_when_and_how(path):
    result = json.loads(path.read_text())
    assert isinstance(result, dict), "a result file is one JSON object"
    assert result.get("gpu") or result.get("device"), "no device named"
    assert result.get("torch"), "no torch version"
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", str(result.get("date", ""))), "no ISO date"
    commands = commands_of(result)
    assert commands and all(isinstance(c, str) and c.strip() for c in commands), "no command"


@pytest.mark.parametrize("doc", ["README.md", "benchmarks/kernel_history.md"])
def test_docs_link_only_to_committed_files(doc):
    """Markdown links (relative to the document) point at files that exist;
    the README and the kernels' history cite result files."""
    path = REPO / doc
    links = [target for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()) if "://" not in target]
    assert any(target.endswith(".json") for target in links), f"{doc} cites no result file"
    missing = sorted({target for target in links if not (path.parent / target.split("#")[0]).is_file()})
    assert not missing, f"{doc} links to missing files: {missing}"
