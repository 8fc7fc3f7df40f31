"""Comparisons of arms over their runs (one value per cell): the permutation test of Bosma et al.
2022 (as picai_eval computes it), a paired permutation test over the cells both arms ran, Welch's
t-test (SciPy) and the Bonferroni correction.

All tests are one-sided with the same direction: H1 = the alternative arm `b` scores higher than
the baseline arm `a` (every metric compared here is higher-is-better).

- `p_permutation`: the one-sided permutation test of picai_eval's
  `perform_permutation_test(values_a, values_b)`. Its statistic is the "order AUC" (the
  probability that a run of b beats a run of a, ties counting half) and its null distribution
  comes from every split of the pooled runs into groups of the two sizes: enumerated exactly when
  the two arms have 20 runs or fewer together (p = the share of splits whose statistic is at
  least the observed one), otherwise drawn (`iterations` random splits, p = (at least as extreme
  + 1) / (iterations + 1); picai_eval's default is 10^6, too slow for a study with many metrics,
  so the default here is 10^4 and the report states it). Computed here from the Mann-Whitney rank
  sum of b, which orders splits exactly as the order AUC does, so the exact p equals picai_eval's
  (tested), in milliseconds where picai_eval takes minutes at 10 + 10 runs (one scikit-learn AUC
  per split of the 184756); the random splits are drawn with `PERMUTATION_SEED`, where picai_eval
  seeds nothing and a report regenerated from the same runs changed its p-values.
- `p_welch`: Welch's unequal-variance t-test (`evaluation.stats.welch_pvalue`), one-sided
  (H1: mean of b > mean of a).
- `p_welch_bonferroni`: min(1, p_welch x m), m = the number of ordered arm pairs of that metric.
- `p_permutation_paired` over `n_pairs`: `paired_permutation_pvalue`, the runs of a and b of the
  same repeat and fold paired, the signs of their differences flipped.
- `p_permutation_folds` over `n_folds`: `fold_blocked_permutation_pvalue`, the same differences
  averaged over the repeats of each fold, the signs flipped per fold: the fold, not the cell, is
  the unit that varies independently.

Values that are not numbers (NaN: e.g. an AUROC of a fold without negatives) are left out of
every test; a test with fewer than 1 (permutation) or 2 (Welch) values per arm gives NaN. The
report rounds every metric to `report.METRIC_DECIMALS` before the tests (equal metrics reached by
other float paths, e.g. picai_eval's trapezoid AUROC, differ in the last bit), so `p_permutation`
is exactly picai_eval's test on runs.csv's values; Welch's and the paired test also count values
within `evaluation.stats.TIE_TOLERANCE` of each other as equal.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
from scipy.stats import rankdata

from focalnet_jax.evaluation.stats import (
    TIE_TOLERANCE,
    bonferroni,
    finite_values,
    tie_close_values,
    welch_pvalue,
)

APPROXIMATE_ITERATIONS = 10_000
PERMUTATION_SEED = 0
EXACT_MAX_RUNS = 20  # picai_eval's rule: enumerate every split up to this many runs together
_CHUNK = 10_000  # random splits drawn at a time
_RANK_SUM_TOL = 0.25  # rank sums are multiples of 1/2: equal ones compare as equal


def permutation_pvalue(
    baseline: Sequence[float],
    alternative: Sequence[float],
    iterations: int = APPROXIMATE_ITERATIONS,
    seed: int = PERMUTATION_SEED,
) -> float:
    """One-sided permutation p of the order AUC (H1: `alternative` better; module docstring);
    NaN without values."""
    if iterations < 1:  # no split drawn: p would be (0 + 1) / (0 + 1) = 1 whatever the runs
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    a, b = finite_values(baseline), finite_values(alternative)
    if a.size < 1 or b.size < 1:
        return float("nan")
    # Mid-ranks: a tie counts half, as in the AUC (the report rounds its metrics first, so values
    # equal but for float rounding are ties: METRIC_DECIMALS in module `report`).
    ranks = rankdata(np.concatenate([a, b]))
    observed = ranks[a.size :].sum() - _RANK_SUM_TOL
    if ranks.size <= EXACT_MAX_RUNS:
        splits = np.array(list(itertools.combinations(range(ranks.size), b.size)))
        return float(np.mean(ranks[splits].sum(axis=1) >= observed))
    rng = np.random.default_rng(seed)
    extreme = 0
    for start in range(0, iterations, _CHUNK):
        shuffled = rng.permuted(np.tile(ranks, (min(_CHUNK, iterations - start), 1)), axis=1)
        extreme += int(np.sum(shuffled[:, a.size :].sum(axis=1) >= observed))
    return (extreme + 1) / (iterations + 1)


def paired_permutation_pvalue(
    baseline: Mapping[Hashable, float],
    alternative: Mapping[Hashable, float],
    iterations: int = APPROXIMATE_ITERATIONS,
    seed: int = PERMUTATION_SEED,
) -> tuple[float, int]:
    """(one-sided p, pairs) of the paired sign-flip permutation test of the mean difference
    `alternative - baseline` over the cells (keys: repeat and fold) where both have a value
    (H1: the mean difference > 0). Null: each pair's difference is as likely negative; every one of
    the 2^n sign patterns enumerated up to EXACT_MAX_RUNS pairs, else `iterations` drawn with
    `seed`, p = (at least as extreme + 1) / (iterations + 1). NaN without pairs."""
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    diff = _paired_differences(baseline, alternative)
    if not diff:
        return float("nan"), 0
    return _sign_flip_pvalue(np.array(list(diff.values())), iterations, seed), len(diff)


def fold_blocked_permutation_pvalue(
    baseline: Mapping[tuple, float],
    alternative: Mapping[tuple, float],
    iterations: int = APPROXIMATE_ITERATIONS,
    seed: int = PERMUTATION_SEED,
) -> tuple[float, int]:
    """(one-sided p, folds) of the sign-flip test of `paired_permutation_pvalue` with the fold as
    its unit: the differences of the cells (keys: (repeat, fold)) where both have a value,
    averaged over the repeats of each fold, their signs flipped per fold. Repeats of one fold
    share its validation and training patients, so an arm better on some folds and worse on
    others is so in every repeat: flipped per cell, such an effect reads as a consistent one.
    NaN without pairs."""
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    diff = _paired_differences(baseline, alternative)
    if not diff:
        return float("nan"), 0
    folds: dict[Hashable, list[float]] = {}
    for (_, fold), d in diff.items():
        folds.setdefault(fold, []).append(d)
    means = np.array([np.mean(values) for values in folds.values()])
    return _sign_flip_pvalue(means, iterations, seed), len(means)


def _paired_differences(baseline: Mapping, alternative: Mapping) -> dict:
    """{cell: alternative - baseline} over the cells where both are finite, values within
    TIE_TOLERANCE of each other counted as equal (difference 0)."""
    keys = [k for k in baseline if k in alternative]
    a = np.array([baseline[k] for k in keys], np.float64)
    b = np.array([alternative[k] for k in keys], np.float64)
    kept = np.isfinite(a) & np.isfinite(b)
    if not kept.any():
        return {}
    pooled = tie_close_values(np.concatenate([a[kept], b[kept]]))  # equal but for rounding: 0
    diff = pooled[kept.sum() :] - pooled[: kept.sum()]
    return dict(zip([k for k, keep in zip(keys, kept, strict=True) if keep], diff, strict=True))


def _sign_flip_pvalue(diff: np.ndarray, iterations: int, seed: int) -> float:
    """One-sided p of the sum of `diff` [n] against its every sign pattern (2^n, up to
    EXACT_MAX_RUNS), else `iterations` drawn with `seed`: (at least as extreme + 1) /
    (iterations + 1)."""
    observed = diff.sum() - TIE_TOLERANCE * max(1.0, np.abs(diff).sum())
    if diff.size <= EXACT_MAX_RUNS:
        sums = np.zeros(1)
        for d in diff:  # every sign pattern's sum, 2^n of them
            sums = np.concatenate([sums + d, sums - d])
        return float(np.mean(sums >= observed))
    rng = np.random.default_rng(seed)
    extreme = 0
    for start in range(0, iterations, _CHUNK):
        signs = rng.choice([-1.0, 1.0], size=(min(_CHUNK, iterations - start), diff.size))
        extreme += int(np.sum(signs @ diff >= observed))
    return (extreme + 1) / (iterations + 1)


def _mean(values: Sequence[float]) -> float:
    kept = finite_values(values)
    return float(kept.mean()) if kept.size else float("nan")


def compare_arms(
    per_metric: Mapping[str, Mapping[str, Sequence[float]]],
    iterations: int = APPROXIMATE_ITERATIONS,
    cells: Mapping[str, Sequence[Hashable]] | None = None,
) -> list[dict]:
    """Rows of stats.csv: for each metric and each ordered pair (baseline a, alternative b).

    `per_metric`: {metric: {arm: per-run values}}; `cells`: {arm: the cell (repeat, fold) of each
    of its runs, in the same order}, which adds the paired tests (`p_permutation_paired` over
    `n_pairs` cells, `p_permutation_folds` over `n_folds` folds).
    """
    rows = []
    for metric, per_arm in per_metric.items():
        pairs = list(itertools.permutations(per_arm, 2))
        for a, b in pairs:
            p_welch = welch_pvalue(per_arm[b], per_arm[a], alternative="greater")
            paired = {}
            if cells is not None:
                by_cell = [dict(zip(cells[arm], per_arm[arm], strict=True)) for arm in (a, b)]
                p, n = paired_permutation_pvalue(*by_cell, iterations)
                p_folds, folds = fold_blocked_permutation_pvalue(*by_cell, iterations)
                paired = {
                    "n_pairs": n,
                    "p_permutation_paired": p,
                    "n_folds": folds,
                    "p_permutation_folds": p_folds,
                }
            rows.append(
                {
                    "metric": metric,
                    "arm_a": a,
                    "arm_b": b,
                    "mean_a": _mean(per_arm[a]),
                    "mean_b": _mean(per_arm[b]),
                    "n_a": int(finite_values(per_arm[a]).size),
                    "n_b": int(finite_values(per_arm[b]).size),
                    "p_permutation": permutation_pvalue(per_arm[a], per_arm[b], iterations),
                    "p_welch": p_welch,
                    "p_welch_bonferroni": bonferroni(p_welch, len(pairs)),
                    **paired,
                }
            )
    return rows
