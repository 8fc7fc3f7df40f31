"""The study comparisons' p-values against references computed here by enumeration (NumPy)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.stats import rankdata

from focalnet_jax.study.statistics import compare_arms, permutation_pvalue


def enumerated_permutation_p(a: list[float], b: list[float]) -> float:
    """Exact one-sided p of the order AUC (H1: b better), every split of the pooled runs into
    groups of len(a) and len(b), from the Mann-Whitney rank sums (ties: mid-ranks)."""
    ranks = rankdata(np.concatenate([a, b]))
    splits = np.array(list(itertools.combinations(range(ranks.size), len(b))))
    rank_sums = ranks[splits].sum(axis=1)
    observed = ranks[len(a) :].sum()
    return float(np.mean(rank_sums >= observed - 1e-9))


def test_approximate_permutation_pvalue_is_reproducible_and_near_the_exact_one():
    """11 + 11 runs: over 20 together, so random splits. The same values must give the same
    p-value every time (a report regenerated from the same runs), within Monte Carlo error of
    the exact p over all C(22, 11) = 705432 splits."""
    rng = np.random.default_rng(0)
    a = list(np.round(rng.normal(0.60, 0.05, 11), 3))
    b = list(np.round(rng.normal(0.64, 0.05, 11), 3))
    exact = enumerated_permutation_p(a, b)
    draws = [permutation_pvalue(a, b, iterations=2000) for _ in range(2)]
    assert draws[0] == draws[1]
    standard_error = np.sqrt(exact * (1 - exact) / 2000)
    assert abs(draws[0] - exact) < 4 * standard_error + 1 / 2001
    assert draws[0] > 0  # the observed split counts: p >= 1 / (iterations + 1)


def test_compare_arms_rows_are_reproducible():
    rng = np.random.default_rng(1)
    per_metric = {"m": {"a": list(rng.random(12)), "b": list(rng.random(12))}}
    first, second = compare_arms(per_metric, 500), compare_arms(per_metric, 500)
    assert [r["p_permutation"] for r in first] == [r["p_permutation"] for r in second]


@pytest.mark.parametrize("seed", [3, 4])
def test_exact_permutation_pvalue_equals_rank_enumeration(seed):
    rng = np.random.default_rng(seed)
    a = list(np.round(rng.uniform(0.5, 0.8, 6), 1))  # rounded: ties occur
    b = list(np.round(rng.uniform(0.55, 0.85, 5), 1))
    assert permutation_pvalue(a, b) == pytest.approx(enumerated_permutation_p(a, b), abs=1e-12)
