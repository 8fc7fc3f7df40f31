"""MFL over five components, beyond the built-in ones: t2w, adc, hbv, dce and a low-b DWI
(`lowb`, a name the project does not know). All 30 non-empty proper subsets by default and a
PI-RADS-like list given by name, through `loss_fn` in both modes, chunked (30 = 7 chunks of 4 + 2)
and not, against a reference that applies the model to each subset's input on its own and takes
the minimum in NumPy; then one train step.

The model is a two-layer convolution (no normalisation, so `select` and `vmap` agree exactly as
under frozen BatchNorm): it compiles in a second, where the tests with the real network
(tests/test_mfl_many.py, 14 subsets) take minutes on a CPU. Tolerances as there: the same float32
operations batched differently (1, chunk or M subsets at a time).
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train_helpers import tiny_config

from focalnet_jax import encoding
from focalnet_jax.run import RunSpec
from focalnet_jax.training import sharding, train_state
from focalnet_jax.training import step as step_lib

COMPONENTS = ("t2w", "adc", "hbv", "dce", "lowb")
PIRADS = [("t2w",), ("hbv", "adc"), ("t2w", "adc", "hbv"), ("adc", "hbv", "dce"), ("lowb", "adc")]
LAMBDA, SIZE, BATCH = 100.0, 16, 4


class TwoConvs(nn.Module):
    """`[B, H, W, C]` -> `[B, H, W, 5]` ordinal logits; takes `train` as the FocalNet models do."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        return nn.Conv(5, (3, 3))(x)


def _spec(mode="select", chunk=4, subsets=None) -> RunSpec:
    overrides = [f"--config.loss.mfl_mode={mode}", f"--config.loss.mfl_chunk={chunk}"]
    config = tiny_config(overrides=overrides)
    config.data.components, config.loss.subsets = COMPONENTS, subsets
    for name in ("shift", "scale", "flip", "intensity"):
        config.augment[name] = False  # the train step then sees the batch as given (clipped)
    spec = RunSpec.from_config(config, image_size=(SIZE, SIZE))
    return dataclasses.replace(spec, model=TwoConvs())


def _batch(seed=0):
    """Random inputs in [0, 1]; slice b has a 6 x 6 lesion of class 1 + b (slice 3: none)."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0.0, 1.0, (BATCH, SIZE, SIZE, len(COMPONENTS))).astype(np.float32)
    classes = np.zeros((BATCH, SIZE, SIZE), np.int32)
    for b in range(BATCH - 1):
        r, c = rng.integers(1, SIZE - 7, 2)
        classes[b, r : r + 6, c : c + 6] = 1 + b
    return images, classes


def _reference(params, images, classes, subsets):
    """(MFL, subset share) from the model applied to each subset's input on its own, eq. 3 in
    NumPy: d[i, b] = sum (y (p_full - p_i))^2, MFL = mean_b min_i d[i, b] / (H W)."""
    apply = jax.jit(lambda x: jax.nn.sigmoid(TwoConvs().apply({"params": params}, x)))
    y = np.asarray(encoding.ordinal_encode(classes), np.float64)
    full = np.asarray(apply(images), np.float64)
    d = []
    for subset in subsets:
        keep = np.array([c in subset for c in COMPONENTS], np.float32)
        d.append(
            np.sum((y * (full - np.asarray(apply(images * keep), np.float64))) ** 2, (1, 2, 3))
        )
    d = np.stack(d)  # [M, B]
    chosen = np.argmin(d, axis=0)
    lesion = y.sum(axis=(1, 2, 3)) > 0
    share = np.array([np.mean((chosen == i) & lesion) for i in range(len(subsets))])
    return np.mean(d.min(axis=0)) / (SIZE * SIZE), share


def _all_subsets():
    """Every non-empty proper subset of COMPONENTS, by size, then by component order."""
    n = len(COMPONENTS)
    masks = [m for m in range(1, 2**n - 1)]
    ordered = sorted(masks, key=lambda m: (bin(m).count("1"), [-(m >> k & 1) for k in range(n)]))
    return [tuple(c for k, c in enumerate(COMPONENTS) if m >> k & 1) for m in ordered]


@pytest.fixture(scope="module")
def variables():
    return train_state.init_variables(TwoConvs(), jax.random.key(0), (BATCH, SIZE, SIZE, 5))


def _loss_and_grads(spec, variables, images, classes):
    fn = functools.partial(step_lib.loss_fn, mfl_weight=LAMBDA, spec=spec)
    grade_known = jnp.ones(classes.shape, jnp.uint8)
    (total, (terms, _)), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(
        variables["params"], variables["batch_stats"], images, classes, grade_known
    )
    return total, terms, grads


@pytest.mark.parametrize("subsets", [None, PIRADS], ids=["all30", "pirads"])
def test_five_components_mfl_matches_subsets_applied_one_by_one(variables, subsets):
    expected = _all_subsets() if subsets is None else [
        ("t2w",), ("adc", "hbv"), ("t2w", "adc", "hbv"), ("adc", "hbv", "dce"), ("adc", "lowb")
    ]  # fmt: skip
    images, classes = _batch()
    ref_mfl, ref_share = _reference(variables["params"], images, classes, expected)
    results = {}
    for mode in ("select", "vmap"):
        for chunk in (0, 4):
            spec = _spec(mode, chunk, subsets)
            assert spec.subsets == tuple(expected)
            assert len(spec.subsets) == (30 if subsets is None else 5)
            results[mode, chunk] = _loss_and_grads(spec, variables, images, classes)
            total, terms, _ = results[mode, chunk]
            np.testing.assert_allclose(terms["mfl"], ref_mfl, rtol=1e-5)
            np.testing.assert_allclose(terms["mfl_subset_share"], ref_share, atol=1e-7)
            expected_total = terms[spec.loss.name] + LAMBDA * terms["mfl"]
            np.testing.assert_allclose(total, expected_total, rtol=1e-6)
    assert 0 < ref_mfl and np.isclose(ref_share.sum(), 0.75)  # 3 of 4 slices have a lesion
    reference = jax.tree.leaves(results["vmap", 0][2])
    for _, _, grads in results.values():  # the gradient of the min is the argmin subset's
        for a, b in zip(jax.tree.leaves(grads), reference, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-6)


def test_five_components_thirty_subsets_through_the_train_step(variables):
    spec = _spec("select", 4)
    mesh = sharding.make_mesh()
    state = train_state.create_train_state(spec, jax.random.key(0), mesh)
    images, classes = _batch(seed=1)
    ref_mfl, ref_share = _reference(state.params, images, classes, _all_subsets())
    batch = {
        "images": images,
        "classes": classes,
        "grade_known": np.ones(classes.shape, np.uint8),
        "t2w_lower_ratio": np.zeros(BATCH, np.float32),
    }
    batch = jax.device_put(batch, sharding.batch_sharding(mesh))
    step = step_lib.make_train_step(spec, mesh)
    state, metrics = step(state, batch, jax.random.key(1), jnp.float32(LAMBDA))
    assert int(state.step) == 1
    np.testing.assert_allclose(metrics["mfl"], ref_mfl, rtol=1e-5)
    np.testing.assert_allclose(metrics["mfl_subset_share"], ref_share, atol=1e-7)
    expected = metrics[spec.loss.name] + LAMBDA * metrics["mfl"]
    np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)


@pytest.mark.parametrize(
    "mode, chunk, subsets, norm, note",
    [
        ("select", 4, None, "frozen", "MFL over 30 subsets of 5 components (select: 30 forward "
         "passes without gradients, 4 at a time, then each slice's chosen subset with gradients)"),
        ("select", 4, None, "batch", "MFL over 30 subsets of 5 components (select: 30 forward "
         "passes without gradients, 4 at a time, then each slice's chosen subset with gradients; "
         "under batch normalisation not the paper's MFL gradient, which `vmap` is)"),
        ("vmap", 0, None, "batch", "MFL over 30 subsets of 5 components (vmap: 30 forward and "
         "backward passes, all at once)"),
        ("vmap", 8, PIRADS, "frozen", "MFL over 5 subsets of 5 components (vmap: 5 forward and "
         "backward passes, all at once)"),
    ],
)  # fmt: skip
def test_the_run_says_how_many_subsets_it_probes_and_how(mode, chunk, subsets, norm, note):
    # The start line gave slices, steps and lambda, but not the number of subsets each step
    # runs: 30 subsets cost ~10x the forward passes of 2, unsaid; nor that `select` under batch
    # normalisation trains another gradient than the paper's (docs/mfl.md).
    from focalnet_jax.training.loop import _mfl_note

    assert _mfl_note(_spec(mode, chunk, subsets), norm) == ", " + note
