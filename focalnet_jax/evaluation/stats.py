"""Cross-validation statistics: mean and SD over folds, +-2 SD curve bands, and method comparisons
by Welch's t-test with Bonferroni correction (paper section III-A)."""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats


def finite_values(values: Sequence) -> np.ndarray:
    """The values that are numbers (None, NaN and inf dropped), as float64."""
    kept = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return np.asarray(kept, np.float64)


TIE_TOLERANCE = 1e-9  # relative (absolute below 1): above float rounding, below any metric step


def tie_close_values(values: np.ndarray) -> np.ndarray:
    """`values` `[N]` with every group of values that lie within TIE_TOLERANCE of their sorted
    neighbour set to the group's smallest, so that equal metrics reached by other float paths
    are ties: picai_eval's trapezoid AUROC gives 14/21 as 0.6666666666666666 or
    0.6666666666666667 depending on the ROC curve's steps, which ordered two equal runs in a
    permutation test and gave an arm of equal runs a spread of 1e-17 (Welch's p then ~1e-50)."""
    values = np.asarray(values, np.float64)
    if values.size < 2:
        return values.copy()
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    gap = np.diff(ordered) > TIE_TOLERANCE * np.maximum(1.0, np.abs(ordered[1:]))
    starts = np.maximum.accumulate(np.where(np.r_[True, gap], np.arange(values.size), 0))
    tied = np.empty_like(values)
    tied[order] = ordered[starts]
    return tied


def mean_sd(values: Sequence) -> dict:
    """{'mean', 'sd' (ddof=1, None below 2 values), 'n' (values that are numbers), 'of' (all)}."""
    kept = finite_values(values)
    return {
        "mean": float(kept.mean()) if kept.size else None,
        "sd": float(kept.std(ddof=1)) if kept.size >= 2 else None,
        "n": int(kept.size),
        "of": len(values),
    }


def welch_pvalue(a: Sequence, b: Sequence, alternative: str = "two-sided") -> float:
    """p-value of Welch's unequal-variance t-test of mean(a) vs mean(b); `alternative` as SciPy's
    `ttest_ind` ('two-sided', 'greater': H1 mean(a) > mean(b), 'less'). NaN below 2 values per
    side or when both sides are constant. Values within TIE_TOLERANCE of each other count as
    equal (`tie_close_values`)."""
    a, b = finite_values(a), finite_values(b)
    pooled = tie_close_values(np.concatenate([a, b]))
    a, b = pooled[: a.size], pooled[a.size :]
    if a.size < 2 or b.size < 2 or (np.ptp(a) == 0 and np.ptp(b) == 0):
        return float("nan")  # no spread on either side: t is 0/0 or c/0, and SciPy's p 0 or 1
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        # SciPy warns on nearly identical samples; after the ties above, its p-value is right.
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_ind(a, b, equal_var=False, alternative=alternative).pvalue)


def bonferroni(pvalue: float, num_comparisons: int) -> float:
    """min(1, p * m); NaN stays NaN."""
    return float(min(1.0, pvalue * num_comparisons)) if math.isfinite(pvalue) else float("nan")


def compare_methods(per_method: Mapping[str, Sequence]) -> list[dict]:
    """Welch's two-sided t-test between every pair of methods on one metric's fold values,
    Bonferroni corrected for the number of pairs: [{'a', 'b', 'n_a', 'n_b', 'p', 'p_bonferroni'}]
    with n the folds that have a value (the test leaves out the others)."""
    pairs = list(itertools.combinations(per_method, 2))
    rows = []
    for a, b in pairs:
        p = welch_pvalue(per_method[a], per_method[b])
        n_a, n_b = finite_values(per_method[a]).size, finite_values(per_method[b]).size
        rows.append(
            {
                "a": a,
                "b": b,
                "n_a": n_a,
                "n_b": n_b,
                "p": p,
                "p_bonferroni": bonferroni(p, len(pairs)),
            }
        )
    return rows


def band(curves: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, mean - 2 SD, mean + 2 SD) of curves sampled on one grid, `[F, G]` -> 3 x `[G]`
    (SD with ddof=1; zero width for a single fold), clipped to [0, 1]."""
    curves = np.asarray(curves, np.float64)
    mean = curves.mean(axis=0)
    sd = curves.std(axis=0, ddof=1) if curves.shape[0] >= 2 else np.zeros_like(mean)
    return mean, np.clip(mean - 2 * sd, 0, 1), np.clip(mean + 2 * sd, 0, 1)
