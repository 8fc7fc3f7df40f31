"""Studies end to end on a tiny model (focalnet_jax/study): a 2-arm x 2-repeat study (of fold 1 of
2) with an ensemble finishes and reports every row; its permutation p-values equal an exhaustive
enumeration written here; a re-run trains nothing; a report refuses cells evaluated otherwise and
leaves the earlier report whole when stopped; outdated ensembles are recomputed; the SLURM
executor (a one-node cluster started here) gives the same rows as the local one."""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import study_calls
from slurm_cluster import OneNodeCluster
from study_calls import ENV, one_line_error, read_csv, require_slurm, study

from focalnet_jax.study.cells import RUN_LOCK
from focalnet_jax.training.tb_logging import read_scalars

store = study_calls.store  # a module-scoped fixture
spec_file = study_calls.spec_file  # a module-scoped fixture


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
    message = one_line_error("report", "--workdir", str(copy))
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
    message = one_line_error("report", "--workdir", str(copy))
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
    message = one_line_error("report", "--workdir", str(copy))
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
    require_slurm()
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
def test_slurm_job_array_gives_the_rows_of_the_local_study(finished, spec_file, tmp_path):
    require_slurm()
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
