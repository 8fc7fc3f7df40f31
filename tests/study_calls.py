"""What the study tests share: a tiny-model study spec (`SPEC`, `ARMS`, `write_spec`), `focalnet
study` called in this process or a child (`study`), a one-line refusal (`one_line_error`), the
module-scoped `store` and `spec_file` fixtures (a test module takes them as
`store = study_calls.store`; `spec_file` needs `store` taken too), and the SLURM requirement of
the cluster tests."""

from __future__ import annotations

import contextlib
import csv
import faulthandler
import io
import json
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path
from unittest import mock

import pytest
from slurm_cluster import missing_binaries
from test_train_helpers import REPO, small_synthetic_store

SPEC = """
import ml_collections

def get_config(arg=None):
    spec = ml_collections.ConfigDict()
    spec.base = {base!r}
    spec.store = {store!r}
    spec.repeats = 2
    spec.folds = (0, 1)
    spec.num_folds = 2
    spec.common = {{
        "model": {{"depth": 18, "width": 0.125, "output_stride": 16}},
        "train": {{"steps": 3, "batch_size": 4, "log_every": 3, "checkpoint_every": 3,
                   "eval_every": 0}},
        "data": {{"slices": "all"}},
    }}
    spec.arms = {arms!r}
    spec.ensembles = {ensembles!r}
    return spec
"""


ARMS = {
    "ce": {"loss": {"name": "sigmoid_ce", "mfl": False}},
    "fl": {"loss": {"name": "focal", "mfl": False}},
}


ENV = {**os.environ, "PYTHONPATH": str(REPO)}  # inherited by every cell process


def study(*args: str, env=None, check=True, process=False) -> subprocess.CompletedProcess:
    """`focalnet study ARGS` with environment `env` (default ENV) in folder REPO: its status and
    output. It runs here (`cli.main`, os.environ set to `env` meanwhile, stdout and stderr caught),
    which spares each command a new interpreter's start-up and imports (3-6 s on 2 cores); the
    cells and `sbatch` it starts are child processes as from the console script. `process`: in a
    `python -m focalnet_jax.cli` child instead, for a command killed from outside (by a stand-in
    `sbatch`) or one whose environment must not reach this process (`JAX_PLATFORMS`)."""
    if process:
        done = subprocess.run(
            [sys.executable, "-m", "focalnet_jax.cli", "study", *args],
            capture_output=True,
            text=True,
            env=env or ENV,
            cwd=REPO,
            timeout=1200,  # a hang ends here
        )
    else:
        done = _study_here(list(args), env or ENV)
    if check:
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def _study_here(args: list[str], env: dict) -> subprocess.CompletedProcess:
    from focalnet_jax import cli

    out, err = io.StringIO(), io.StringIO()
    # A hang ends the test worker here (the test is reported as crashed), as a child's `timeout=`
    # did; the stack goes to the captured stderr, which is lost with the worker.
    faulthandler.dump_traceback_later(1200, exit=True, file=sys.__stderr__)
    with (
        mock.patch.dict(os.environ, env, clear=True),
        contextlib.chdir(REPO),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        try:
            status = cli.main(["study", *args])
        except SystemExit as stop:  # the status and stderr the interpreter ends with on it
            status = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
            if status == 1 and not isinstance(stop.code, int):
                print(stop.code, file=err)
        except Exception:  # as the interpreter ends on it: the traceback on stderr, status 1
            traceback.print_exc(file=err)
            status = 1
        finally:
            faulthandler.cancel_dump_traceback_later()
    return subprocess.CompletedProcess(["study", *args], status, out.getvalue(), err.getvalue())


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def write_spec(path: Path, store: Path, arms=None, ensembles=None) -> Path:
    """A tiny-model study spec: `arms` (default ARMS) and `ensembles` (default both of them)."""
    arms = ARMS if arms is None else arms
    ensembles = {"both": ("ce", "fl")} if ensembles is None else ensembles
    base = str(REPO / "configs" / "focalnet.py")
    path.write_text(SPEC.format(base=base, store=str(store), arms=arms, ensembles=ensembles))
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return small_synthetic_store(tmp_path_factory.mktemp("study_data"), cases=8, seed=3)


@pytest.fixture(scope="module")
def spec_file(store, tmp_path_factory) -> Path:
    return write_spec(tmp_path_factory.mktemp("spec") / "tiny_study.py", store)


def one_line_error(*argv: str) -> str:
    from focalnet_jax import cli

    with pytest.raises(SystemExit) as stop:
        cli.main(["study", *argv])
    message = str(stop.value)
    assert stop.value.code == 2
    assert "\n" not in message and message.startswith("focalnet study")
    return message


def stale_copy(store: Path, tmp_path: Path) -> Path:
    """A copy of `store` whose cases.json says format version 1 (refused by `open_store`)."""

    stale = shutil.copytree(store, tmp_path / "stale_store")
    table = json.loads((stale / "cases.json").read_text())
    table["settings"]["version"] = 1
    (stale / "cases.json").write_text(json.dumps(table))
    return stale


def require_slurm() -> None:
    reason = None
    if missing_binaries():
        reason = f"SLURM binaries missing: {missing_binaries()} (.ci/install_slurm.sh)"
    elif os.geteuid() != 0:
        reason = "the one-node SLURM cluster runs its daemons as root"
    if reason and os.environ.get("FOCALNET_REQUIRE_SLURM", "") not in ("", "0"):
        pytest.fail(reason + " (FOCALNET_REQUIRE_SLURM=1)")
    if reason:
        pytest.skip(reason)
