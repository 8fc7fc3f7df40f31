"""Studies end to end on a tiny model (focalnet_jax/study): a 2-arm x 2-repeat study (of fold 1 of
2) with an ensemble finishes and reports every row; its permutation p-values equal an exhaustive
enumeration written here; a re-run trains nothing; a study killed mid-cell finishes when run
again; a failed cell is reported while the others finish; the SLURM executor (a one-node cluster
started here) gives the same rows as the local one."""

from __future__ import annotations

import argparse
import contextlib
import csv
import faulthandler
import io
import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from slurm_cluster import OneNodeCluster, missing_binaries
from test_train_helpers import REPO, small_synthetic_store

from focalnet_jax.file_lock import acquire_lock, release_lock
from focalnet_jax.study.cells import RUN_LOCK
from focalnet_jax.study.synthetic import focalnet
from focalnet_jax.training.tb_logging import read_scalars

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


@pytest.fixture(scope="module")
def finished(spec_file, tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("study") / "tiny"
    # Two worker slots, each owning one of two device ids (as on a 2-GPU host; JAX on CPU
    # ignores CUDA_VISIBLE_DEVICES). Fold 1 only (not fold 0, every config's default): the 4
    # cells of 2 arms x 2 repeats, half the time of both folds.
    args = ["--spec", str(spec_file), "--workdir", str(workdir), "--parallel", "2"]
    args += ["--spec.folds=(1,)"]
    study("run", *args, "--devices", "0,1")
    study("report", "--workdir", str(workdir))
    return workdir


@pytest.mark.slow
def test_study_finishes_with_every_row(finished):
    rows = read_csv(finished / "report" / "runs.csv")
    keys = {(r["arm"], r["kind"], int(r["repeat"]), int(r["fold"]), int(r["seed"])) for r in rows}
    expected = {
        (arm, kind, rep, fold, rep)
        for arm, kind in (("ce", "arm"), ("fl", "arm"), ("both", "ensemble"))
        for rep in (0, 1)
        for fold in (1,)
    }
    assert len(rows) == 6 and keys == expected
    for row in rows:  # the row is the cell's metrics.json
        metrics = json.loads(
            (
                finished
                / row["arm"]
                / f"rep{row['repeat']}"
                / f"fold{row['fold']}"
                / "eval"
                / "metrics.json"
            ).read_text()
        )
        sens = metrics["froc"]["clinically_significant"]["sensitivity_at_fp"]["1"]
        assert float(row["froc_cs_sens_at_1fp"]) == pytest.approx(sens)
        assert float(row["picai_score"]) == pytest.approx(metrics["picai"]["score"], nan_ok=True)
        # A training cell's final validation loss is its last logged val/loss (one evaluation:
        # no drop over the last quarter); an ensemble trains nothing.
        cell = finished / row["arm"] / f"rep{row['repeat']}" / f"fold{row['fold']}"
        _, logged = read_scalars(cell / "tb", "val/loss")
        expected = logged[-1] if row["kind"] == "arm" else math.nan
        assert float(row["val_loss"]) == pytest.approx(expected, nan_ok=True)
        assert math.isnan(float(row["val_loss_drop_last_quarter"]))
    for name in (
        "report.md", "stats.csv", "metrics.png", "froc_cs.png", "pvalues.png", "val_loss.png",
    ):  # fmt: skip
        assert (finished / "report" / name).stat().st_size > 0


@pytest.mark.slow
def test_cells_use_the_seed_of_their_repeat(finished):
    for rep in (0, 1):
        config = json.loads((finished / "fl" / f"rep{rep}" / "fold1" / "config.json").read_text())
        assert config["seed"] == rep and config["data"]["fold"] == 1
        assert config["loss"]["name"] == "focal" and config["loss"]["mfl"] is False


@pytest.mark.slow
def test_parallel_cells_run_one_per_device(finished):
    spans = []
    for cell in sorted(finished.glob("*/rep*/fold*/cell.log")):
        header = cell.read_text().splitlines()[0]
        state = json.loads((cell.parent / "study_cell.json").read_text())
        assert f"CUDA_VISIBLE_DEVICES={state['gpus']}," in header
        spans.append((state["time"] - state["seconds"], state["time"], state["gpus"]))
    assert len(spans) == 4 and {gpu for *_, gpu in spans} == {"0", "1"}
    for (start_a, end_a, gpu_a), (start_b, end_b, gpu_b) in itertools.combinations(spans, 2):
        if start_a < end_b - 1 and start_b < end_a - 1:  # ran at the same time (1 s margin)
            assert gpu_a != gpu_b


@pytest.mark.slow
def test_ensemble_is_the_mean_of_its_arms(finished):
    cell = Path("rep1") / "fold1" / "eval" / "predictions"
    name = sorted(p.name for p in (finished / "ce" / cell).glob("*.npz"))[0]
    scores = [np.load(finished / arm / cell / name)["scores"] for arm in ("ce", "fl", "both")]
    np.testing.assert_allclose(scores[2], (scores[0] + scores[1]) / 2, rtol=1e-6)


def exhaustive_permutation_p(a: list[float], b: list[float]) -> float:
    """P(order AUC of a random split >= the observed one), over every split of the pooled runs
    into groups of len(a) and len(b). Order AUC: share of (a_i, b_j) pairs with b_j > a_i, ties
    half (Bosma et al. 2022, H1: b better)."""

    def order_auc(x, y):
        return np.mean([1.0 if yj > xi else 0.5 if yj == xi else 0.0 for xi in x for yj in y])

    pooled, observed = a + b, order_auc(a, b)
    splits = list(itertools.combinations(range(len(pooled)), len(a)))
    extreme = 0
    for chosen in splits:
        x = [pooled[i] for i in chosen]
        y = [pooled[i] for i in range(len(pooled)) if i not in chosen]
        extreme += order_auc(x, y) >= observed - 1e-12
    return extreme / len(splits)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_permutation_pvalue_equals_exhaustive_enumeration(seed):
    from focalnet_jax.study.statistics import permutation_pvalue

    rng = np.random.default_rng(seed)
    a = list(np.round(rng.uniform(0.5, 0.8, 5), 2))  # rounded: ties occur
    b = list(np.round(rng.uniform(0.55, 0.85, 6), 2))
    assert permutation_pvalue(a, b) == pytest.approx(exhaustive_permutation_p(a, b), abs=1e-12)


def test_compare_arms_welch_is_one_sided_for_the_alternative():
    from scipy import stats

    from focalnet_jax.study.statistics import compare_arms

    a, b = [0.60, 0.64, 0.61, 0.70], [0.71, 0.69, 0.75]
    rows = {(r["arm_a"], r["arm_b"]): r for r in compare_arms({"m": {"a": a, "b": b}}, 100)}
    # Welch's t and degrees of freedom by hand (NumPy), H1: mean of arm_b > mean of arm_a.
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    t = (np.mean(b) - np.mean(a)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    assert rows["a", "b"]["p_welch"] == pytest.approx(stats.t.sf(t, df), rel=1e-9)
    assert rows["b", "a"]["p_welch"] == pytest.approx(stats.t.sf(-t, df), rel=1e-9)
    assert rows["a", "b"]["p_welch_bonferroni"] == pytest.approx(2 * stats.t.sf(t, df))


@pytest.mark.slow
def test_study_stats_match_enumeration_and_welch(finished):
    from scipy import stats

    runs = read_csv(finished / "report" / "runs.csv")
    rows = read_csv(finished / "report" / "stats.csv")
    metric = "picai_auroc"
    pairs = [r for r in rows if r["metric"] == metric]
    assert len(pairs) == 6  # ordered pairs of ce, fl, both
    for row in pairs:
        a = [float(r[metric]) for r in runs if r["arm"] == row["arm_a"]]
        b = [float(r[metric]) for r in runs if r["arm"] == row["arm_b"]]
        a, b = [v for v in a if math.isfinite(v)], [v for v in b if math.isfinite(v)]
        assert float(row["p_permutation"]) == pytest.approx(exhaustive_permutation_p(a, b))
        # Paired: the runs of the same repeat and fold, every sign pattern of their differences.
        cells = [
            {(r["repeat"], r["fold"]): float(r[metric]) for r in runs if r["arm"] == arm}
            for arm in (row["arm_a"], row["arm_b"])
        ]
        diffs = [cells[1][k] - cells[0][k] for k in cells[0]]
        diffs = np.array([d for d in diffs if math.isfinite(d)])
        sums = [np.dot(signs, diffs) for signs in itertools.product((1, -1), repeat=diffs.size)]
        paired = np.mean(np.array(sums) >= diffs.sum() - 1e-9) if diffs.size else math.nan
        assert int(row["n_pairs"]) == diffs.size
        assert float(row["p_permutation_paired"]) == pytest.approx(paired, nan_ok=True)
        if np.std(a) + np.std(b) > 0:
            va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
            t = (np.mean(b) - np.mean(a)) / math.sqrt(va + vb)
            df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
            assert float(row["p_welch"]) == pytest.approx(stats.t.sf(t, df), rel=1e-6)
            assert float(row["p_welch_bonferroni"]) == pytest.approx(
                min(1.0, 6 * float(row["p_welch"]))
            )


def _tree_state(root: Path) -> dict:
    """mtime of every file but the report and the run lock (each `study run` takes it)."""
    return {
        str(p): p.stat().st_mtime_ns
        for p in root.rglob("*")
        if "report" not in p.parts and p.name != RUN_LOCK
    }


@pytest.mark.slow
def test_rerun_of_a_finished_study_trains_nothing(finished):
    before = _tree_state(finished)
    done = study("run", "--workdir", str(finished))
    assert "4 done" in done.stdout and "0 to run" in done.stdout
    assert _tree_state(finished) == before
    status = study("status", "--workdir", str(finished)).stdout
    assert status.count(" done ") >= 6 and "4 done" in status


@pytest.mark.slow
def test_report_refuses_cells_evaluated_with_other_settings(finished, tmp_path):
    """A cell re-evaluated by hand with another hit radius (or slices) would enter the means and
    the tests beside the others: the report names it and the difference instead."""
    copy = shutil.copytree(finished, tmp_path / "copy", ignore=shutil.ignore_patterns("report"))
    path = copy / "fl" / "rep1" / "fold1" / "eval" / "metrics.json"
    metrics = json.loads(path.read_text())
    metrics["settings"]["radius_mm"] = 10.0
    path.write_text(json.dumps(metrics))
    message = _one_line_error("report", "--workdir", str(copy))
    assert message.endswith(
        "cell ce/rep0/fold1 and cell fl/rep1/fold1 were evaluated with other settings "
        "{'radius_mm': (5.0, 10.0)}: their numbers are not comparable; evaluate them alike"
    )
    assert not (copy / "report").exists()


@pytest.mark.slow
def test_report_refuses_paired_cells_evaluated_on_other_cases(finished, tmp_path):
    """A cell re-evaluated by hand on part of its fold (`evaluate --cases`) was paired with the
    other arms' cells of its repeat and fold in the paired tests, without a word."""
    copy = shutil.copytree(finished, tmp_path / "copy", ignore=shutil.ignore_patterns("report"))
    path = copy / "fl" / "rep1" / "fold1" / "eval" / "metrics.json"
    metrics = json.loads(path.read_text())
    n = len(metrics["cases"])
    metrics["cases"] = metrics["cases"][1:]
    path.write_text(json.dumps(metrics))
    message = _one_line_error("report", "--workdir", str(copy))
    assert message.endswith(
        f"cell ce/rep1/fold1 and cell fl/rep1/fold1 were evaluated on other cases ({n} and "
        f"{n - 1}, 1 not in both): their paired comparison would not be by case; remove the "
        "metrics.json of the one evaluated by hand, and `study run` evaluates it again"
    )
    assert not (copy / "report").exists()


@pytest.mark.slow
def test_a_report_stopped_half_way_leaves_the_earlier_one_whole(finished, tmp_path, monkeypatch):
    """The report's files were written one by one into DIR/report: a stop while its figures
    rendered left the new runs.csv and stats.csv beside the earlier report.md. The folder is
    replaced whole; a file of the user's in it is refused, not deleted."""
    from focalnet_jax import cli
    from focalnet_jax.study import figures

    copy = shutil.copytree(finished, tmp_path / "copy")
    before = {p.name: p.read_bytes() for p in (copy / "report").iterdir()}
    path = copy / "fl" / "rep1" / "fold1" / "eval" / "metrics.json"
    metrics = json.loads(path.read_text())  # the cell evaluated again, otherwise
    metrics["froc"]["clinically_significant"]["sensitivity_at_fp"]["1"] = 0.123
    path.write_text(json.dumps(metrics))

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(figures, "froc_bands", stopped)
        with pytest.raises(SystemExit) as raised:
            cli.main(["study", "report", "--workdir", str(copy)])
    assert raised.value.code == 130
    assert {p.name: p.read_bytes() for p in (copy / "report").iterdir()} == before
    (copy / "report" / "notes.txt").write_text("mine")
    message = _one_line_error("report", "--workdir", str(copy))
    assert message.endswith(
        f"{copy / 'report'} holds notes.txt, which `study report` does not write; the folder is "
        "replaced whole, so move that out"
    )
    (copy / "report" / "notes.txt").unlink()
    # An earlier version's temporary file (killed while writing report.md there): taken, dropped.
    (copy / "report" / ".report.md.tmp-12446").write_text("half a report")
    assert cli.main(["study", "report", "--workdir", str(copy)]) == 0
    runs = read_csv(copy / "report" / "runs.csv")
    changed = [r for r in runs if (r["arm"], r["repeat"], r["fold"]) == ("fl", "1", "1")]
    assert [float(r["froc_cs_sens_at_1fp"]) for r in changed] == [0.123]
    assert sorted(p.name for p in (copy / "report").iterdir()) == sorted(before)


@pytest.mark.slow
def test_ensemble_of_a_member_no_longer_done_waits_and_leaves_the_report(
    finished, tmp_path, capsys
):
    """A member cell removed (to train it again) takes its ensemble of that repeat and fold out
    of `status` and `report --partial` until it is done again: the ensemble's metrics.json on
    disk is of the member that no longer stands."""
    from focalnet_jax import cli

    copy = shutil.copytree(finished, tmp_path / "copy", ignore=shutil.ignore_patterns("report"))
    shutil.rmtree(copy / "fl" / "rep1" / "fold1")
    assert (copy / "both" / "rep1" / "fold1" / "eval" / "metrics.json").is_file()
    assert cli.main(["study", "status", "--workdir", str(copy)]) == 0
    states = dict(line.split()[:2] for line in capsys.readouterr().out.splitlines()[1:-1])
    assert states["both/rep1/fold1"] == "waiting" and states["fl/rep1/fold1"] == "pending"
    assert states["both/rep0/fold1"] == "done"
    assert cli.main(["study", "report", "--workdir", str(copy), "--partial"]) == 0
    rows = read_csv(copy / "report" / "runs.csv")
    cells = {(r["arm"], r["repeat"], r["fold"]) for r in rows}
    assert len(rows) == 4 and not cells & {("fl", "1", "1"), ("both", "1", "1")}


@pytest.mark.slow
def test_an_ensemble_is_outdated_when_a_members_metrics_change_whatever_the_file_times(
    finished, tmp_path
):
    """Each ensemble records the digests of the members' metrics it was computed from: file
    times from nodes whose clocks differ neither outdate it nor keep it done. One computed
    before that record existed is computed again once (by `study report` here)."""
    copy = shutil.copytree(finished, tmp_path / "copy", ignore=shutil.ignore_patterns("report"))
    members = copy / "both" / "rep0" / "fold1" / "members.json"
    assert sorted(json.loads(members.read_text())) == ["ce/rep0/fold1", "fl/rep0/fold1"]
    old = time.time() - 3600
    os.utime(copy / "both" / "rep0" / "fold1" / "eval" / "metrics.json", (old, old))
    assert re.search(r"both/rep0/fold1\s+done", study("status", "--workdir", str(copy)).stdout)
    member = copy / "ce" / "rep0" / "fold1" / "eval" / "metrics.json"
    member.write_text(member.read_text() + "\n")  # evaluated again, on a node two hours behind
    os.utime(member, (old - 3600, old - 3600))
    assert re.search(r"both/rep0/fold1\s+outdated", study("status", "--workdir", str(copy)).stdout)
    study("report", "--workdir", str(copy))
    assert re.search(r"both/rep0/fold1\s+done", study("status", "--workdir", str(copy)).stdout)
    (copy / "both" / "rep1" / "fold1" / "members.json").unlink()  # computed by an older version
    assert re.search(r"both/rep1/fold1\s+outdated", study("status", "--workdir", str(copy)).stdout)


@pytest.mark.slow
def test_a_slurm_run_with_nothing_to_submit_computes_the_outdated_ensembles(finished, tmp_path):
    """`status` says an outdated ensemble is computed by the next `study run`; with the SLURM
    executor that run said "nothing to submit" and left it outdated. Outdated means a member's
    metrics changed since the ensemble was computed, whatever the file times say: they were
    compared, and a member evaluated again on a node whose clock is behind looked older."""
    _require_slurm()
    copy = shutil.copytree(finished, tmp_path / "copy", ignore=shutil.ignore_patterns("report"))
    old = time.time() - 3600
    ensemble = copy / "both" / "rep0" / "fold1" / "eval" / "metrics.json"
    os.utime(ensemble, (old, old))  # computed by a node an hour behind: still its members'
    assert re.search(r"both/rep0/fold1\s+done", study("status", "--workdir", str(copy)).stdout)
    member = copy / "fl" / "rep0" / "fold1" / "eval" / "metrics.json"
    member.write_text(member.read_text() + "\n")  # evaluated again, on a node two hours behind
    os.utime(member, (old - 3600, old - 3600))
    assert re.search(r"both/rep0/fold1\s+outdated", study("status", "--workdir", str(copy)).stdout)
    again = study("run", "--workdir", str(copy), "--executor=slurm").stdout
    assert "nothing to submit" in again and "ensembles computed: both/rep0/fold1" in again
    assert re.search(r"both/rep0/fold1\s+done", study("status", "--workdir", str(copy)).stdout)


@pytest.mark.slow
def test_killed_study_resumes_the_interrupted_cell(store, tmp_path):
    """A study killed mid-cell resumes the cell from its checkpoint. The cell's time counts
    every attempt (its `seconds` counted the last one only): here one killed, one that really
    fails (its `focalnet train` finds no JAX platform of the name given) and the one that
    finishes; the state file, `study status`, runs.csv and report.md give their sum and number."""
    workdir = tmp_path / "killed"
    spec = write_spec(tmp_path / "one_cell.py", store, arms={"ce": ARMS["ce"]}, ensembles={})
    args = ["--spec", str(spec), "--workdir", str(workdir), "--spec.repeats=1"]
    args += ["--spec.folds=(0,)", "--spec.common.train.steps=6"]
    run = [sys.executable, "-m", "focalnet_jax.cli", "study", "run", *args]
    process = subprocess.Popen(
        run,
        env=ENV,
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    cell = workdir / "ce" / "rep0" / "fold0"
    first_checkpoint = cell / "checkpoints" / "3"
    deadline = time.time() + 300
    while not first_checkpoint.is_dir() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the study and its cell processes
    process.wait()
    killed_at = time.time()
    assert first_checkpoint.is_dir()
    killed = json.loads((cell / "study_cell.json").read_text())
    assert killed["state"] == "running" and isinstance(killed["pid_started"], int)  # pid reuse
    assert isinstance(killed["child_pid"], int) and isinstance(killed["child_started"], int)
    last_write = max(p.stat().st_mtime for p in [cell, *cell.rglob("*")])
    lived = first_checkpoint.stat().st_mtime - killed["started"]  # removed by the later run
    refused = study("report", "--workdir", str(workdir), check=False)
    assert refused.returncode != 0 and "1 cell not done (ce/rep0/fold0)" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    began = time.time()
    nope = {**ENV, "JAX_PLATFORMS": "nope"}
    failing = study("run", "--workdir", str(workdir), env=nope, check=False, process=True)
    failing_run = time.time() - began
    assert failing.returncode == 1 and "FAILED ce/rep0/fold0" in failing.stdout, failing.stdout
    failed = json.loads((cell / "study_cell.json").read_text())
    began = time.time()
    study("run", "--workdir", str(workdir))
    last_run = time.time() - began
    study("report", "--workdir", str(workdir))
    log = (cell / "cell.log").read_text()
    starts = [int(s) for s in re.findall(r"start at (\d+)", log)]
    assert starts[0] == 0 and starts[-1] > 0  # the last attempt resumed from a checkpoint
    assert len(read_csv(workdir / "report" / "runs.csv")) == 1
    # The killed attempt counts until its last sign of life (the latest write in its folder): at
    # least until its first checkpoint, at most until it was killed.
    killed_s = round(last_write - killed["started"], 1)
    assert lived - 0.1 <= killed_s <= killed_at - killed["started"] + 0.1
    assert failed["state"] == "failed" and failed["attempt_seconds"] == [
        killed_s,
        failed["seconds"],
    ]
    state = json.loads((cell / "study_cell.json").read_text())
    assert state["attempt_seconds"] == [killed_s, failed["seconds"], state["seconds"]]
    assert 0 < failed["seconds"] <= failing_run and 0 < state["seconds"] <= last_run
    total = state["total_seconds"]
    assert state["attempts"] == 3 and total == pytest.approx(
        sum(state["attempt_seconds"]), abs=0.051
    )
    status = study("status", "--workdir", str(workdir)).stdout
    assert re.search(rf"ce/rep0/fold0\s+done\s+{total}\s+3\s", status), status
    [row] = read_csv(workdir / "report" / "runs.csv")
    assert float(row["total_seconds"]) == total and row["attempts"] == "3"
    report = (workdir / "report" / "report.md").read_text()
    assert f"| ce | {total:.1f} +- n/a | {total / 3600:.3f} | 3 | 1 |" in report, report


@pytest.mark.slow
def test_failed_cell_is_reported_and_the_others_finish(store, tmp_path):
    workdir = tmp_path / "failing"
    # A valid config (so `study run` starts it) whose pretrained weights file is damaged: the
    # cell's `focalnet train` fails when it initialises the model.
    weights = tmp_path / "w.npz"
    weights.write_bytes(b"not an npz archive")
    bad = {"loss": {"name": "focal", "mfl": False}, "model": {"pretrained": str(weights)}}
    spec = write_spec(tmp_path / "failing.py", store, arms={"ce": ARMS["ce"], "fl": bad})
    args = ["--spec", str(spec), "--workdir", str(workdir), "--spec.repeats=1"]
    args += ["--spec.folds=(1,)"]
    done = study("run", *args, check=False)
    assert done.returncode == 1
    log = workdir / "fl" / "rep0" / "fold1" / "cell.log"
    # The cell's state keeps the one-line user error of `focalnet train` (also in its log).
    reason = f"focalnet train: error: pretrained weights {weights}: unreadable .npz file"
    assert f"FAILED fl/rep0/fold1: {reason}" in done.stdout
    assert str(log) in done.stdout and reason in log.read_text()
    status = study("status", "--workdir", str(workdir)).stdout
    assert re.search(r"fl/rep0/fold1\s+failed", status) and re.search(
        r"ce/rep0/fold1\s+done", status
    )
    assert study("report", "--workdir", str(workdir), check=False).returncode != 0
    study("report", "--workdir", str(workdir), "--partial")
    rows = read_csv(workdir / "report" / "runs.csv")
    assert [(r["arm"], r["fold"]) for r in rows] == [("ce", "1")]  # no ensemble without fl


def _one_line_error(*argv: str) -> str:
    from focalnet_jax import cli

    with pytest.raises(SystemExit) as stop:
        cli.main(["study", *argv])
    message = str(stop.value)
    assert stop.value.code == 2
    assert "\n" not in message and message.startswith("focalnet study")
    return message


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("--spec.repeats=0", "repeats=0: expected an integer >= 1"),
        # Each cell trained in full, then failed in `focalnet evaluate`; the study, recorded
        # with it, refused the corrected value.
        ("--spec.evaluate.picai_bootstraps=-1",
         "evaluate.picai_bootstraps=-1: expected an integer >= 0"),
        # Repeat 0's seed was checked (its arm configs), repeat 1's cells failed at their start.
        ("--spec.seed=9223372036854775807",
         "seed=9223372036854775807: repeats 0..1 train with seeds seed..seed+1, each expected in "
         "[0, 2**63)"),
        ("--spec.ensembles.both=('ce','xx')", "ensemble 'both'"),
        ("--spec.store=/no/such/store", "store '/no/such/store' does not exist"),
        ("--spec.store=", "the spec names no store: give --spec FILE:STORE or --spec.store=STORE"),
        ("--spec.arms.ce.loss.mfl=true", "loss.mfl=True with loss.name='sigmoid_ce'"),
        ("--spec.folds=(2,)", "folds=[2]"),
        # A fold given twice ran each of its cells twice and counted it twice in the report.
        ("--spec.folds=(0,1,0)", "error: folds=[0, 1, 0]: expected each fold once"),
        ("--spec.arms.ce.loss.nme=x", "arm 'ce' on base "),
        ("--spec.arms.ce.loss.nme=x", ": --config.loss.nme: unknown config key 'loss.nme'"),
        ("--spec.common.train.stpes=5", "error: common on base "),  # not the first arm's
        ("--spec.common.train.stpes=5", ": --config.train.stpes: unknown config key 'train.stpes'"),
        ("--spec.common.train.epochs=many", "common on base "),
        ("--spec.common.train.epochs=many", ": --config.train.epochs=many: expected an integer"),
        ("--spec.comon.train.steps=5", "--spec.comon.train.steps: unknown config key 'comon'"),
        # An ensemble of one arm twice is that arm, compared with itself in stats.csv.
        ("--spec.ensembles.both=('ce','ce')",
         "ensemble 'both': arm 'ce' is named twice, in ['ce', 'ce']"),
        # slurm options were checked only once study.json and the task list were written.
        ("--spec.slurm.time=8h", "slurm.time '8h': expected a SLURM time limit"),
        ("--spec.slurm.extra=(1,)", "slurm.extra=[1]: expected a list of '#SBATCH' options"),
        ("--spec.slurm.extra=('--qos=x\\necho INJECTED',)",
         "slurm.extra item '--qos=x\\necho INJECTED': expected one '#SBATCH' option on one line"),
        ("--spec.slurm.extra=(' ',)", "slurm.extra item ' ': expected one '#SBATCH' option"),
    ],
)  # fmt: skip
def test_bad_spec_is_a_one_line_error_before_anything_runs(spec_file, tmp_path, override, expected):
    workdir = tmp_path / "bad"
    message = _one_line_error("run", "--spec", str(spec_file), "--workdir", str(workdir), override)
    assert expected in message
    assert not workdir.exists()


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("repeats", True, "repeats=True: expected an integer >= 1"),
        ("folds", (True,), "folds=[True]: expected folds in 0..1"),
        ("num_folds", True, "num_folds=True: expected an integer >= 2"),
    ],
)
def test_a_bool_count_in_a_spec_file_is_refused(spec_file, key, value, expected):
    """True is an int in Python: `folds = (True,)` in a spec file ran fold 1 alone."""
    from focalnet_jax.study.spec import StudyError, load_spec, validate

    spec = load_spec(str(spec_file))
    spec[key] = value
    with pytest.raises(StudyError, match=f"^{re.escape(expected)}$"):
        validate(spec, str(spec_file))


def test_a_study_on_a_store_moved_aside_names_where_it_is(spec_file, tmp_path):
    """A preprocess stopped between its two renames leaves the store moved aside: `study run`
    said only that the store does not exist."""
    from focalnet_jax.study.spec import StudyError, load_spec, validate

    spec = load_spec(str(spec_file))
    spec.store = str(tmp_path / "store")
    aside = tmp_path / ".store.tmp-1@host-0123abcd-89abcdef.old"
    aside.mkdir()
    with pytest.raises(StudyError) as refused:
        validate(spec, str(spec_file))
    assert str(refused.value).startswith(
        f"store '{tmp_path / 'store'}' does not exist (preprocessed store folder); its earlier "
        f"version was moved aside to {aside} by a `focalnet preprocess` stopped"
    )


def test_an_arm_too_deep_for_the_stores_images_is_refused_before_anything_runs(store, tmp_path):
    """A U-Net arm whose `unet_levels` halve the store's images past one pixel passed `study run`
    (its config was checked at the default image size), and every cell of it failed."""
    spec = tmp_path / "unet_study.py"
    spec.write_text(
        "import ml_collections\n\n\ndef get_config(arg=None):\n"
        "    spec = ml_collections.ConfigDict()\n"
        f"    spec.base = {str(REPO / 'configs' / 'unet_sing.py')!r}\n"
        f"    spec.store = {str(store)!r}\n"
        "    spec.repeats, spec.folds, spec.num_folds = 1, (0,), 2\n"
        "    spec.common = {'model': {'unet_features': 4}}\n"
        "    spec.arms = {'deep': {'model': {'unet_levels': 8}}}\n"
        "    spec.ensembles = {}\n"
        "    return spec\n"
    )
    workdir = tmp_path / "unet"
    message = _one_line_error("run", "--spec", str(spec), "--workdir", str(workdir))
    assert "arm 'deep': model.unet_levels=8: the U-Net halves its input 8 times" in message
    assert not workdir.exists()


def test_a_study_takes_new_slurm_options_and_records_them(spec_file, tmp_path):
    """`slurm` says where the cells run, not what they compute: a study recorded with one time
    limit is run with another (it was refused as 'a study with other ['slurm']'), which is
    recorded for the next run; a changed seed is still refused."""
    from focalnet_jax.study.cells import Study
    from focalnet_jax.study.spec import load_spec, validate

    workdir = tmp_path / "s"
    Study.create(workdir, validate(load_spec(str(spec_file)), str(spec_file)))
    longer = ["--spec.slurm.time=08:00:00", "--spec.slurm.gpus=2"]
    study = Study.create(workdir, validate(load_spec(str(spec_file), longer), str(spec_file)))
    assert study.plain["slurm"]["time"] == "08:00:00"
    recorded = Study.open(workdir).plain["slurm"]
    assert (recorded["time"], recorded["gpus"]) == ("08:00:00", 2)
    message = _one_line_error("run", "--spec", str(spec_file), "--workdir", str(workdir),
                              "--spec.seed=7", "--dry-run")  # fmt: skip
    assert "this folder holds a study with other ['seed']" in message


def test_a_damaged_state_metrics_or_jobs_file_is_a_one_line_error_naming_it(spec_file, tmp_path):
    """A cell's state file or metrics cut short (written on a node that crashed) ended `study
    status`, `study run` and `study report` with a JSONDecodeError traceback naming no file."""
    from focalnet_jax.study import slurm
    from focalnet_jax.study.cells import METRICS_JSON, STATE_FILE, Study
    from focalnet_jax.study.spec import StudyError, load_spec, validate

    workdir = tmp_path / "s"
    study = Study.create(workdir, validate(load_spec(str(spec_file)), str(spec_file)))
    cell = study.cell("ce/rep0/fold0")
    state = study.path(cell) / STATE_FILE
    state.parent.mkdir(parents=True)
    state.write_text('{"state": "do')
    for command in (["status"], ["run", "--dry-run"]):
        message = _one_line_error(*command, "--workdir", str(workdir))
        assert f"error: {state}: not a readable cell state file (" in message
        assert message.endswith("remove it, and `study run` runs the cell again (resuming its "
                                "checkpoint)")  # fmt: skip
    study.write_state(cell, "done")
    metrics = study.path(cell) / METRICS_JSON
    metrics.parent.mkdir(parents=True)
    metrics.write_text("")
    message = _one_line_error("report", "--workdir", str(workdir), "--partial")
    assert f"error: {metrics}: not a readable metrics file (Expecting value: " in message
    assert message.endswith("remove it, and `study run` evaluates the cell again")
    jobs = workdir / "slurm" / slurm.JOBS_FILE
    jobs.parent.mkdir()
    for text in ('{"job": "1"}', "[1]"):  # an object; an array of another type
        jobs.write_text(text)
        with pytest.raises(StudyError, match=re.escape(f"{jobs}: not a readable list of submit")):
            slurm.read_jobs(study)


def _stale_copy(store: Path, tmp_path: Path) -> Path:
    """A copy of `store` whose cases.json says format version 1 (refused by `open_store`)."""
    import shutil

    stale = shutil.copytree(store, tmp_path / "stale_store")
    table = json.loads((stale / "cases.json").read_text())
    table["settings"]["version"] = 1
    (stale / "cases.json").write_text(json.dumps(table))
    return stale


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--parallel", "0"], "--parallel 0: expected >= 1"),
        (["--devices", "abc"], "--devices 'abc': expected comma-separated GPU ids (integers >= 0)"),
        (["--devices", "0,-1"], "--devices '0,-1': expected comma-separated GPU ids"),
        # Two workers on one GPU (--dry-run: were it let through, nothing would run).
        (["--devices", "0,0", "--dry-run"], "--devices '0,0': GPU 0 is given twice"),
        (["--devices", "1,0,01", "--dry-run"], "--devices '1,0,01': GPU 1 is given twice"),
        # More cells at once than GPUs: a dry run said "3 at once", a real run refused it only
        # after recording the study.
        (["--parallel", "3", "--devices", "0,1"], "--parallel 3: more than the 2 GPUs ['0', '1']"),
        (["--parallel", "3", "--devices", "0,1", "--dry-run"], "--parallel 3: more than the 2"),
        (["--executor", "slurm", "--time", "banana"], "--time 'banana': expected a SLURM time"),
        (["--executor", "slurm", "--time", "1-2:3:4:5"], "--time '1-2:3:4:5': expected a SLURM"),
        # An empty --time dropped the spec's slurm.time from the job script.
        (["--executor", "slurm", "--time", ""], "--time '': expected a SLURM time limit"),
        # A newline wrote a shell line into the job script.
        (
            ["--executor", "slurm", "--sbatch", "--qos=x\necho INJECTED"],
            "--sbatch '--qos=x\\necho INJECTED': expected one '#SBATCH' option on one line",
        ),
        (["--executor", "slurm", "--sbatch=--qos=x\rid"], "--sbatch '--qos=x\\rid': expected"),
        (["--executor", "slurm", "--sbatch="], "--sbatch '': expected one '#SBATCH' option"),
        (
            ["--executor", "slurm", "--partition", "gpu\necho INJECTED"],
            "--partition 'gpu\\necho INJECTED': expected partition names separated by commas",
        ),
        # A flag of the other executor was ignored without a word.
        (["--gpus", "2"], "--gpus is a SLURM setting: it needs --executor slurm"),
        (["--sbatch=--hold"], "--sbatch is a SLURM setting: it needs --executor slurm"),
        (
            ["--executor", "slurm", "--parallel", "4"],
            "--parallel is for --executor local (SLURM places each cell's task)",
        ),
    ],
)
def test_run_flags_are_checked_before_anything_is_written(spec_file, tmp_path, flags, expected):
    workdir = tmp_path / "s"
    message = _one_line_error("run", "--spec", str(spec_file), "--workdir", str(workdir), *flags)
    assert expected in message
    assert not workdir.exists()


def test_a_run_refused_for_the_lock_records_nothing(spec_file, tmp_path):
    """A `study run` refused because another holds the run lock recorded its grown spec first
    (repeats 2 -> 3), which then could never be shrunk back. The spec is recorded under the lock."""
    workdir = tmp_path / "s"
    argv = ["run", "--spec", str(spec_file), "--workdir", str(workdir)]
    _one_line_error(*argv, "--parallel", "0")  # refused: nothing made
    assert not workdir.exists()
    workdir.mkdir()
    holder = acquire_lock(workdir / RUN_LOCK)
    try:
        message = _one_line_error(*argv, "--spec.repeats=3")
    finally:
        release_lock(holder)
    assert "another `study run`" in message
    assert not (workdir / "study.json").exists()


def test_devices_outside_the_visible_gpus_are_refused(spec_file, tmp_path, monkeypatch):
    """Inside an allocation of GPUs 2 and 3, `--devices 0,1` set each cell's
    CUDA_VISIBLE_DEVICES to GPUs the allocation does not hold."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    workdir = tmp_path / "s"
    argv = ["run", "--spec", str(spec_file), "--workdir", str(workdir), "--dry-run"]
    message = _one_line_error(*argv, "--devices", "2,0")
    assert message.endswith(
        "--devices '2,0': GPU 0 is not among this process's CUDA_VISIBLE_DEVICES='2,3'; give ids "
        "from it (they are the system's ids, as CUDA_VISIBLE_DEVICES takes them) or leave "
        "--devices out"
    )
    assert not workdir.exists()


def test_slurm_time_formats():
    from focalnet_jax.study.slurm_options import check_time

    for value in ("90", "30:00", "04:00:00", "2-12", "2-12:30", "2-12:30:00", "120:00:00"):
        assert check_time(value) == value
    for value in ("banana", "1:2:3:4", "-5", "1-", "4h", "01:00 ", ""):
        with pytest.raises(ValueError, match="expected a SLURM time limit"):
            check_time(value)


def test_arm_name_with_a_dot_is_a_one_line_error_naming_it(store, tmp_path):
    spec = write_spec(tmp_path / "dot.py", store, arms={"../x": ARMS["ce"]}, ensembles={})
    message = _one_line_error("run", "--spec", str(spec), "--workdir", str(tmp_path / "bad"))
    assert message.endswith("name '../x': expected letters, digits, '_', '-' (no dots)")
    spec = write_spec(tmp_path / "slash.py", store, arms={"a/b": ARMS["ce"]}, ensembles={})
    message = _one_line_error("run", "--spec", str(spec), "--workdir", str(tmp_path / "bad"))
    assert "arm 'a/b': expected letters, digits, '_', '-'" in message
    # `$` of a plain match would let a trailing newline into the folder name.
    spec = write_spec(tmp_path / "newline.py", store, arms={"ce\n": ARMS["ce"]}, ensembles={})
    message = _one_line_error("run", "--spec", str(spec), "--workdir", str(tmp_path / "bad"))
    assert "arm 'ce\\n': expected letters, digits, '_', '-'" in message
    assert not (tmp_path / "bad").exists()


def test_arm_names_that_differ_only_in_case_are_refused(store, tmp_path):
    """Arms `ce` and `CE` are one folder on a case-insensitive file system: their cells would
    train into, and report, each other's runs."""
    arms = {"ce": ARMS["ce"], "CE": ARMS["ce"]}
    spec = write_spec(tmp_path / "case.py", store, arms=arms, ensembles={})
    message = _one_line_error("run", "--spec", str(spec), "--workdir", str(tmp_path / "bad"))
    assert message.endswith(
        "'CE' and 'ce': names that differ only in letter case are one folder on a "
        "case-insensitive file system; rename one"
    )
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("arg", ["fold=0", "store=elsewhere"])
def test_a_base_that_sets_the_fold_or_store_is_refused_before_any_cell(spec_file, arg, tmp_path):
    """`base = configs/picai.py:fold=0` passed validation and --dry-run; then every cell of
    another fold failed at its start (`train` refuses `:fold=0` with --config.data.fold=1)."""
    base = f"{REPO / 'configs' / 'focalnet.py'}:{arg}"
    args = ("--spec", str(spec_file), f"--spec.base={base}", "--workdir", str(tmp_path / "bad"))
    message = _one_line_error("run", *args, "--dry-run")
    key, field = ("fold", "folds") if arg.startswith("fold") else ("store", "store")
    assert message.endswith(
        f"base {base!r}: its {key}= is for one run; the study sets data.{key} of each cell (its "
        f"{field!r} field): drop {key}= from base"
    )
    assert not (tmp_path / "bad").exists()


def test_corrupt_study_file_is_a_one_line_error_naming_it(tmp_path):
    (tmp_path / "study.json").write_text('{"arms": ')
    for action in ("status", "run", "report"):
        message = _one_line_error(action, "--workdir", str(tmp_path))
        assert f"{tmp_path / 'study.json'}: not a readable study file" in message


def test_a_study_file_without_a_recorded_field_is_a_one_line_error_naming_it(spec_file, tmp_path):
    """`{}` (another program's study.json) ended status, run and report in a KeyError traceback;
    one without `evaluate` passed `run --dry-run`, and each cell then failed."""
    from focalnet_jax.study.cells import Study
    from focalnet_jax.study.spec import load_spec, validate

    workdir = tmp_path / "s"
    Study.create(workdir, validate(load_spec(str(spec_file)), str(spec_file)))
    recorded = json.loads((workdir / "study.json").read_text())
    del recorded["evaluate"]
    (workdir / "study.json").write_text(json.dumps(recorded))
    for action in ("status", "run", "report"):
        message = _one_line_error(
            action, "--workdir", str(workdir), *(["--dry-run"] * (action == "run"))
        )
        assert message.endswith(
            f"{workdir / 'study.json'}: not a readable study file (no evaluate); use a new "
            "--workdir"
        )
    (workdir / "study.json").write_text("{}")
    message = _one_line_error("status", "--workdir", str(workdir))
    assert message.endswith(
        "(no base, store, repeats, num_folds, folds, seed, common, arms, ensembles, evaluate, "
        "slurm, spec_file); use a new --workdir"
    )


RECORDED = {
    "base": "/studies/configs/focalnet.py",
    "store": "/studies/store",
    "repeats": 1,
    "num_folds": 2,
    "folds": [0, 1],
    "seed": 0,
    "common": {},
    "arms": {"ce": {}, "fl": {}},
    "ensembles": {"both": ["ce", "fl"]},
    "evaluate": {"picai_bootstraps": 0, "figures": False},
    "slurm": {"partition": "", "time": "", "gpus": 0, "cpus": 0, "throttle": 0, "extra": []},
    "spec_file": "/studies/tiny_study.py",
}  # a study.json as `study run` records it, written by hand (nothing is read from its paths)


def write_recorded(workdir: Path, **changes) -> Path:
    """`workdir/study.json` holding RECORDED with `changes`; returns it."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "study.json").write_text(json.dumps({**RECORDED, **changes}))
    return workdir / "study.json"


@pytest.mark.parametrize(
    ("changes", "argv", "expected"),
    [
        # A TypeError traceback in status; an empty table and exit 0 for repeats < 1.
        ({"repeats": "2"}, ["status"], "repeats='2': expected an integer >= 1"),
        ({"repeats": -1}, ["status"], "repeats=-1: expected an integer >= 1"),
        # A ValueError traceback in report; an AttributeError in a dry run.
        ({"ensembles": "x"}, ["report", "--partial"],
         "ensembles='x': expected a dict: name -> arm names"),
        ({"common": None}, ["run", "--dry-run"], "common=None: expected a dict"),
        # `study cell` trained fold 7 of a 2-fold study.
        ({"folds": [0, 7]}, ["cell", "--cell", "ce/rep0/fold0"], "folds=[0, 7]: expected folds"),
        ({"base": 3}, ["status"], "base=3: expected a path"),
        ({"seed": -1}, ["status"], "seed=-1: repeats 0..0 train with seeds"),
        # A ValueError traceback writing the job script; "--mem" written one letter a line.
        ({"slurm": {**RECORDED["slurm"], "gpus": "two"}}, ["run", "--dry-run"],
         "slurm.gpus='two': expected an integer >= 0"),
        ({"slurm": {**RECORDED["slurm"], "extra": "--mem=4G"}}, ["status"],
         "slurm.extra='--mem=4G': expected a list of '#SBATCH' options"),
    ],
)  # fmt: skip
def test_a_study_file_with_a_field_of_another_type_or_range_is_a_one_line_error(
    tmp_path, changes, argv, expected
):
    """study.json edited by hand is checked on reading as the spec is (`spec.check_fields`)."""
    from focalnet_jax.study.cells import Study

    write_recorded(tmp_path / "ok")
    assert len(Study.open(tmp_path / "ok").cells()) == 4  # unchanged, it reads
    path = write_recorded(tmp_path / "s", **changes)
    message = _one_line_error(argv[0], "--workdir", str(tmp_path / "s"), *argv[1:])
    assert f"error: {path}: not a readable study file ({expected}" in message
    assert message.endswith("); use a new --workdir")


def test_a_study_recorded_with_slurm_options_now_refused_opens_and_its_job_script_refuses_them(
    tmp_path,
):
    """A study.json recorded before the SLURM options were checked (a time `8h`, an empty or a
    two-line `extra` item) still opens (its trained cells are not lost, and a spec may replace
    the options); the job script refuses the options it would write."""
    from focalnet_jax.study.cells import Study
    from focalnet_jax.study.errors import StudyError
    from focalnet_jax.study.slurm import sbatch_script

    slurm = {**RECORDED["slurm"], "time": "8h", "extra": ["", "--qos=x\necho INJECTED"]}
    write_recorded(tmp_path, slurm=slurm)
    study = Study.open(tmp_path)
    assert len(study.cells()) == 4
    for options, expected in [
        (slurm, "slurm.time '8h': expected a SLURM time limit"),
        ({**slurm, "time": ""}, "slurm.extra item '': expected one '#SBATCH' option on one line"),
        ({**slurm, "time": "", "extra": slurm["extra"][1:]},
         "slurm.extra item '--qos=x\\necho INJECTED': expected one '#SBATCH' option on one line"),
        ({**slurm, "time": "", "extra": [], "partition": "gpu\nid"},
         "slurm.partition 'gpu\\nid': expected partition names separated by commas"),
    ]:  # fmt: skip
        with pytest.raises(StudyError) as refused:
            sbatch_script(study, tmp_path / "tasks.txt", 4, options, "study")
        assert str(refused.value).startswith(expected)


@pytest.mark.parametrize(
    ("record", "argv", "expected"),
    [
        # A ValueError, then a TypeError traceback in report; a TypeError (len) in status.
        ({"state": "done", "attempts": "x"}, ["report"], "attempts 'x': expected a number"),
        ({"state": "done", "total_seconds": None}, ["report", "--partial"],
         "total_seconds None: expected a number"),
        ({"state": 5}, ["status"],
         "state 5: expected one of done, failed, running, interrupted, pending"),
        ({"state": "finished"}, ["status"], "state 'finished': expected one of done, "),
        ({"state": "failed", "seconds": True}, ["status"], "seconds True: expected a number"),
        ({"state": "failed", "attempt_seconds": ["x"]}, ["status"],
         "attempt_seconds ['x']: expected a list of numbers"),
    ],
)  # fmt: skip
def test_a_state_file_with_a_field_of_another_type_is_a_one_line_error_naming_it(
    tmp_path, record, argv, expected
):
    from focalnet_jax.study.cells import STATE_FILE

    write_recorded(tmp_path)
    state = tmp_path / "ce" / "rep0" / "fold0" / STATE_FILE
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({"cell": "ce/rep0/fold0", "time": 1.0, **record}))
    message = _one_line_error(argv[0], "--workdir", str(tmp_path), *argv[1:])
    assert f"error: {state}: not a readable cell state file ({expected}" in message
    assert message.endswith("remove it, and `study run` runs the cell again (resuming its "
                            "checkpoint)")  # fmt: skip


def test_report_refuses_a_file_where_its_folder_goes_and_keeps_it(tmp_path):
    """A file at DIR/report was moved aside for good to a hidden `.report.tmp-...old` name."""
    write_recorded(tmp_path)
    (tmp_path / "report").write_text("mine")
    for partial in ([], ["--partial"]):
        message = _one_line_error("report", "--workdir", str(tmp_path), *partial)
        expected = f"error: report folder {tmp_path / 'report'} exists and is not a folder"
        assert message.endswith(expected)
    assert (tmp_path / "report").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report", "study.json"]


def test_dry_run_refuses_a_changed_spec_as_the_real_run_does(spec_file, tmp_path):
    from focalnet_jax.study.cells import Study
    from focalnet_jax.study.spec import load_spec, validate

    workdir = tmp_path / "s"
    Study.create(workdir, validate(load_spec(str(spec_file)), str(spec_file)))
    recorded = (workdir / "study.json").read_text()
    run = ["run", "--spec", str(spec_file), "--workdir", str(workdir), "--executor", "slurm"]
    for dry in ([], ["--dry-run"]):
        message = _one_line_error(*run, *dry, "--spec.common.train.steps=4")
        assert "this folder holds a study with other ['common']" in message
    assert (workdir / "study.json").read_text() == recorded
    assert sorted(p.name for p in workdir.iterdir()) == ["study.json"]


def test_spec_may_add_runs_to_a_study_and_nothing_else(spec_file, store, tmp_path, capsys):
    """More repeats, folds, arms or ensembles add cells (the done ones keep their configs), so a
    benchmark can grow from 10 to 20 runs per arm in its folder; fewer runs or a changed arm is
    refused, and a dry run of a growth writes nothing."""
    from focalnet_jax import cli
    from focalnet_jax.study.cells import Study
    from focalnet_jax.study.spec import load_spec, validate

    gl = {"loss": {"name": "focal", "mfl": False, "gamma": 1.0}}
    with_gl = write_spec(tmp_path / "with_gl.py", store, arms={**ARMS, "gl": gl})

    def plain(*overrides, spec=spec_file):
        return validate(load_spec(str(spec), overrides), str(spec))

    workdir = tmp_path / "s"
    Study.create(workdir, plain("--spec.folds=(0,)"))
    recorded = (workdir / "study.json").read_text()
    run = ["study", "run", "--spec", str(spec_file), "--workdir", str(workdir), "--dry-run"]
    assert cli.main([*run, "--spec.folds=(0,)", "--spec.repeats=3"]) == 0
    assert "dry run: 6 cells would run" in capsys.readouterr().out
    assert (workdir / "study.json").read_text() == recorded
    grown = Study.create(workdir, plain("--spec.repeats=3", spec=with_gl))
    assert "study grows (repeats 2 -> 3; folds [1]; arms ['gl'])" in capsys.readouterr().out
    assert len(Study.open(workdir).cells()) == len(grown.cells()) == 3 * 3 * 2
    run[3] = str(with_gl)
    for changed, fields in (
        (["--spec.repeats=2"], "['repeats']"),
        (["--spec.repeats=3", "--spec.arms.gl.loss.gamma=2.0"], "['arms']"),
        (["--spec.repeats=3", "--spec.seed=1"], "['seed']"),
    ):
        message = _one_line_error(*run[1:], *changed)
        assert f"this folder holds a study with other {fields}; use a new --workdir" in message


def test_spec_overrides_take_a_value_after_a_space_as_config_overrides_do(
    spec_file, tmp_path, capsys
):
    """`--spec.repeats 3` was refused (`unrecognized argument`), where `--config.train.steps 3`
    works for `focalnet train`; both forms now give the same spec."""
    from focalnet_jax import cli
    from focalnet_jax.study.spec import load_spec

    spaced = load_spec(str(spec_file), ["--spec.repeats", "3", "--spec.common.train.steps", "7"])
    joined = load_spec(str(spec_file), ["--spec.repeats=3", "--spec.common.train.steps=7"])
    assert spaced.to_dict() == joined.to_dict()
    assert (spaced.repeats, spaced.common.train.steps) == (3, 7)
    run = ["run", "--spec", str(spec_file), "--workdir", str(tmp_path / "s"), "--dry-run"]
    assert cli.main(["study", *run, "--spec.repeats", "3", "--spec.folds", "(0,)"]) == 0
    assert "dry run: 6 cells would run" in capsys.readouterr().out  # 2 arms x 3 repeats
    message = _one_line_error(*run, "--spec.repeats")
    assert message.endswith("override '--spec.repeats' has no value")


def test_a_growth_refused_for_changed_inputs_writes_nothing(spec_file, tmp_path):
    """A study grown (`--spec.repeats=3`) after its store changed was refused only after the
    grown study.json was written; a dry run did not compare the inputs at all."""
    from focalnet_jax.study.cells import Study
    from focalnet_jax.study.inputs import INPUTS
    from focalnet_jax.study.spec import load_spec, validate

    workdir = tmp_path / "s"
    Study.create(workdir, validate(load_spec(str(spec_file)), str(spec_file)))
    recorded = json.loads((workdir / "study.json").read_text())
    recorded[INPUTS]["store_cases"] = "0" * 64  # as if the store's cases changed since
    (workdir / "study.json").write_text(json.dumps(recorded))
    before = (workdir / "study.json").read_text()
    run = ["run", "--spec", str(spec_file), "--workdir", str(workdir), "--spec.repeats=3"]
    for dry in (["--dry-run"], []):
        message = _one_line_error(*run, *dry)
        assert "the study's store" in message and "changed since the study was recorded" in message
    assert (workdir / "study.json").read_text() == before
    assert sorted(p.name for p in workdir.iterdir()) == ["study.json"]


def test_paths_are_recorded_absolute_and_a_study_with_relative_ones_resumes(
    spec_file, store, tmp_path, monkeypatch, capsys
):
    """`common`'s split files (and an arm's pretrained weights) given relative to the folder the
    study starts in are recorded absolute, as training records a run's paths, so `study run` or
    a cell started from another folder reads the same files. A study.json recorded before, with
    relative paths, resumes from its folder and is recorded with absolute ones."""
    from focalnet_jax.study.cells import Study
    from focalnet_jax.study.inputs import check_inputs
    from focalnet_jax.study.spec import cell_overrides, load_spec, validate

    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    (start / "splits").mkdir(parents=True)
    (start / "weights").mkdir()
    (start / "weights" / "resnet.npz").touch()  # only its path is used here
    elsewhere.mkdir()
    ids = sorted(c["case_id"] for c in json.loads((store / "cases.json").read_text())["cases"])
    for k in (0, 1):
        val = ids[k::2]
        fold = {"train": [i for i in ids if i not in val], "val": val}
        (start / "splits" / f"fold-{k}.json").write_text(json.dumps(fold))
    overrides = ["--spec.folds=(0,)", "--spec.repeats=1", "--spec.common.data.splits=splits"]
    overrides.append("--spec.arms.fl.model.pretrained=weights/resnet.npz")
    monkeypatch.chdir(start)
    plain = validate(load_spec(str(spec_file), overrides), str(spec_file))
    assert plain["common"]["data"]["splits"] == str(start / "splits")
    assert plain["arms"]["fl"]["model"]["pretrained"] == str(start / "weights" / "resnet.npz")
    assert plain["arms"]["ce"] == ARMS["ce"]  # no path: unchanged
    assert f"--config.data.splits={start / 'splits'}" in cell_overrides(plain, "ce", 0, 0)
    # A study recorded with the relative paths, as before: resumed from its folder, it is the
    # same study, now recorded absolute; from another folder its cells read the same files.
    workdir = tmp_path / "s"
    relative = {
        **plain,
        "common": {**plain["common"], "data": {"slices": "all", "splits": "splits"}},
    }
    relative["arms"] = {
        **plain["arms"],
        "fl": {**ARMS["fl"], "model": {"pretrained": "weights/resnet.npz"}},
    }
    Study.create(workdir, relative)
    Study.create(workdir, plain)
    assert "study grows" not in capsys.readouterr().out
    recorded = json.loads((workdir / "study.json").read_text())
    assert recorded["common"] == plain["common"] and recorded["arms"] == plain["arms"]
    monkeypatch.chdir(elsewhere)
    reopened = Study.open(workdir)
    check_inputs(reopened.plain, workdir)
    assert cell_overrides(reopened.plain, "ce", 0, 0) == cell_overrides(plain, "ce", 0, 0)


def test_spec_overrides_may_add_config_keys_to_common_and_arms(store):
    """The shipped bosma22 spec has `common = {}`: `--spec.common.train.steps=500`, as the docs
    show it, was refused (unknown key 'common.train'); common and arm overrides may name any key
    of the base config, read as Python literals, and a typo is still refused by the base."""
    from focalnet_jax.study.spec import StudyError, cell_overrides, load_spec, validate

    bosma22 = f"{REPO / 'configs' / 'studies' / 'bosma22.py'}:{store}"
    overrides = [
        "--spec.num_folds=2",
        "--spec.common.train.steps=500",
        "--spec.arms.ce_fl.loss.weights=(0.25,0.75)",
        "--spec.arms.fl.loss.gamma=1.0",
        "--spec.arms.fl2.loss.name=focal",
        "--spec.arms.fl2.loss.mfl=false",
    ]
    plain = validate(load_spec(bosma22, overrides), bosma22)
    assert plain["common"] == {"train": {"steps": 500}}
    assert plain["arms"]["ce_fl"]["loss"]["weights"] == [0.25, 0.75]
    assert plain["arms"]["fl"]["loss"] == {"name": "focal", "mfl": False, "gamma": 1.0}
    assert plain["arms"]["fl2"] == {"loss": {"name": "focal", "mfl": False}}  # a new arm
    cell = cell_overrides(plain, "ce_fl", 1, 0)
    assert "--config.train.steps=500" in cell and "--config.loss.weights=(0.25, 0.75)" in cell
    with pytest.raises(StudyError, match=r"^common on base .*: unknown config key 'train.stpes'"):
        validate(load_spec(bosma22, [*overrides, "--spec.common.train.stpes=5"]), bosma22)
    with pytest.raises(StudyError, match="unknown config key 'comon'"):
        load_spec(bosma22, ["--spec.comon.train.steps=5"])


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ("spec.arms = {'ce': 'sigmoid_ce'}",
         "arm 'ce': 'sigmoid_ce': expected a nested dict of config overrides"),
        ("spec.arms = {'ce': {}}\n    spec.ensembles = {'both': 5}",
         "ensemble 'both': 5: expected a list of arm names"),
    ],
)  # fmt: skip
def test_spec_arms_and_ensembles_of_the_wrong_type_are_one_line_errors(
    store, tmp_path, fields, expected
):
    """A spec file's arm or ensemble of the wrong type gave a traceback (AttributeError,
    TypeError), not the one-line error of every other spec mistake."""
    from focalnet_jax.study.spec import StudyError, load_spec, validate

    path = tmp_path / "typed.py"
    path.write_text(
        "import ml_collections\n\ndef get_config():\n"
        "    spec = ml_collections.ConfigDict()\n"
        f"    spec.base, spec.store = {str(REPO / 'configs' / 'focalnet.py')!r}, {str(store)!r}\n"
        "    spec.repeats, spec.num_folds = 1, 2\n"
        f"    {fields}\n    return spec\n"
    )
    with pytest.raises(StudyError, match="^" + re.escape(expected)):
        validate(load_spec(str(path)), str(path))


def test_an_ensemble_of_lesion_only_and_graded_arms_is_refused(store, tmp_path):
    """An ensemble of a U-Net-Sing arm (binary: its lesion probability in every column) and a
    FocalNet arm averaged the lesion probability into P(GS >= 8) and the rest, and evaluated
    it without a word; `predict` refuses such an ensemble."""
    from focalnet_jax.evaluation.predictions import write_case
    from focalnet_jax.study.ensembles import average_predictions
    from focalnet_jax.study.spec import StudyError, load_spec, validate

    path = tmp_path / "mixed.py"
    path.write_text(
        "import ml_collections\n\ndef get_config():\n"
        "    spec = ml_collections.ConfigDict()\n"
        f"    spec.base, spec.store = {str(REPO / 'configs' / 'focalnet.py')!r}, {str(store)!r}\n"
        "    spec.repeats, spec.num_folds = 1, 2\n"
        "    spec.arms = {'fl': {}, 'sing': {'loss': {'name': 'binary_ce', 'mfl': False}}}\n"
        "    spec.ensembles = {'mix': ('fl', 'sing')}\n    return spec\n"
    )
    expected = (
        "ensemble 'mix': its arms disagree on output encodings (fl: ordinal; sing: binary): a "
        "lesion-only model's score is no P(class >= k) of a graded one"
    )
    with pytest.raises(StudyError, match="^" + re.escape(expected) + "$"):
        validate(load_spec(str(path)), str(path))
    # Predictions of such members (a spec edited since, cells done): refused as they meet.
    for name, encoding in (("a", None), ("b", "binary")):
        write_case(tmp_path / name, "c1", scores=np.full((1, 8, 8, 5), 0.5, np.float32),
                   lesions=np.zeros((1, 8, 8), np.int32), lesion_classes=[],
                   spacing=(1.0, 1.0), patient_id="p1")  # fmt: skip
        record = {"models": [{"run": f"/{name}", "step": 1}], "tta": "none"}
        record |= {"output_encoding": encoding} if encoding else {}
        (tmp_path / name / "models.json").write_text(json.dumps(record))
    with pytest.raises(StudyError, match=r"members disagree on output encodings: .*a: graded; "):
        average_predictions([tmp_path / "a", tmp_path / "b"], tmp_path / "mean")
    assert not (tmp_path / "mean").exists()
    (tmp_path / "a" / "models.json").write_text(json.dumps(record))  # both binary: recorded
    average_predictions([tmp_path / "a", tmp_path / "b"], tmp_path / "mean")
    assert json.loads((tmp_path / "mean" / "models.json").read_text()) == {
        "output_encoding": "binary"
    }


def test_spec_file_fields_misspelt_are_refused(tmp_path):
    """A spec file's `fold = (1,)` (for `folds`) or `slurm = {"gpu": 1}` (for `gpus`) was kept
    silently: the study ran every fold, its SLURM tasks asked for no GPU."""
    from focalnet_jax.study.spec import StudyError, load_spec

    def spec_with(extra: str) -> str:
        path = tmp_path / "typo.py"
        path.write_text(
            "import ml_collections\n\ndef get_config():\n"
            "    spec = ml_collections.ConfigDict()\n"
            "    spec.base, spec.store, spec.repeats, spec.num_folds = 'b.py', 's', 1, 2\n"
            "    spec.arms = {'ce': {'loss': {'name': 'sigmoid_ce'}}}\n"
            f"    {extra}\n    return spec\n"
        )
        return str(path)

    assert load_spec(spec_with("spec.folds = (1,)")).folds == (1,)
    assert load_spec(spec_with("spec.slurm = {'gpus': 1}")).slurm.gpus == 1
    with pytest.raises(StudyError, match=r"^spec .*typo.py: unknown field 'fold'; expected one of"):
        load_spec(spec_with("spec.fold = (1,)"))
    with pytest.raises(StudyError, match=r"unknown field\(s\) \['slurm.gpu'\]; slurm has \["):
        load_spec(spec_with("spec.slurm = {'gpu': 1, 'time': '01:00:00'}"))
    with pytest.raises(StudyError, match=r"unknown field\(s\) \['evaluate.picai_bootstrap'\]"):
        load_spec(spec_with("spec.evaluate = {'picai_bootstrap': 500}"))
    # A field of another type than its default's ended in ConfigDict's TypeError traceback.
    for extra, message in [
        ("spec.seed = '1'", "seed='1': expected int (its default is 0)"),
        ("spec.seed = 1.5", "seed=1.5: expected int (its default is 0)"),
        ("spec.evaluate = {'picai_bootstraps': 'x'}",
         "evaluate.picai_bootstraps='x': expected int (its default is 0)"),
        ("spec.slurm = {'gpus': 'one'}", "slurm.gpus='one': expected int (its default is 0)"),
    ]:  # fmt: skip
        with pytest.raises(StudyError, match=r"^spec .*typo.py: " + re.escape(message) + "$"):
            load_spec(spec_with(extra))


def test_spec_store_is_opened_before_anything_runs(spec_file, store, tmp_path):
    workdir = tmp_path / "bad"
    run = ["run", "--spec", str(spec_file), "--workdir", str(workdir)]
    empty = tmp_path / "empty"
    empty.mkdir()
    message = _one_line_error(*run, f"--spec.store={empty}")
    assert message.startswith("focalnet study run: error: store ")
    assert "no cases.json" in message
    message = _one_line_error(*run, f"--spec.store={_stale_copy(store, tmp_path)}")
    assert "format version 1" in message
    # The store holds 8 patients (one case each): 9 folds cannot all hold a patient.
    message = _one_line_error(*run, "--spec.num_folds=9")
    assert f"num_folds=9: store {store} has only 8 patients" in message
    assert not workdir.exists()


def test_arm_components_must_be_in_the_store(store, tmp_path):
    arms = {"ce": {"data": {"components": ("t2w", "adc", "dce")}}}
    spec = write_spec(tmp_path / "dce.py", store, arms=arms, ensembles={})
    message = _one_line_error("run", "--spec", str(spec), "--workdir", str(tmp_path / "bad"))
    assert "arm 'ce': data.components ('t2w', 'adc', 'dce'): ['dce'] not in store" in message


def test_arm_config_is_checked_as_its_cells_would(store, tmp_path):
    # Valid keys, a value `focalnet train` refuses: refused before any cell starts.
    arms = {"fl": {"loss": {"name": "ordinal_focal", "mfl": True, "mfl_weight": "bogus"}}}
    spec = write_spec(tmp_path / "weight.py", store, arms=arms, ensembles={})
    message = _one_line_error("run", "--spec", str(spec), "--workdir", str(tmp_path / "bad"))
    assert "arm 'fl': loss.mfl_weight: expected 'auto' or a number, got 'bogus'" in message
    assert not (tmp_path / "bad").exists()


def test_verbose_is_accepted_after_every_action(tmp_path, capsys):
    for action in ("status", "report", "cell", "run"):
        argv = [action, "--workdir", str(tmp_path / "none"), "--verbose"]
        argv += ["--cell", "a/rep0/fold0"] if action == "cell" else []
        message = _one_line_error(*argv)
        assert message.startswith(f"focalnet study {action}: error: {tmp_path / 'none'}: not a")
        assert "Traceback" in capsys.readouterr().err  # --verbose took effect


def test_failed_command_records_its_one_line_error(tmp_path):
    from focalnet_jax.study.cell_runner import run_focalnet

    log = tmp_path / "cell.log"
    log.write_text("earlier attempt\n")
    reason = run_focalnet(["folds", f"--store={tmp_path / 'none'}"], log)
    assert reason == f"focalnet folds: error: store {tmp_path / 'none'} does not exist"
    text = log.read_text()
    assert text.startswith("earlier attempt\n$ focalnet folds --store=") and text.endswith(
        reason + "\n"
    )


def test_a_command_killed_by_a_signal_records_the_signal_not_its_last_progress_line(
    tmp_path, monkeypatch
):
    from focalnet_jax.study.cell_runner import run_focalnet

    # A child that prints a progress-bar frame and is then killed (as by the out-of-memory killer).
    child = tmp_path / "python"
    child.write_text("#!/bin/sh\necho 'train:  40%|####      | 160/400'\nkill -9 $$\n")
    child.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(child))
    log = tmp_path / "cell.log"
    assert run_focalnet(["train", "--workdir", "w"], log) == "focalnet train killed by SIGKILL"
    child.write_text("#!/bin/sh\necho 'ValueError: x'\necho '10/400'\nkill -15 $$\n")
    assert run_focalnet(["evaluate"], log) == "focalnet evaluate killed by SIGTERM (ValueError: x)"


def test_report_refuses_a_metric_missing_from_metrics_json(capsys):
    from focalnet_jax.study.report import _lookup
    from focalnet_jax.study.spec import StudyError

    metrics = {"picai": {"auroc": 0.75, "ap": None}, "roc": {"skipped": "one class"}}
    assert _lookup(metrics, ("picai", "auroc"), "c/eval/metrics.json", partial=False) == 0.75
    assert math.isnan(_lookup(metrics, ("picai", "ap"), "c", partial=False))  # undefined: null
    assert math.isnan(_lookup(metrics, ("roc", "gs_ge_7", "auc"), "c", partial=False))
    with pytest.raises(StudyError, match=r"^c/eval/metrics.json: no picai.score "):
        _lookup(metrics, ("picai", "score"), "c/eval/metrics.json", partial=False)
    assert math.isnan(_lookup(metrics, ("picai", "score"), "c/m.json", partial=True))
    assert "warning: c/m.json: no picai.score" in capsys.readouterr().err
    # Not a number (a dict traced back; a string or a bool was read as 0.7 or 1.0; Infinity,
    # which evaluate never writes, was left out of the mean and the tests without a word).
    for value in ({"value": 0.5}, "0.7", True, [0.7], math.inf, -math.inf, 10**400):
        with pytest.raises(StudyError) as refused:
            _lookup({"picai": {"auroc": value}}, ("picai", "auroc"), "c/m.json", partial=True)
        assert str(refused.value) == (
            f"c/m.json: picai.auroc is {value!r}, not a number (damaged or edited?); remove the "
            "file, and `study run` evaluates the cell again"
        )
    assert _lookup({"picai": {"auroc": 1}}, ("picai", "auroc"), "c", partial=False) == 1.0


def test_report_says_which_metrics_a_cell_did_not_evaluate_and_why():
    """A cell evaluated without picai_eval read as NaN on three headline metrics, left out of
    their tests, and the report did not say why."""
    from focalnet_jax.study.report import Collected, _skipped_lines, skipped_metrics

    absent = "picai_eval is not installed (No module named 'picai_eval'); install the 'picai' extra"
    rows = [{"arm": a, "repeat": 0, "fold": f} for a, f in (("ce", 0), ("ce", 1), ("fl", 0))]
    metrics = [
        {"picai": {"skipped": absent}, "roc": {"gs_ge_7": {"auc": 0.7}}},
        {"picai": {"auroc": 0.8, "ap": 0.5, "score": 0.65}, "roc": {"skipped": "one class"}},
        {"picai": {"skipped": absent}, "roc": {"skipped": "one class"}},
    ]
    skipped = skipped_metrics(Collected(rows=rows, metrics=metrics))
    picai = {
        m: ["ce/rep0/fold0", "fl/rep0/fold0"] for m in ("picai_auroc", "picai_ap", "picai_score")
    }
    roc = {m: ["ce/rep0/fold1", "fl/rep0/fold0"] for m in ("roc_gs_ge_7_auc", "roc_gs_ge_4+3_auc")}
    assert skipped == {absent: picai, "one class": roc}
    assert _skipped_lines(skipped) == [
        "",
        "**Not evaluated or undefined** (picai_auroc, picai_ap, picai_score) in 2 cells "
        f"(ce/rep0/fold0, fl/rep0/fold0): {absent}. Those runs are n/a for them and left out of "
        "their tests.",
        "",
        "**Not evaluated or undefined** (roc_gs_ge_7_auc, roc_gs_ge_4+3_auc) in 2 cells "
        "(ce/rep0/fold1, fl/rep0/fold0): one class. Those runs are n/a for them and left out of "
        "their tests.",
    ]


def test_report_names_the_metrics_a_cell_evaluated_as_undefined():
    """A fold whose top-12 detections lay only on class >= 2 lesions, or whose cases were all
    positive: the evaluation wrote the AUC as NaN without a reason, and the report left the run
    out of those tests without a word (only runs.csv's n_a, n_b told)."""
    from types import SimpleNamespace

    from focalnet_jax.evaluation.picai import picai_metrics
    from focalnet_jax.evaluation.roc import gs_roc
    from focalnet_jax.study.report import Collected, skipped_metrics

    detections = SimpleNamespace(  # 3 detections: classes 3, 2, 3; scores P(class >= k)
        roc_scores=np.array([[0.9, 0.2, 0.1, 0.05, 0.01], [0.5, 0.1, 0.05, 0.01, 0.0],
                             [0.3, 0.05, 0.01, 0.0, 0.0]]),
        roc_classes=np.array([3, 2, 3], np.int32),
        roc_grade_known=np.ones(3, bool),
    )  # fmt: skip
    roc = gs_roc([detections])
    # gs_ge_4+3 scores P(class >= 3) = 0.1, 0.05, 0.01: positives 0.1 and 0.01 against 0.05.
    assert np.isnan(roc["gs_ge_7"]["auc"]) and roc["gs_ge_4+3"]["auc"] == 0.5
    assert "skipped" not in roc["gs_ge_4+3"]
    all_positive = {c: ([(1.0, 0.8, 0.5)], 0.8) for c in ("c0", "c1")}
    picai = picai_metrics(all_positive, bootstraps=0)
    metrics = json.loads(json.dumps({"roc": roc, "picai": picai}, default=lambda a: a.tolist()))
    rows = [{"arm": "ce", "repeat": 0, "fold": 0}]
    auroc = "AUROC undefined: every one of the 2 cases has a clinically significant lesion"
    assert skipped_metrics(Collected(rows=rows, metrics=[metrics])) == {
        auroc: {"picai_auroc": ["ce/rep0/fold0"], "picai_score": ["ce/rep0/fold0"]},
        "AUC undefined: every top-12 detection lies on a lesion of class >= 2": {
            "roc_gs_ge_7_auc": ["ce/rep0/fold0"]
        },
    }
    # A NaN without a reason (metrics.json of an earlier version) is named too.
    del metrics["picai"]["undefined"]
    found = skipped_metrics(Collected(rows=rows, metrics=[metrics]))
    assert found["undefined (null in the cell's metrics.json)"] == {
        "picai_auroc": ["ce/rep0/fold0"],
        "picai_score": ["ce/rep0/fold0"],
    }


def test_report_partial_leaves_out_a_run_without_the_groups_froc_curve():
    """`study report --partial` (what the missing-metric error advises) ended in a KeyError
    traceback when a run's metrics.json lacked the FROC group."""
    from focalnet_jax.study.figures import froc_curves

    curve = {"fp": [0.0, 1.0], "sensitivity": [0.5, 1.0]}
    rows = [{"arm": "ce"}, {"arm": "ce"}, {"arm": "fl"}]
    metrics = [
        {"froc": {"cs": {"num_lesions": 2, "curve": curve}}},
        {"froc": {}},  # another version's metrics.json
        {"froc": {"cs": {"num_lesions": 0, "curve": curve}}},  # no lesion of the group
    ]
    assert froc_curves(rows, metrics, "cs") == {"ce": [([0.0, 1.0], [0.5, 1.0])], "fl": []}


def test_demo_rebuilds_a_store_of_an_older_format(store, tmp_path):
    from focalnet_jax.study.synthetic import _store_is_current

    assert _store_is_current(store)
    assert not _store_is_current(_stale_copy(store, tmp_path))
    assert not _store_is_current(tmp_path / "absent")


@pytest.mark.parametrize(
    ("module", "flag", "message"),
    [
        ("focalnet_jax.demo", "--workers=0", "--workers 0: expected at least 1"),
        ("focalnet_jax.demo", "--cases=0", "--cases 0: expected at least 1"),
        ("focalnet_jax.demo", "--seed=-1", "--seed -1: expected 0 to 4294967295"),
        ("focalnet_jax.study.synthetic", "--parallel=0", "--parallel 0: expected at least 1"),
    ],
)
def test_the_demo_and_synthetic_study_refuse_a_bad_flag_before_any_step(
    tmp_path, capsys, module, flag, message
):
    """`--workers 0` was refused by `focalnet preprocess` after the 60 cases were synthesised
    (35 s), `--parallel 0` by `study run` after the store was made; each left `--out` half full."""
    import importlib

    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as stopped:
        main(["--out", str(tmp_path / "out"), flag])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"python -m {module}: error: {message}"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("module", "name"),
    [("focalnet_jax.demo", "CONFIG"), ("focalnet_jax.study.synthetic", "SPEC")],
)
def test_the_demo_and_synthetic_study_outside_a_clone_stop_before_any_step(
    tmp_path, monkeypatch, module, name
):
    """Installed from a wheel (no configs/), the synthetic study synthesised and preprocessed
    its cases, then failed at `study run` on the missing spec file."""
    import importlib

    imported = importlib.import_module(module)
    monkeypatch.setattr(imported, name, tmp_path / "configs" / "missing.py")
    with pytest.raises(SystemExit, match="not found: run the .* from a clone of the repository"):
        imported.main(["--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_failed_step_of_the_demo_names_its_command(tmp_path):
    """`focalnet synth --out failed with status 2`: the command's name and its first flag."""
    from focalnet_jax.study.synthetic import focalnet

    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit, match="^focalnet synth failed with status 2$"):
        focalnet(["synth", "--out", str(tmp_path / "afile"), "--cases", "2"])


def test_synthetic_runner_refuses_data_made_with_other_arguments(tmp_path, capsys):
    """`--out` holding data of another `--cases`, `--seed` or `--single-share` was reused: the
    study then ran on data other than the command asked for. `focalnet synth` records what it
    was given in synth.json; data without it (an older version) is rebuilt, its store too."""
    from focalnet_jax.study.synthetic import synthetic_store

    # One preprocessing worker (`focalnet preprocess` itself): no pool started for 2 cases.
    store = synthetic_store(tmp_path, cases=2, seed=0, single_share=0.4, workers=1)
    assert "$ focalnet preprocess" in capsys.readouterr().out
    record = json.loads((tmp_path / "data" / "synth.json").read_text())
    assert (record["cases"], record["seed"], record["config"]["components"]) == (
        2, 0, ["t2w", "adc", "hbv"],
    )  # fmt: skip
    assert record["config"]["t2w_only_share"] == record["config"]["adc_only_share"] == 0.4
    cases = (store / "cases.json").read_bytes()
    assert synthetic_store(tmp_path, cases=2, seed=0, single_share=0.4) == store
    assert "$ focalnet" not in capsys.readouterr().out  # made as asked: kept
    for asked, differ in (
        ({"cases": 3, "seed": 0, "single_share": 0.4}, "cases 2 (asked 3)"),
        ({"cases": 2, "seed": 1, "single_share": 0.4}, "seed 0 (asked 1)"),
        (
            {"cases": 2, "seed": 0, "single_share": 0.3},
            "config.t2w_only_share 0.4 (asked 0.3), config.adc_only_share 0.4 (asked 0.3)",
        ),
    ):
        with pytest.raises(SystemExit, match=re.escape(f"synthetic data made with {differ};")):
            synthetic_store(tmp_path, **asked)
    assert "$ focalnet" not in capsys.readouterr().out
    (tmp_path / "data" / "synth.json").unlink()
    synthetic_store(tmp_path, cases=2, seed=0, single_share=0.4, workers=1)
    out = capsys.readouterr().out
    assert "has no synth.json (an older version)" in out and "$ focalnet preprocess" in out
    assert (store / "cases.json").read_bytes() == cases  # the same arguments: the same data


@pytest.mark.parametrize(
    ("arm", "expected"),
    [
        ({"loss": {"nme": "x"}}, "arm 'ce' on base"),  # checked against the base config
        ({"seed": 3}, "'seed' is set by the study"),
        ({"data": {"fold_seed": 7}}, "arm 'ce': 'data.fold_seed' chooses the folds, which every"),
        ({"loss": {"name": "ce_focal"}}, "loss.mfl=True with loss.name='ce_focal'"),
        # A cell failed on it only once it started, maybe hours later from a queue.
        ({"model": {"pretrained": "/no/such/r18.npz"}}, "'ce': model.pretrained /no/such/r18.npz:"),
        ({"model": {"pretrained": "None"}}, "None: no such file (without pretrained weights"),
    ],
)
def test_arm_overrides_are_checked_against_the_base_config(store, tmp_path, arm, expected):
    spec = write_spec(tmp_path / "bad.py", store, arms={"ce": arm}, ensembles={})
    message = _one_line_error("run", "--spec", str(spec), "--workdir", str(tmp_path / "bad"))
    assert expected in message
    assert not (tmp_path / "bad").exists()


def test_slurm_dry_run_prints_one_array_of_the_cells_not_done(spec_file, tmp_path):
    args = ["run", "--spec", str(spec_file), "--workdir", str(tmp_path / "s"), "--executor=slurm"]
    args += ["--dry-run", "--throttle=3", "--partition=gpu", "--time=02:00:00", "--gpus=1"]
    script = study(*args, "--sbatch=--qos=short").stdout
    assert "#SBATCH --array=0-7%3" in script and "#SBATCH --partition=gpu" in script
    assert "#SBATCH --gpus-per-task=1" in script and "#SBATCH --qos=short" in script
    assert "#SBATCH --time=02:00:00" in script
    assert f"{sys.executable} -m focalnet_jax.cli study cell --workdir" in script
    assert not (tmp_path / "s").exists()


def test_local_dry_run_prints_the_cell_commands_and_starts_nothing(spec_file, tmp_path):
    workdir = tmp_path / "s"
    args = ["run", "--spec", str(spec_file), "--workdir", str(workdir), "--dry-run"]
    lines = study(*args, "--parallel=2").stdout.splitlines()
    assert lines[0] == "8 cells: 0 done, 0 running or queued elsewhere, 8 to run"
    command = f"{sys.executable} -m focalnet_jax.cli study cell --workdir {workdir.resolve()}"
    order = [(r, k, arm) for r in (0, 1) for k in (0, 1) for arm in ("ce", "fl")]
    assert lines[1:9] == [f"{command} --cell {arm}/rep{r}/fold{k}" for r, k, arm in order]
    assert lines[9] == "dry run: 8 cells would run, 2 at once; nothing started"
    assert not workdir.exists()


def _require_slurm() -> None:
    reason = None
    if missing_binaries():
        reason = f"SLURM binaries missing: {missing_binaries()} (.ci/install_slurm.sh)"
    elif os.geteuid() != 0:
        reason = "the one-node SLURM cluster runs its daemons as root"
    if reason and os.environ.get("FOCALNET_REQUIRE_SLURM", "") not in ("", "0"):
        pytest.fail(reason + " (FOCALNET_REQUIRE_SLURM=1)")
    if reason:
        pytest.skip(reason)


@pytest.mark.slow
def test_slurm_job_array_gives_the_rows_of_the_local_study(finished, spec_file, tmp_path):
    _require_slurm()
    cluster = OneNodeCluster(tmp_path / "cluster")
    env = {**ENV, **cluster.env}
    workdir = tmp_path / "slurm_study"
    try:
        cluster.start()
        args = ["run", "--spec", str(spec_file), "--workdir", str(workdir), "--executor=slurm"]
        submitted = study(*args, "--spec.repeats=1", "--spec.folds=(1,)", env=env).stdout
        assert "submitted job array" in submitted
        cells = [workdir / arm / "rep0" / "fold1" / "study_cell.json" for arm in ("ce", "fl")]
        deadline = time.time() + 600  # two cells, each a training and an evaluation process
        while time.time() < deadline:
            states = [json.loads(c.read_text())["state"] if c.is_file() else "" for c in cells]
            if all(s in ("done", "failed") for s in states):
                break
            time.sleep(0.2)
        status = study("status", "--workdir", str(workdir), env=env).stdout
        assert states == ["done", "done"], status
        assert re.search(r"ce/rep0/fold1\s+done\s+\d+_0", status)
        study("report", "--workdir", str(workdir), env=env)
    finally:
        cluster.stop()
    local = {
        (r["arm"], r["repeat"], r["fold"]): r for r in read_csv(finished / "report" / "runs.csv")
    }
    slurm_rows = read_csv(workdir / "report" / "runs.csv")
    assert len(slurm_rows) == 3  # ce, fl and their ensemble
    for row in slurm_rows:
        expected = local[(row["arm"], row["repeat"], row["fold"])]
        assert row.keys() == expected.keys()
        for key, value in row.items():
            if key == "total_seconds":  # the time each took
                continue
            if key in ("arm", "kind", "repeat", "fold", "seed", "num_patients", "attempts"):
                assert value == expected[key]
            else:
                assert float(value) == pytest.approx(float(expected[key]), abs=1e-6, nan_ok=True)


@pytest.mark.slow
def test_slurm_submits_no_cell_whose_new_task_waits_in_the_queue(spec_file, tmp_path):
    """A cell whose last task failed (its state records that task) and that was submitted again:
    while the new task waits (held) in the queue, the cell is `queued`, and another `study run`
    submits nothing, so no two tasks train the same cell folder."""
    from focalnet_jax.study.cells import Study
    from focalnet_jax.study.spec import load_spec, validate

    _require_slurm()
    cluster = OneNodeCluster(tmp_path / "cluster")
    env = {**ENV, **cluster.env}
    workdir = tmp_path / "requeued"
    plain = validate(load_spec(str(spec_file), ["--spec.folds=(0,)", "--spec.repeats=1"]), "spec")
    tiny = Study.create(workdir, plain)
    failed = tiny.cell("ce/rep0/fold0")
    # What the cell runner of an earlier task (job 0 is never a SLURM job id) left.
    tiny.write_state(failed, "failed", error="RuntimeError: boom", slurm_job="0_0")
    run = ["run", "--workdir", str(workdir), "--executor=slurm"]
    try:
        cluster.start()
        first = study(*run, "--sbatch=--hold", env=env).stdout
        assert "2 to run" in first and "submitted job array" in first
        status = study("status", "--workdir", str(workdir), env=env).stdout
        assert re.search(r"ce/rep0/fold0\s+queued\s+\d+_0", status), status
        again = study(*run, env=env).stdout
        assert "0 to run" in again and "nothing to submit" in again, again
    finally:
        cluster.stop()


@pytest.mark.slow
def test_slurm_array_of_a_study_folder_with_a_space(spec_file, tmp_path):
    """sbatch splits an unquoted `#SBATCH` value at a space and refuses the script ("Invalid
    directive found in batch script"); the folder's name and output path are quoted."""
    _require_slurm()
    cluster = OneNodeCluster(tmp_path / "cluster")
    env = {**ENV, **cluster.env}
    workdir = tmp_path / "my study"
    args = ["run", "--spec", str(spec_file), "--workdir", str(workdir), "--executor=slurm"]
    try:
        cluster.start()
        study(*args, "--spec.repeats=1", "--spec.folds=(0,)", "--sbatch=--hold", env=env)
        job = json.loads((workdir / "slurm" / "jobs.json").read_text())[0]["job_id"]
        shown = subprocess.run(
            ["scontrol", "show", "job", f"{job}_0"], env=env, capture_output=True, text=True
        ).stdout
        assert "JobName=study-my study" in shown, shown
        assert f"StdOut={(workdir / 'slurm').resolve()}/{job}_0.out" in shown, shown
    finally:
        cluster.stop()


@pytest.mark.slow
def test_slurm_resubmits_a_cell_whose_forgotten_job_left_it_running(spec_file, tmp_path):
    """A task killed at its time limit leaves its cell `running`; once slurmctld has forgotten the
    job (`MinJobAge`), `squeue -j <job>` fails ('Invalid job id specified'). The cell is then
    `interrupted` and submitted again, not taken for one running elsewhere."""
    from focalnet_jax.data.atomic_files import write_json_atomic
    from focalnet_jax.study.cells import Study
    from focalnet_jax.study.spec import load_spec, validate

    _require_slurm()
    cluster = OneNodeCluster(tmp_path / "cluster")
    env = {**ENV, **cluster.env}
    workdir = tmp_path / "forgotten"
    plain = validate(load_spec(str(spec_file), ["--spec.folds=(0,)", "--spec.repeats=1"]), "spec")
    tiny = Study.create(workdir, plain)
    killed = tiny.cell("ce/rep0/fold0")
    # Job 999999 is unknown to the new cluster, as a long-finished job is to a real one.
    tiny.write_state(killed, "running", slurm_job="999999_0")
    jobs = [{"job_id": "999999", "script": "-", "cells": [killed.name]}]
    write_json_atomic(jobs, workdir / "slurm" / "jobs.json")
    try:
        cluster.start()
        status = study("status", "--workdir", str(workdir), env=env).stdout
        assert re.search(r"ce/rep0/fold0\s+interrupted\s+999999_0", status), status
        run = study("run", "--workdir", str(workdir), "--executor=slurm", "--dry-run", env=env)
        assert "0 running or queued elsewhere, 2 to run" in run.stdout, run.stdout
    finally:
        cluster.stop()


@pytest.mark.parametrize("name", ["bosma22", "focalnet_ablation", "synthetic_mfl"])
def test_shipped_specs_validate_against_their_base(name, store):
    from focalnet_jax.study.spec import arm_config, load_spec, validate

    plain = validate(load_spec(f"{REPO / 'configs' / 'studies' / name}.py:{store}"), name)
    configs = {arm: arm_config(plain, arm) for arm in plain["arms"]}
    if name == "bosma22":
        assert not any(c.loss.mfl for c in configs.values())
        assert tuple(configs["ce_fl"].loss.weights) == (0.5, 0.5)
        dice = configs["ce_dice"].loss
        assert (dice.name, dice.eps, dice.batch_dice) == ("ce_dice", 1e-5, True)
        assert tuple(dice.weights) == (0.2, 1.0)  # nnU-Net's 1:1 with a CE averaged over 5 bits
        assert sorted(plain["ensembles"]["ensemble"]) == sorted(plain["arms"])
    if name == "focalnet_ablation":
        assert configs["fl_mfl"].loss.mfl and not configs["fl"].loss.mfl
        assert configs["fl_mfl"].loss.mfl_mode == "vmap"  # the paper's MFL under batch norm
        assert configs["unet_sing"].model.name == "unet" and not configs["aug_none"].augment.flip
    if name == "synthetic_mfl":
        assert [c.loss.mfl for c in configs.values()] == [False, False, True]
        assert plain["repeats"] >= 3


def test_focalnet_child_writes_where_stdout_is_redirected(capfd):
    """A benchmark that redirects stdout to stderr (one JSON line on stdout) gets its `focalnet`
    child's prints on stderr too."""
    with contextlib.redirect_stdout(sys.stderr):
        focalnet(["synth", "--help"])
    out, err = capfd.readouterr()
    assert out == ""
    assert "$ focalnet synth --help" in err and "usage: focalnet synth" in err


def test_ensemble_predictions_keep_the_members_unknown_grades(tmp_path):
    """Member maps 0.2 and 0.6 average to 0.4; the lesion of unknown grade stays marked."""
    from focalnet_jax.evaluation.predictions import read_case, write_case
    from focalnet_jax.study.ensembles import average_predictions

    lesions = np.zeros((1, 8, 8), np.int32)
    lesions[0, 2:4, 2:4] = 1
    for name, value in (("a", 0.2), ("b", 0.6)):
        write_case(
            tmp_path / name,
            "c1",
            scores=np.full((1, 8, 8, 5), value, np.float32),
            lesions=lesions,
            lesion_classes=[2],
            lesion_grade_known=[False],
            spacing=(1.0, 1.0),
            patient_id="p1",
        )
    assert average_predictions([tmp_path / "a", tmp_path / "b"], tmp_path / "mean") == ["c1"]
    case = read_case(tmp_path / "mean" / "c1.npz")
    np.testing.assert_allclose(case.scores, 0.4, rtol=1e-6)
    assert case.grade_known.tolist() == [False]
    assert not (tmp_path / "mean" / "models.json").exists()  # the members name no store


def test_an_ensemble_of_predictions_of_annotated_slices_gets_no_picai_numbers(tmp_path):
    """The arms' cells skipped PI-CAI on predictions from a store of annotated slices, while the
    ensemble of the same predictions, written without the members' models.json, computed it."""
    from focalnet_jax.evaluation.evaluate import evaluate_predictions
    from focalnet_jax.evaluation.predictions import write_case
    from focalnet_jax.study.ensembles import average_predictions

    store = {"path": "/data/store", "slices": "annotated"}
    lesions = np.zeros((2, 8, 8), np.int32)
    lesions[0, 2:4, 2:4] = 1
    for name, value in (("a", 0.2), ("b", 0.6)):
        for case, classes in (("c1", [3]), ("c2", [])):
            write_case(tmp_path / name, case, scores=np.full((2, 8, 8, 5), value, np.float32),
                       lesions=lesions if classes else 0 * lesions, lesion_classes=classes,
                       spacing=(1.0, 1.0), patient_id=case)  # fmt: skip
        models = {"models": [{"run": f"/{name}", "step": 1}], "tta": "none", "store": store}
        (tmp_path / name / "models.json").write_text(json.dumps(models))
    average_predictions([tmp_path / "a", tmp_path / "b"], tmp_path / "mean")
    assert json.loads((tmp_path / "mean" / "models.json").read_text()) == {"store": store}
    metrics = evaluate_predictions(tmp_path / "mean", with_figures=False, picai_bootstraps=0)
    assert metrics["picai"]["skipped"].startswith(
        "the predictions hold only the annotated slices of store /data/store"
    )


def test_froc_band_leaves_out_runs_without_a_lesion_of_the_group(tmp_path):
    """Two runs of arm a: one with 2 csPCa lesions (S = 0.5 from FP 0, 1 from FP 0.5), one
    whose fold has none (null sensitivities): the band is the first run alone (n=1)."""
    from focalnet_jax.evaluation.froc import sensitivity_at
    from focalnet_jax.study import figures
    from focalnet_jax.study.figures import froc_curves

    def metrics(num_lesions, sensitivity):
        curve = {"fp": [0.0, 0.5], "sensitivity": sensitivity}
        return {"froc": {"clinically_significant": {"num_lesions": num_lesions, "curve": curve}}}

    rows = [{"arm": "a"}, {"arm": "a"}]
    runs = [metrics(2, [0.5, 1.0]), metrics(0, [None, None])]
    curves = froc_curves(rows, runs, "clinically_significant")
    assert curves == {"a": [([0.0, 0.5], [0.5, 1.0])]}
    fp, sens = (np.asarray(v) for v in curves["a"][0])
    assert sensitivity_at(fp, sens, [0.25, 0.5]).tolist() == [0.5, 1.0]
    assert figures.froc_bands(tmp_path / "froc.png", curves, "cs").is_file()


def test_an_arm_without_a_froc_curve_stays_in_the_legend(tmp_path, monkeypatch):
    # An arm none of whose runs has a clinically significant lesion was left out of froc_cs.png,
    # whose legend otherwise gives n per arm.
    from focalnet_jax.study import figures

    kept = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: kept.append(fig) or path)
    figures.froc_bands(tmp_path / "f.png", {"ce": [([0.0, 0.5], [0.5, 1.0])], "fl": []}, "cs")
    legend = kept[0].axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["ce (n=1)", "fl (n=0)"]


def test_pvalue_matrix_labels_stay_readable_on_their_cells(tmp_path, monkeypatch):
    """Each p-value is written in the colour that contrasts with its cell: black on the light
    yellow of a small p (the finding; it was white there), white on the dark purple of p = 1."""
    import matplotlib

    from focalnet_jax.study import figures

    kept = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: kept.append(fig) or path)
    rows = [
        {"metric": "m", "arm_a": "a", "arm_b": "b", "p_permutation": 0.01},
        {"metric": "m", "arm_a": "b", "arm_b": "a", "p_permutation": 1.0},
    ]
    figures.pvalue_matrices(tmp_path / "p.png", rows, ["m"])
    colours = {t.get_text(): t.get_color() for t in kept[0].axes[0].texts}
    cmap = matplotlib.colormaps[figures.PVALUE_CMAP]
    for text, p in (("0.01", 0.01), ("1", 1.0)):
        r, g, b, _ = cmap(p)
        background = 0.2126 * r + 0.7152 * g + 0.0722 * b  # relative luminance
        text_luminance = 0.0 if colours[text] == "k" else 1.0
        assert abs(text_luminance - background) > 0.5, (text, colours[text], background)


def test_local_workers_one_per_gpu_unless_parallel_is_given():
    """`--parallel 1` on a 2-GPU host runs one cell at a time (it was taken for the default and
    became 2); without `--parallel`, one worker per GPU."""
    from focalnet_jax.study import commands, local

    parser = argparse.ArgumentParser()
    commands.add_arguments(parser)
    args = parser.parse_args(["run", "--workdir", "w", "--parallel", "1"])
    assert local.worker_slots(args.parallel, ["0", "1"]) == 1
    args = parser.parse_args(["run", "--workdir", "w"])
    assert local.worker_slots(args.parallel, ["0", "1"]) == 2
    assert local.worker_slots(args.parallel, []) == 1
    assert local.worker_slots(3, []) == 3


def test_status_report_and_evaluate_start_without_importing_jax(finished):
    """`study status`, `study report` and `evaluate --predictions` read files only: they start
    without importing JAX (nor does parsing any `focalnet` command line)."""
    code = (
        "import sys; from focalnet_jax.cli import main; "
        f"main(['study', 'status', '--workdir', {str(finished)!r}]); "
        f"main(['study', 'report', '--workdir', {str(finished)!r}]); "
        "import focalnet_jax.evaluation.evaluate; "
        "print('jax' in sys.modules, 'flax' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "4 done" in done.stdout
    assert done.stdout.splitlines()[-1] == "False False"


def test_every_cell_and_ensemble_is_evaluated_on_the_studys_slices(store, tmp_path):
    """An arm that trains on annotated slices only, in a study whose common config says all
    slices: its cells were evaluated on its own data.slices, so its FP rate counted the lesion
    slices of the patients with a lesion while the other arm's counted every slice and patient,
    and stats.csv compared the two. Every cell and ensemble now evaluates on the study's."""
    from focalnet_jax.study.cell_runner import cell_commands
    from focalnet_jax.study.cells import Cell, Study
    from focalnet_jax.study.spec import evaluation_slices, load_spec, validate

    arms = {**ARMS, "ce_annotated": {**ARMS["ce"], "data": {"slices": "annotated"}}}
    spec = write_spec(tmp_path / "slices.py", store, arms=arms)
    plain = validate(load_spec(str(spec)), str(spec))
    assert evaluation_slices(plain) == "all"  # common's data.slices, not an arm's
    for arm in arms:
        train, evaluate = cell_commands(Study(tmp_path / "s", plain), Cell(arm, 0, 0))
        assert ("--config.data.slices=annotated" in train) == (arm == "ce_annotated")
        assert evaluate[evaluate.index("--slices") + 1] == "all"


def test_cells_share_the_studys_cache_unless_one_is_set_in_the_environment(
    spec_file, tmp_path, monkeypatch
):
    from focalnet_jax.study.cell_runner import cell_commands
    from focalnet_jax.study.cells import Cell, Study
    from focalnet_jax.study.spec import load_spec, validate

    study_ = Study(tmp_path / "s", validate(load_spec(str(spec_file)), str(spec_file)))
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    train, _ = cell_commands(study_, Cell("ce", 0, 0))
    cache = train[train.index("--compilation_cache") + 1]
    assert cache == str((tmp_path / "s" / "compilation_cache").resolve())
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "cache"))
    train, _ = cell_commands(study_, Cell("ce", 0, 0))
    assert "--compilation_cache" not in train  # `focalnet train` reads the variable itself


def test_synthetic_study_help_shows_its_command_as_written(capsys):
    # The docstring's line continuation joined the command's two lines with a run of 9 spaces.
    from focalnet_jax.study import synthetic

    with pytest.raises(SystemExit):
        synthetic.main(["--help"])
    out = capsys.readouterr().out
    assert (
        "    python -m focalnet_jax.study.synthetic --out runs/synthetic_mfl \\\n"
        "        [--results docs/results/synthetic_mfl] [--spec.KEY=VALUE ...]\n"
    ) in out
    assert not re.search(r"\S {3,}\S", out.split("options:")[0])
