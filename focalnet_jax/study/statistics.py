"""Comparisons of arms over their runs (one value per cell): the permutation test of Bosma et al.
2022 (picai_eval), Welch's t-test (SciPy) and the Bonferroni correction.

Both tests are one-sided with the same direction: H1 = the alternative arm `b` scores higher than
the baseline arm `a` (every metric compared here is higher-is-better).

- `p_permutation`: picai_eval's `perform_permutation_test(values_a, values_b)`. Its statistic is
  the "order AUC" (the probability that a run of b beats a run of a, ties counting half) and its
  null distribution comes from every split of the pooled runs into groups of the two sizes:
  enumerated exactly when the two arms have 20 runs or fewer together, otherwise drawn
  (`iterations` random splits; picai_eval's default is 10^6, too slow for a study with many
  metrics, so the default here is 10^4 and the report states it). picai_eval draws the splits
  from an unseeded generator, so a report regenerated from the same runs would change its
  p-values; here the same test (its mlxtend `permutation_test` with picai_eval's statistic and
  rule for exact vs random) draws them with `PERMUTATION_SEED`.
- `p_welch`: Welch's unequal-variance t-test (`evaluation.stats.welch_pvalue`), one-sided
  (H1: mean of b > mean of a).
- `p_welch_bonferroni`: min(1, p_welch x m), m = the number of ordered arm pairs of that metric.

Values that are not numbers (NaN: e.g. an AUROC of a fold without negatives) are left out of
both tests; a test with fewer than 1 (permutation) or 2 (Welch) values per arm gives NaN.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Mapping, Sequence

from focalnet_jax.evaluation.stats import bonferroni, finite_values, welch_pvalue
from focalnet_jax.study.spec import StudyError

APPROXIMATE_ITERATIONS = 10_000
PERMUTATION_SEED = 0
EXACT_MAX_RUNS = 20  # picai_eval's rule: enumerate every split up to this many runs together


def permutation_pvalue(
    baseline: Sequence[float],
    alternative: Sequence[float],
    iterations: int = APPROXIMATE_ITERATIONS,
    seed: int = PERMUTATION_SEED,
) -> float:
    """picai_eval's one-sided permutation test (H1: `alternative` better), its random splits
    drawn with `seed`; NaN without values."""
    try:
        from mlxtend.evaluate import permutation_test
        from picai_eval.statistical_helper import calc_order_auc_score
    except ImportError as error:
        raise StudyError(
            f"the permutation test needs picai_eval ({error}); install the 'picai' extra"
        ) from None
    a, b = finite_values(baseline), finite_values(alternative)
    if a.size < 1 or b.size < 1:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # = picai_eval's perform_permutation_test(a, b, iterations=iterations), seeded.
        method = "exact" if a.size + b.size <= EXACT_MAX_RUNS else "approximate"
        p = permutation_test(
            x=list(a), y=list(b), func=calc_order_auc_score, method=method,
            num_rounds=iterations, seed=seed,
        )  # fmt: skip
        return float(p)


def _mean(values: Sequence[float]) -> float:
    kept = finite_values(values)
    return float(kept.mean()) if kept.size else float("nan")


def compare_arms(
    per_metric: Mapping[str, Mapping[str, Sequence[float]]],
    iterations: int = APPROXIMATE_ITERATIONS,
) -> list[dict]:
    """Rows of stats.csv: for each metric and each ordered pair (baseline a, alternative b).

    `per_metric`: {metric: {arm: per-run values}}.
    """
    rows = []
    for metric, per_arm in per_metric.items():
        pairs = list(itertools.permutations(per_arm, 2))
        for a, b in pairs:
            p_welch = welch_pvalue(per_arm[b], per_arm[a], alternative="greater")
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
                }
            )
    return rows
