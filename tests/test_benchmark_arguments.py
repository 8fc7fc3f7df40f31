"""What the benchmark scripts take and refuse: `benchmarks/gpu_checks.sh` passes only the flags and
config overrides each benchmark declares and stops in its preflight (no GPU, a missing import), and
a bad argument or input of any script is a one-line error, not a traceback."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys

import pytest
from benchmark_calls import benchmark_module
from test_train_helpers import REPO


@pytest.mark.parametrize(
    ("text", "chosen"),
    [("b,a", ["b", "a"]), (" a , a,", ["a"]), ("", None), (",", None), ("a,d", None)],
)
def test_kinds_flag_keeps_the_order_given_and_refuses_unknown_or_no_names(text, chosen, capsys):
    import argparse

    benchmark_flags = benchmark_module("benchmark_flags")
    parser = argparse.ArgumentParser(prog="bench")
    benchmark_flags.add_kinds_flag(parser, ("a", "b", "c"), "things to time")
    assert parser.parse_args([]).kinds == "a,b,c"
    if chosen is not None:
        assert benchmark_flags.chosen_kinds(parser, text, ("a", "b", "c")) == chosen
        return
    with pytest.raises(SystemExit) as stop:
        benchmark_flags.chosen_kinds(parser, text, ("a", "b", "c"))
    assert stop.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last == f"bench: error: --kinds: expected names from a,b,c, got {text!r}"


# Stands in for python in benchmarks/gpu_checks.sh: runs the benchmark until its flags are parsed
# (`parse_known_args`), loads its config with what is left (config overrides only, else an
# error), prints its arguments as the one JSON line and stops before measuring anything.
_FLAGS_ONLY = """
import argparse, json, os, runpy, sys
if sys.argv[1] == "-c":
    exec(sys.argv[2])
    sys.exit(0)
from focalnet_jax.config_loading import load_config
parse = argparse.ArgumentParser.parse_known_args
def parse_and_stop(self, args=None, namespace=None):
    known, overrides = parse(self, args, namespace)
    load_config(known.config, overrides)
    flags = {k: str(v) for k, v in vars(known).items()}
    argv = sys.argv[1:] if args is None else list(args)
    print(json.dumps({"script": script, "argv": argv, "flags": flags, "overrides": overrides}))
    sys.exit(0)
argparse.ArgumentParser.parse_known_args = parse_and_stop
script, sys.argv = sys.argv[1], sys.argv[1:]
sys.path.insert(0, os.path.dirname(script))
runpy.run_path(script, run_name="__main__")
"""


@pytest.mark.parametrize("quick", ["0", "1"])
def test_gpu_checks_pass_only_flags_and_overrides_the_benchmarks_declare(tmp_path, quick):
    (tmp_path / "flags_only.py").write_text(_FLAGS_ONLY)
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{tmp_path}/flags_only.py" "$@"\n')
    python.chmod(0o755)
    out = tmp_path / "out"
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_checks.sh"), str(out), "all"],
        cwd=REPO,
        env={
            **os.environ,
            "PYTHON": str(python),
            "QUICK": quick,
            "REQUIRE_GPU": "0",
            "WHEELS": str(tmp_path / "no_wheels"),
        },  # fmt: skip
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = (out / "gpu_checks.log").read_text() if out.is_dir() else ""
    assert done.returncode == 0, done.stderr[-2000:] + log[-3000:]
    lines = {
        path.name.split("_cpu_")[0]: json.loads(path.read_text()) for path in out.glob("*.json")
    }
    assert {name: line["script"] for name, line in lines.items()} == {
        "fold_time_bfloat16": "benchmarks/fold_time.py",
        "train_step_bfloat16": "benchmarks/train_step.py",
        "train_step_float32": "benchmarks/train_step.py",
        "mfl_scaling": "benchmarks/mfl_scaling.py",
        "inference": "benchmarks/inference.py",
    }
    # What the scripts check after parsing: step kinds, subset counts and modes.
    train_step = benchmark_module("train_step")
    for name in ("train_step_bfloat16", "train_step_float32"):
        assert set(lines[name]["flags"]["kinds"].split(",")) <= set(train_step.KINDS)
    mfl_scaling = benchmark_module("mfl_scaling")
    parser = mfl_scaling._parser()
    args, overrides = parser.parse_known_args(lines["mfl_scaling"]["argv"])
    components = mfl_scaling._config(args, overrides, mfl=False).data.components
    kinds = [(2, "select"), (6, "select"), (14, "select")]
    assert mfl_scaling._kinds(parser, args, components) == kinds
    assert "jax " in log and "'SimpleITK': '" in log  # the preflight's versions
    assert '"script": "benchmarks/mfl_scaling.py"' in done.stdout  # each line printed too


def _gpu_checks(tmp_path, names: str, **env: str) -> subprocess.CompletedProcess:
    """`benchmarks/gpu_checks.sh TMP/out NAMES` with this Python on the CPU, no wheels, `env`."""
    return subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_checks.sh"), str(tmp_path / "out"), names],
        cwd=REPO,
        env={
            **os.environ,
            "PYTHON": sys.executable,
            "WHEELS": str(tmp_path / "no_wheels"),
            "JAX_PLATFORMS": "cpu",
            **env,
        },  # fmt: skip
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_gpu_checks_stop_before_any_benchmark_where_jax_sees_no_gpu(tmp_path):
    out = tmp_path / "out"
    done = _gpu_checks(tmp_path, "mfl_scaling")
    assert done.returncode == 2
    assert done.stderr.startswith("preflight failed: JAX sees no GPU (platform cpu)")
    assert [p.name for p in out.iterdir()] == ["gpu_checks.log"]
    misspelt = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_checks.sh"), str(out), "fold_time_bf16"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert misspelt.returncode == 2
    assert misspelt.stderr.startswith("unknown benchmark 'fold_time_bf16': expected names of ")


_SCRIPT_FILES = {str(path) for path in (REPO / "benchmarks").glob("*.py")}  # run in-process


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        # A typo asking for a short run ran the whole fold.
        (["fold_time.py", "--config", "configs/demo.py", "--max-steps", "-5"],
         "argument --max-steps: expected an integer >= 0, got '-5'"),
        (["fold_time.py", "--config", "configs/demo.py", "--store", "/nonexistent"],
         "store /nonexistent does not exist"),
        # A ZeroDivisionError, a StatisticsError, an IndexError: after minutes of compiling.
        (["train_step.py", "--config", "configs/demo.py", "--steps", "0"],
         "argument --steps: expected an integer >= 1, got '0'"),
        (["mfl_scaling.py", "--config", "configs/mfl4.py", "--subset-counts", "2,,6"],
         "--subset-counts: expected comma-separated integers, got '2,,6'"),
        (["inference.py", "--config", "configs/focalnet.py", "--models", "0"],
         "argument --models: expected an integer >= 1, got '0'"),
        # Timings of 0 x 0 images; a numpy traceback.
        (["mfl_chunk_loop.py", "--config", "configs/mfl4.py", "--size", "0"],
         "argument --size: expected an integer >= 1, got '0'"),
        # The "loop" of 2 subsets in chunks of 4 was the vmap again, timed as a loop.
        (["mfl_chunk_loop.py", "--config", "configs/demo.py", "--size", "8"],
         "--chunk 4: the config's 2 subsets would run in one vmap, with no loop to time; choose "
         "--chunk below 2"),
        (["mfl_modes.py", "--config", "configs/demo.py", "--size", "2"],
         "argument --size: expected an integer >= 3, got '2'"),
        # A moving average wider than the curve reported a gap of 0 for opposite curves (after
        # two whole runs), a width of 0 a ValueError traceback.
        (["bf16_loss_curves.py", "--store", "/nonexistent", "--smooth", "0"],
         "argument --smooth: expected an integer >= 1, got '0'"),
        (["bf16_loss_curves.py", "--store", "/nonexistent", "--smooth", "61"],
         "--smooth 61: the runs log 60 train/loss points; choose fewer"),
        # A config value the project refuses: a UserError traceback.
        (["train_step.py", "--config", "configs/demo.py", "--config.model.depth=7"],
         "depth: expected one of (18, 34, 50, 101, 152), got 7"),
        (["mfl_scaling.py", "--config", "configs/nonexistent.py", "--subset-counts", "2"],
         "config file configs/nonexistent.py does not exist"),
        (["flat_maxima.py", "--predictions", "/nonexistent"],
         "/nonexistent: predictions folder does not exist"),
        # More peaks than fit 3 cells apart on the 16 x 16 grid drew forever; a negative seed
        # ended in numpy's traceback.
        (["flat_maxima.py", "--patients", "1", "--peaks", "40"],
         "--peaks 40: patient 0 got 14 peaks 3 cells apart, then 10000 draws in a row found no "
         "room for another on the 16 x 16 grid; use fewer"),
        (["flat_maxima.py", "--seed", "-1"], "argument --seed: expected an integer >= 0, got '-1'"),
        # One case timed in this process, labelled "2 workers" with a speedup.
        (["preprocess.py", "--cases", "1", "--workers", "2"],
         "--workers 2: more than the 1 --cases (at most one worker per case)"),
    ],
)  # fmt: skip
def test_bad_benchmark_arguments_are_one_line_errors(argv, message, monkeypatch, capsys):
    """Each script run as `python benchmarks/SCRIPT ARGS` runs it (`__main__`, its directory first
    on `sys.path`), in this process: a Python started for each spent seconds importing JAX."""
    script, *rest = argv
    folder = str(REPO / "benchmarks")
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", [f"{folder}/{script}", *rest])
    monkeypatch.setattr(sys, "path", [folder, *sys.path])
    before = set(sys.modules)
    try:
        with pytest.raises(SystemExit) as ended:  # any other exception: a traceback
            runpy.run_path(f"{folder}/{script}", run_name="__main__")
    finally:  # the scripts' sibling modules, imported by name, are not left for other tests
        for name in set(sys.modules) - before:
            if getattr(sys.modules[name], "__file__", None) in _SCRIPT_FILES:
                del sys.modules[name]
    done = capsys.readouterr()
    assert ended.value.code == 2 and done.out == "", done.err
    assert done.err.splitlines()[-1] == f"{script}: error: {message}", done.err
    assert "Traceback" not in done.err


def test_gpu_checks_preflight_imports_the_benchmarks_asked_for(tmp_path):
    """The preflight imported a fixed list: on a node without matplotlib (or tqdm) it passed, and
    `inference` (or `fold_time`) failed on its import after the other checks' minutes."""
    blocked = tmp_path / "blocked" / "matplotlib"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'matplotlib'\", name='matplotlib')\n"
    )
    done = _gpu_checks(tmp_path, "inference", PYTHONPATH=str(tmp_path / "blocked"), QUICK="1")
    assert done.returncode == 2, done.stderr
    assert done.stderr == "preflight failed: ModuleNotFoundError: No module named 'matplotlib'\n"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["gpu_checks.log"]


def test_plot_mfl_scaling_refuses_what_is_not_a_result_in_one_line(tmp_path, capsys):
    """A missing file, a non-JSON file and another JSON file ended in tracebacks."""
    plot = benchmark_module("plot_mfl_scaling")
    (tmp_path / "empty.json").write_text("")
    (tmp_path / "other.json").write_text("{}")
    row = {"subsets": 2, "mode": "select", "mfl_chunk": 0, "time_ratio": 2.0}
    run = {"results": [row], "model": "m", "batch_size": 1, "image_size": 8, "device": "cpu"}
    (tmp_path / "row.json").write_text(json.dumps({**run, "date": "2026-12-06"}))
    expected = {
        "missing.json": "No such file or directory",
        "empty.json": "not JSON (Expecting value: line 1 column 1 (char 0))",
        "other.json": "not a result of mfl_scaling.py (no results, model, batch_size, "
        "image_size, device, date)",
        "row.json": "not a result of mfl_scaling.py (a row has no memory_ratio)",
    }
    for name, reason in expected.items():
        with pytest.raises(SystemExit) as ended:
            plot.main([str(tmp_path / name), "--out", str(tmp_path / "plot.png")])
        assert ended.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1].endswith(f"{tmp_path / name}: {reason}")
    assert not (tmp_path / "plot.png").exists()
