"""The study's permutation p-values against references: picai_eval's own test, and every split
of the pooled runs enumerated with the order AUC counted pair by pair (NumPy)."""

from __future__ import annotations

import contextlib
import io
import itertools
import time

import numpy as np
import pytest

from focalnet_jax.study.statistics import compare_arms, permutation_pvalue


def enumerated_permutation_p(a: list[float], b: list[float]) -> float:
    """Exact one-sided p (H1: b better): the share of splits of the pooled runs into groups of
    len(a) and len(b) whose order AUC (pairs with the b value higher, ties half) is at least the
    observed one."""
    pooled = np.concatenate([a, b])
    n_a, n_b = len(a), len(b)

    def order_auc(values_a, values_b):  # [S, n_a], [S, n_b] -> [S]
        diff = values_b[:, None, :] - values_a[:, :, None]
        return ((diff > 0) + 0.5 * (diff == 0)).mean(axis=(1, 2))

    observed = order_auc(np.asarray([a]), np.asarray([b]))[0]
    splits = np.array(list(itertools.combinations(range(pooled.size), n_b)))
    in_b = np.zeros((len(splits), pooled.size), bool)
    in_b[np.arange(len(splits))[:, None], splits] = True
    extreme = 0
    for chunk in np.array_split(np.arange(len(splits)), max(1, len(splits) // 20_000)):
        values_b = pooled[splits[chunk]]
        values_a = np.broadcast_to(pooled, (len(chunk), pooled.size))[~in_b[chunk]]
        extreme += np.sum(order_auc(values_a.reshape(len(chunk), n_a), values_b) >= observed - 1e-9)
    return extreme / len(splits)


@pytest.mark.parametrize("seed", [3, 4])
def test_exact_pvalue_equals_picai_eval(seed):
    with contextlib.redirect_stdout(io.StringIO()):
        from picai_eval.statistical_helper import perform_permutation_test
    rng = np.random.default_rng(seed)
    a = list(np.round(rng.uniform(0.5, 0.8, 6), 1))  # rounded: ties occur
    b = list(np.round(rng.uniform(0.55, 0.85, 5), 1))
    assert permutation_pvalue(a, b) == pytest.approx(perform_permutation_test(a, b), abs=1e-12)
    assert permutation_pvalue(b, a) == pytest.approx(perform_permutation_test(b, a), abs=1e-12)


def test_exact_pvalue_at_ten_and_ten_runs_is_fast_and_exact():
    """Bosma et al.'s 10 + 10 runs: every one of the C(20, 10) = 184756 splits, with ties."""
    rng = np.random.default_rng(5)
    a = list(np.round(rng.normal(0.60, 0.05, 10), 2))
    b = list(np.round(rng.normal(0.63, 0.05, 10), 2))
    start = time.process_time()  # this process's CPU time: not what other processes take
    p = permutation_pvalue(a, b)
    assert time.process_time() - start < 5.0
    assert p == pytest.approx(enumerated_permutation_p(a, b), abs=1e-12)


def test_approximate_pvalue_is_reproducible_and_near_the_exact_one():
    """11 + 11 runs: over 20 together, so random splits. The same values give the same p-value
    every time (a report regenerated from the same runs), within Monte Carlo error of the exact p
    over all C(22, 11) = 705432 splits, and never 0 (the observed split counts)."""
    rng = np.random.default_rng(0)
    a = list(np.round(rng.normal(0.60, 0.05, 11), 3))
    b = list(np.round(rng.normal(0.64, 0.05, 11), 3))
    exact = enumerated_permutation_p(a, b)
    draws = [permutation_pvalue(a, b, iterations=20_000) for _ in range(2)]
    assert draws[0] == draws[1]
    assert abs(draws[0] - exact) < 4 * np.sqrt(exact * (1 - exact) / 20_000) + 1 / 20_001
    far = [0.1 * i for i in range(11)], [5 + 0.1 * i for i in range(11)]
    assert permutation_pvalue(*far, iterations=999) == pytest.approx(1 / 1000)


def test_compare_arms_rows_are_reproducible():
    rng = np.random.default_rng(1)
    per_metric = {"m": {"a": list(rng.random(12)), "b": list(rng.random(12))}}
    first, second = compare_arms(per_metric, 500), compare_arms(per_metric, 500)
    assert [r["p_permutation"] for r in first] == [r["p_permutation"] for r in second]


def test_metrics_table_says_how_many_runs_are_left_out():
    """A run whose metric is undefined (NaN: e.g. no negative case in its fold) is left out of
    the mean; the cell must say of how many runs it is the mean."""
    from focalnet_jax.study.report import HEADLINE, _metrics_table

    values = {"ce": [0.6, 0.8, float("nan")], "fl": [0.7, 0.7, 0.7]}
    rows = [
        {"arm": arm, **{metric: v for metric in HEADLINE}}
        for arm, per_run in values.items()
        for v in per_run
    ]
    table = [line for line in _metrics_table(rows, ["ce", "fl"]) if line.startswith("| ")]
    # ce: mean 0.7 and SD sqrt(0.02) = 0.141 over 2 of its 3 runs.
    assert table[1] == "| ce | " + " | ".join(["0.700 +- 0.141 (2/3)"] * 4) + " |"
    assert table[2] == "| fl | " + " | ".join(["0.700 +- 0.000 (3)"] * 4) + " |"


def test_welch_is_nan_when_neither_arm_varies():
    """Three runs of 1.0 against three of 0.5 (e.g. a sensitivity every run of each arm reaches
    alike): the standard error is 0, so the t statistic is undefined; SciPy's p of 0 read as a
    certain difference. One arm with spread gives Welch's p (NumPy reference)."""
    from scipy import stats

    from focalnet_jax.evaluation.stats import welch_pvalue

    assert np.isnan(welch_pvalue([1.0, 1.0, 1.0], [0.5, 0.5, 0.5]))
    assert np.isnan(welch_pvalue([1.0, 1.0, 1.0], [0.5, 0.5, 0.5], alternative="greater"))
    rows = compare_arms({"m": {"a": [0.5, 0.5, 0.5], "b": [1.0, 1.0, 1.0]}})
    assert all(np.isnan(r["p_welch"]) and np.isnan(r["p_welch_bonferroni"]) for r in rows)
    assert [r["p_permutation"] for r in rows] == [pytest.approx(0.05), 1.0]  # 1 / C(6, 3)
    a, b = np.array([1.0, 1.0, 1.0]), np.array([0.5, 0.6, 0.7])
    t = (a.mean() - b.mean()) / np.sqrt(b.var(ddof=1) / 3)
    df = (b.var(ddof=1) / 3) ** 2 / ((b.var(ddof=1) / 3) ** 2 / 2)
    assert welch_pvalue(a, b, alternative="greater") == pytest.approx(stats.t.sf(t, df))


def test_no_random_split_is_refused_not_a_p_of_one(tmp_path):
    """11 + 11 runs take the random splits; with none drawn the p-value was (0 + 1) / (0 + 1) = 1
    for any runs (b far above a here, p = 1 / 10001 with 10^4 splits)."""
    from cli_calls import cli_error

    a, b = list(range(11)), list(range(100, 111))
    assert permutation_pvalue(a, b, iterations=10_000) == pytest.approx(1 / 10_001)
    for iterations in (0, -5):
        with pytest.raises(ValueError, match="at least 1"):
            permutation_pvalue(a, b, iterations=iterations)
    message = cli_error(["study", "report", "--workdir", tmp_path, "--iterations", "0"])
    assert "--iterations 0: expected at least 1" in message


def picai_auroc(scores: list[float]) -> float:
    """picai_eval's case AUROC (trapezoid under its ROC curve) of 3 positive and 7 negative
    cases with these case scores."""
    from focalnet_jax.evaluation.picai import picai_metrics

    targets = [1, 0, 0, 1, 0, 0, 0, 1, 0, 0]
    results = {
        f"c{i}": ([(float(t), s, 0.5 * t)], s)
        for i, (t, s) in enumerate(zip(targets, scores, strict=True))
    }
    return picai_metrics(results, bootstraps=0)["auroc"]


def test_equal_metrics_of_other_float_paths_are_ties():
    """Runs with the same AUROC (11 of the 21 positive-negative pairs ranked right, 14 of 21)
    whose ROC curves differ get picai_eval AUROCs one ulp apart. Those are ties: in the
    permutation test of the report's values (rounded to METRIC_DECIMALS; the raw values were
    ordered) and in Welch's test (which read two arms of equal runs as a spread of 1e-17 and gave
    p ~ 1e-61)."""
    from picai_eval.statistical_helper import perform_permutation_test
    from scipy import stats

    from focalnet_jax.evaluation.stats import welch_pvalue
    from focalnet_jax.study.report import METRIC_DECIMALS

    low = picai_auroc([0.6, 0.3, 0.2, 0.0, 0.5, 0.4, 0.1, 0.8, 0.7, 0.9])
    high = picai_auroc([0.4, 0.0, 0.2, 0.3, 0.1, 0.8, 0.6, 0.7, 0.5, 0.9])
    assert low < high and low == pytest.approx(11 / 21, abs=1e-15) == high
    # Pooled ranks: 0.4 -> 1, the four runs at 11/21 -> 3.5 each, 0.9 -> 6; b's rank sum 13.
    # Of the C(6, 3) = 20 splits, those with a rank sum >= 13 hold 0.9 and two of the four
    # ties: C(4, 2) = 6, so p = 6 / 20 (and SciPy's permutation test on exact ties agrees).
    a, b = [high, high, 0.4], [low, low, 0.9]
    assert permutation_pvalue(a, b) == pytest.approx(0.5, abs=1e-12)  # 10 splits: ordered apart
    a, b = [[round(v, METRIC_DECIMALS) for v in arm] for arm in (a, b)]
    assert permutation_pvalue(a, b) == pytest.approx(0.3, abs=1e-12)
    assert perform_permutation_test(a, b) == pytest.approx(0.3, abs=1e-12)  # the contract
    tied = stats.permutation_test(
        ([11 / 21, 11 / 21, 0.9], [11 / 21, 11 / 21, 0.4]),
        lambda x, y: stats.mannwhitneyu(x, y).statistic,
        permutation_type="independent",
        alternative="greater",
    )
    assert tied.pvalue == pytest.approx(0.3, abs=1e-12)
    fourteen = [
        picai_auroc([0.8, 0.4, 0.7, 0.0, 0.1, 0.2, 0.5, 0.9, 0.6, 0.3]),
        picai_auroc([0.5, 0.6, 0.1, 0.3, 0.7, 0.4, 0.0, 0.9, 0.2, 0.8]),
    ]
    assert fourteen[0] != fourteen[1] and fourteen[0] == pytest.approx(14 / 21, abs=1e-15)
    assert np.isnan(welch_pvalue([*fourteen, fourteen[0]], [low, high, low]))
    rows = compare_arms({"m": {"a": [low, high, low], "b": [*fourteen, fourteen[0]]}})
    assert all(np.isnan(r["p_welch"]) for r in rows)
    # One arm varies: Welch's p of the exact values (t and df by hand, the tied arm's SE 0).
    varied = np.array([0.5, 0.6, 0.75])
    t = (varied.mean() - 14 / 21) / np.sqrt(varied.var(ddof=1) / 3)
    p = welch_pvalue(varied, [*fourteen, fourteen[0]], alternative="greater")
    assert p == pytest.approx(stats.t.sf(t, 2), rel=1e-9)


def test_report_comparisons_say_what_was_tested_and_on_how_many_runs():
    """ce's third run has no AUROC (NaN): both unpaired tests use its 2 other runs, the paired
    test the 2 folds both arms have, and the table says n a = 2, n b = 3, n pairs = 2, with the
    unit (runs), which tests are paired, how the permutation p was computed and that only
    Welch's p is corrected (x 2 ordered pairs)."""
    from scipy import stats

    from focalnet_jax.study.report import _comparisons

    per_arm = {"ce": [0.6, 0.7, float("nan")], "fl": [0.8, 0.9, 0.85]}
    cells = {"ce": [(0, 0), (0, 1), (0, 2)], "fl": [(0, 0), (0, 1), (0, 2)]}
    rows = compare_arms({"picai_auroc": per_arm}, iterations=999, cells=cells)
    lines = _comparisons(rows, 999)
    text = " ".join(lines)
    for phrase in ("Unit: the run", "unpaired (the runs of a and b are not matched",
                   "999 random splits drawn with seed 0", "p >= 1/1000",
                   "over the n pairs of runs of the same repeat and fold",
                   "none is corrected for multiple comparisons",
                   "only this one counts a fold once",
                   "p_welch x 2 (the ordered pairs of each metric)"):  # fmt: skip
        assert phrase in text
    # ce -> fl: fl's 3 runs above ce's 2: 1 of the C(5, 2) = 10 splits. Paired: differences
    # +0.2, +0.2 on folds 0 and 1; of the 4 sign patterns only (+, +) reaches +0.4: p = 1/4.
    # Welch by hand (NumPy).
    a, b = np.array([0.6, 0.7]), np.array([0.8, 0.9, 0.85])
    va, vb = a.var(ddof=1) / 2, b.var(ddof=1) / 3
    t = (b.mean() - a.mean()) / np.sqrt(va + vb)
    p = stats.t.sf(t, (va + vb) ** 2 / (va**2 / 1 + vb**2 / 2))
    row = next(line for line in lines if line.startswith("| picai_auroc | ce | fl |"))
    assert row == (
        f"| picai_auroc | ce | fl | 2 | 3 | 0.650 | 0.850 | 0.1000 | 2 | 0.2500 | 2 | 0.2500 | "
        f"{p:.4f} | "
        f"{min(1, 2 * p):.4f} |"
    )
    assert _comparisons([], 999)[-1] == "One arm: nothing to compare."


def test_report_prints_small_p_values_with_their_digits():
    """10 + 10 runs, every run of b above every run of a: the exact p is 1 / C(20, 10) =
    1/184756 and the paired p 1/2^10; printed with 4 decimals both read 0.0000, i.e. p = 0."""
    from focalnet_jax.study.report import _comparisons

    a, b = [0.5 + 0.01 * i for i in range(10)], [0.7 + 0.01 * i for i in range(10)]
    cells = {arm: [(r, 0) for r in range(10)] for arm in ("a", "b")}
    rows = compare_arms({"picai_auroc": {"a": a, "b": b}}, cells=cells)
    assert rows[0]["p_permutation"] == pytest.approx(1 / 184756)
    assert rows[0]["p_permutation_paired"] == pytest.approx(1 / 1024)
    # Ten repeats of one fold: one fold, whose one sign pattern of two reaches the observed.
    assert (rows[0]["n_folds"], rows[0]["p_permutation_folds"]) == (1, 0.5)
    row = next(line for line in _comparisons(rows, 999) if line.startswith("| picai_auroc | a |"))
    assert "| 5.4e-06 | 10 | 9.8e-04 |" in row and "0.0000" not in row


def scipy_paired_p(a, b, n_resamples=np.inf):
    """SciPy's paired permutation test (signs of the pairs flipped) of mean(b - a), H1 > 0."""
    from scipy import stats

    return stats.permutation_test(
        (np.asarray(b), np.asarray(a)),
        lambda x, y: np.mean(x - y),
        permutation_type="samples",
        alternative="greater",
        n_resamples=n_resamples,
        random_state=0,
    ).pvalue


def test_paired_permutation_pvalue_equals_scipy():
    """Exact (2^n sign patterns) against SciPy's paired permutation test on 7 and on 12 pairs,
    keys in other orders and a cell only one arm has left out; a pair with a NaN is left out;
    more than 20 pairs: random sign patterns, within Monte Carlo error of SciPy's exact p and
    never below 1 / (iterations + 1)."""
    from focalnet_jax.study.statistics import paired_permutation_pvalue

    rng = np.random.default_rng(7)
    for n in (7, 12):
        a = np.round(rng.normal(0.6, 0.05, n), 2)
        b = np.round(a + rng.normal(0.02, 0.03, n), 2)  # rounded: zero differences occur
        base = {(0, k): v for k, v in enumerate(a)} | {(9, 9): 0.1}
        alt = {(0, k): v for k, v in reversed(list(enumerate(b)))}
        p, pairs = paired_permutation_pvalue(base, alt)
        assert pairs == n and p == pytest.approx(scipy_paired_p(a, b), abs=1e-12)
    p, pairs = paired_permutation_pvalue(
        {1: 0.5, 2: float("nan"), 3: 0.6}, {1: 0.7, 2: 0.9, 3: 0.7}
    )
    assert (p, pairs) == (pytest.approx(0.25), 2)
    # 22 pairs: exact p from the distribution of the signed sum of the differences (integers in
    # units of 0.001), counted by dynamic programming over the 2^22 sign patterns.
    a = np.round(rng.normal(0.6, 0.05, 22), 3)
    diffs = np.round(rng.normal(10, 30, 22)).astype(int)
    b = a + diffs / 1000
    counts = {0: 1}
    for d in diffs:
        signed = {}
        for total, ways in counts.items():
            for step in (d, -d):
                signed[total + step] = signed.get(total + step, 0) + ways
        counts = signed
    exact = sum(w for total, w in counts.items() if total >= diffs.sum()) / 2**22
    p, _ = paired_permutation_pvalue(dict(enumerate(a)), dict(enumerate(b)), iterations=20_000)
    assert abs(p - exact) < 4 * np.sqrt(exact * (1 - exact) / 20_000) + 1 / 20_001
    far = paired_permutation_pvalue(dict(enumerate(a)), dict(enumerate(a + 1)), iterations=999)
    assert far == (pytest.approx(1 / 1000), 22)


def test_report_warns_when_arms_hold_runs_of_other_cells():
    """A partial report where fl has only fold 0 of ce's folds 0 and 1: an unpaired comparison
    would set ce's fold 1 against nothing; the report says so. The same cells: no warning."""
    from focalnet_jax.study.report import _coverage

    def rows(arm, cells):
        return [{"arm": arm, "repeat": r, "fold": k} for r, k in cells]

    both = rows("ce", [(0, 0), (0, 1)]) + rows("fl", [(0, 0)])
    (warning,) = [line for line in _coverage(both, ["ce", "fl"]) if line]
    assert warning.startswith("**The arms hold runs of different cells** (runs: ce 2, fl 1)")
    same = rows("ce", [(0, 0), (0, 1)]) + rows("fl", [(0, 1), (0, 0)])
    assert _coverage(same, ["ce", "fl"]) == []


def test_figures_say_which_values_are_undefined(tmp_path, monkeypatch):
    """fl's AUROC is undefined in all 3 runs (NaN) and both's in 1: the box plot drew 3, 0 and 2
    runs under bare arm names, and the p-value matrix left fl's pairs empty like the diagonal."""
    from focalnet_jax.study import figures

    kept = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: kept.append(fig) or path)
    nan = float("nan")
    per_arm = {"ce": [0.6, 0.7, 0.8], "fl": [nan, nan, nan], "both": [0.7, 0.75, nan]}
    figures.box_strip(tmp_path / "m.png", {"picai_auroc": per_arm})
    labels = [t.get_text() for t in kept[0].axes[0].get_xticklabels()]
    assert labels == ["ce", "fl (0/3)", "both (2/3)"]
    rows = compare_arms({"picai_auroc": per_arm}, 100)
    figures.pvalue_matrices(tmp_path / "p.png", rows, ["picai_auroc"])
    texts = {(t.get_position(), t.get_text()) for t in kept[1].axes[0].texts}
    # Rows a (y), columns b (x) in the order ce, fl, both; ce -> both: 5 of the C(5, 2) = 10
    # splits (ranks 1, 2.5, 2.5, 4, 5; both's 2.5 + 4 = 6.5), both -> ce: 7 of 10.
    assert texts == {
        ((1, 0), "n/a"), ((2, 0), "0.5"), ((0, 1), "n/a"), ((2, 1), "n/a"),
        ((0, 2), "0.7"), ((1, 2), "n/a"),
    }  # fmt: skip


def test_fold_blocked_pvalue_flips_the_fold_means_of_the_repeats():
    """2 repeats x 4 folds (one cell without a value): the differences b - a averaged per fold
    over the repeats with a value, their signs flipped per fold, against every one of the 2^4
    patterns enumerated here; the per-cell test counts the 7 cells instead."""
    import itertools

    from focalnet_jax.study.statistics import (
        fold_blocked_permutation_pvalue,
        paired_permutation_pvalue,
    )

    a = {(r, f): 0.5 for r in range(2) for f in range(4)}
    diffs = {(0, 0): 0.30, (1, 0): 0.10, (0, 1): -0.05, (1, 1): 0.15,
             (0, 2): 0.20, (1, 2): 0.00, (0, 3): -0.10}  # fmt: skip
    b = {cell: 0.5 + d for cell, d in diffs.items()} | {(1, 3): float("nan")}
    means = np.array([0.20, 0.05, 0.10, -0.10])  # folds 0..3
    patterns = np.array(list(itertools.product([-1, 1], repeat=4)))
    expected = np.mean(patterns @ means >= means.sum() - 1e-12)
    p, folds = fold_blocked_permutation_pvalue(a, b)
    assert folds == 4 and p == pytest.approx(expected) and expected == 4 / 16
    assert paired_permutation_pvalue(a, b)[1] == 7
    assert fold_blocked_permutation_pvalue(a, {}) == (pytest.approx(float("nan"), nan_ok=True), 0)


def test_per_cell_flips_overstate_a_fold_effect_that_fold_flips_do_not():
    """Simulated differences b - a of mean 0 over 2 repeats x 5 folds: a fold effect (its SD that
    of the seed noise) shared by a fold's repeats. The per-cell paired test falls to p <= 0.05
    in 8.65 % of 2000 draws (5 % is its rate without a fold effect); the fold-blocked test in
    3.15 %, its rate 1/32 (its one p below 0.05). (docs/studies.md quotes these rates.)"""
    from focalnet_jax.study.statistics import (
        fold_blocked_permutation_pvalue,
        paired_permutation_pvalue,
    )

    rng = np.random.default_rng(0)
    zero = {(r, f): 0.0 for r in range(2) for f in range(5)}
    rejected = np.zeros(2)
    for _ in range(2000):
        fold_effect = rng.standard_normal(5)
        b = {(r, f): fold_effect[f] + rng.standard_normal() for r, f in zero}
        rejected += [paired_permutation_pvalue(zero, b)[0] <= 0.05,
                     fold_blocked_permutation_pvalue(zero, b)[0] <= 0.05]  # fmt: skip
    assert rejected.tolist() == [173, 63]  # 8.65 % and 3.15 %
