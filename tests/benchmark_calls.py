"""What the benchmark tests share: a module of benchmarks/ loaded in this process
(`benchmark_module`), and a script run as `python benchmarks/SCRIPT ARGS`, checked to exit 0 and
print one JSON line (`completed`; `run` gives that line, parsed)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

from test_train_helpers import REPO


def benchmark_module(name: str):
    """A module of benchmarks/ (they import each other from the script directory)."""
    folder = str(REPO / "benchmarks")
    spec = importlib.util.spec_from_file_location(name, f"{folder}/{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    return module


def run(script: str, *args: str) -> dict:
    """The one JSON line of `benchmarks/SCRIPT ARGS` (its numbers are not checked here)."""
    return json.loads(completed(script, *args).stdout)


def completed(script: str, *args: str) -> subprocess.CompletedProcess:
    """`benchmarks/SCRIPT ARGS` run as `run` runs it, checked to exit 0 and print one line."""
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout  # one JSON line, nothing else on stdout
    return done
