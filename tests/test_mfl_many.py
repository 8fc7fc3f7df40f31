"""MFL over four components (all 14 subsets) in the train step: the chunked subset probe
(`loss.mfl_chunk`) equals the unchunked one, `select` equals `vmap` under frozen normalisation, and
with `batch` normalisation every subset pass is normalised with its own batch statistics while the
running averages come from the full-input pass only.

Tolerances: chunking and the two modes run the same float32 operations on differently batched
convolutions (M*B, chunk*B or B images at a time), whose summation order may differ; across the
~20 layers of the tiny network that is ~1e-6 relative on values. Gradients are compared at
rtol 2e-4 / atol 1e-6 as in tests/test_train_step.py (the smallest gradient entries are ~1e-4 of
the largest, so relative rounding there is larger).
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from test_train_helpers import tiny_config

from focalnet_jax import encoding, losses
from focalnet_jax.run import RunSpec
from focalnet_jax.training import sharding, train_state
from focalnet_jax.training import step as step_lib

COMPONENTS = ("t2w", "adc", "hbv", "dce")
LAMBDA = 1000.0
SIZE = 32


def _spec(norm: str, mode: str = "vmap", chunk: int = 0, axis_name=None) -> RunSpec:
    config = tiny_config(overrides=[f"--config.model.norm={norm}", "--config.train.batch_size=4"])
    config.data.components = COMPONENTS
    config.loss.mfl_mode, config.loss.mfl_chunk = mode, chunk
    spec = RunSpec.from_config(config, image_size=(SIZE, SIZE))
    # Outside shard_map there is no 'data' axis to sync BatchNorm over (one device: same values).
    return dataclasses.replace(spec, model=spec.model.clone(axis_name=axis_name))


def _batch(seed=0, batch=4):
    rng = np.random.default_rng(seed)
    images = rng.uniform(0.0, 1.0, (batch, SIZE, SIZE, len(COMPONENTS))).astype(np.float32)
    classes = np.zeros((batch, SIZE, SIZE), np.int32)
    for b in range(batch):
        r, c = rng.integers(2, SIZE - 10, 2)
        classes[b, r : r + 8, c : c + 8] = 1 + b % 5
    return jnp.asarray(images), jnp.asarray(classes), jnp.ones_like(jnp.asarray(classes), jnp.uint8)


def _variables(spec):
    variables = train_state.init_variables(spec.model, jax.random.key(0), spec.input_shape)
    # Non-trivial running statistics, so frozen normalisation is not the identity.
    variables["batch_stats"] = jax.tree.map(
        lambda x: x + 0.1 * jax.random.uniform(jax.random.key(1), x.shape), variables["batch_stats"]
    )
    return variables


def _loss_and_grads(spec, variables, batch):
    fn = functools.partial(step_lib.loss_fn, mfl_weight=LAMBDA, spec=spec)
    (total, (terms, stats)), grads = jax.value_and_grad(fn, has_aux=True)(
        variables["params"], variables["batch_stats"], *batch
    )
    return {"total": total, "terms": terms, "batch_stats": stats, "grads": grads}


def _assert_close(a, b, rtol=2e-4, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def frozen():
    specs = {
        (mode, chunk): _spec("frozen", mode, chunk)
        for mode in ("vmap", "select")
        for chunk in (0, 4)
    }
    variables, batch = _variables(specs["vmap", 0]), _batch()

    @jax.jit
    def run(variables, batch):
        return {key: _loss_and_grads(spec, variables, batch) for key, spec in specs.items()}

    return run(variables, batch)


def test_fourteen_subsets_by_default_and_mfl_is_active(frozen):
    terms = frozen["vmap", 0]["terms"]
    assert terms["mfl_subset_share"].shape == (14,)
    np.testing.assert_allclose(np.sum(terms["mfl_subset_share"]), 1.0, rtol=1e-6)
    assert float(terms["mfl"]) > 0


@pytest.mark.parametrize("mode", ["vmap", "select"])
def test_chunked_probe_equals_unchunked(frozen, mode):
    whole, chunked = frozen[mode, 0], frozen[mode, 4]  # 14 subsets in chunks of 4, 4, 4, 2
    np.testing.assert_array_equal(
        chunked["terms"]["mfl_subset_share"], whole["terms"]["mfl_subset_share"]
    )
    np.testing.assert_allclose(chunked["terms"]["mfl"], whole["terms"]["mfl"], rtol=1e-5)
    np.testing.assert_allclose(chunked["total"], whole["total"], rtol=1e-5)
    _assert_close(chunked["grads"], whole["grads"])


@pytest.mark.parametrize("chunk", [0, 4])
def test_select_equals_vmap_under_frozen_normalisation(frozen, chunk):
    vmap, select = frozen["vmap", chunk], frozen["select", chunk]
    np.testing.assert_array_equal(
        select["terms"]["mfl_subset_share"], vmap["terms"]["mfl_subset_share"]
    )
    np.testing.assert_allclose(select["total"], vmap["total"], rtol=1e-5)
    _assert_close(select["grads"], vmap["grads"])


@pytest.fixture(scope="module")
def batch_norm():
    specs = {"vmap": _spec("batch"), "vmap3": _spec("batch", chunk=3), "select": None}
    specs["select"] = _spec("batch", "select", chunk=4)
    model, variables, batch = specs["vmap"].model, _variables(specs["vmap"]), _batch(seed=1)
    masks = losses.subset_masks(COMPONENTS)

    def probs(x, v):  # training-mode application: normalised with x's own batch statistics
        out, updates = model.apply(v, x, train=True, mutable=["batch_stats"])
        return jax.nn.sigmoid(out), updates["batch_stats"]

    @jax.jit
    def run(variables, batch):
        images, classes, _ = batch
        out = {key: _loss_and_grads(spec, variables, batch) for key, spec in specs.items()}
        full, out["full_pass_stats"] = probs(images, variables)
        targets = encoding.encode(classes, "ordinal")
        # Independent reference: each subset in its own application (its own batch statistics),
        # one after the other.
        own = lax.map(lambda m: probs(images * m, variables)[0], masks)
        out["mfl_own_stats"] = losses.mutual_finding_loss(full, own, targets)[0]
        # Not the reference: all subsets normalised together, as one batch of M * B images.
        joint = probs(
            (images[None] * masks[:, None, None, None]).reshape(-1, *images.shape[1:]), variables
        )[0]
        out["mfl_joint_stats"] = losses.mutual_finding_loss(
            full, joint.reshape(own.shape), targets
        )[0]
        return out

    return run(variables, batch), variables


def test_subset_passes_use_their_own_batch_statistics(batch_norm):
    out, _ = batch_norm
    for key in ("vmap", "vmap3"):
        np.testing.assert_allclose(out[key]["terms"]["mfl"], out["mfl_own_stats"], rtol=1e-5)
    # The distinction is real: joint statistics would give another value.
    assert abs(float(out["mfl_joint_stats"]) / float(out["mfl_own_stats"]) - 1) > 1e-3


def test_running_averages_come_from_the_full_input_pass_only(batch_norm):
    out, variables = batch_norm
    for key in ("vmap", "vmap3", "select"):
        _assert_close(out[key]["batch_stats"], out["full_pass_stats"], rtol=1e-6, atol=0)
    # ...and the full-input pass did move them (momentum 0.9 of a batch of new statistics).
    changed = jax.tree.map(
        lambda a, b: float(jnp.max(jnp.abs(a - b))),
        out["full_pass_stats"],
        variables["batch_stats"],
    )
    assert max(jax.tree.leaves(changed)) > 1e-3


def test_chunked_probe_equals_unchunked_with_batch_statistics(batch_norm):
    out, _ = batch_norm
    np.testing.assert_allclose(out["vmap3"]["total"], out["vmap"]["total"], rtol=1e-5)
    # Batch-statistics backward passes at B = 4 over 2 x 2 feature maps divide by small
    # variances, which amplifies rounding in single entries: compare each leaf to 0.1 % of its
    # norm (as tests/test_train_step.py compares the MFL gradient).
    for x, y in zip(
        *map(jax.tree.leaves, (out["vmap3"]["grads"], out["vmap"]["grads"])), strict=True
    ):
        assert float(jnp.linalg.norm(x - y)) <= 1e-3 * float(jnp.linalg.norm(y)) + 1e-9


def test_select_probe_picks_the_subsets_vmap_trains_with_batch_statistics(batch_norm):
    out, _ = batch_norm
    np.testing.assert_array_equal(
        out["select"]["terms"]["mfl_subset_share"], out["vmap"]["terms"]["mfl_subset_share"]
    )


def test_four_components_fourteen_subsets_through_the_train_step():
    spec = _spec("batch", "select", chunk=4, axis_name="data")
    mesh = sharding.make_mesh()
    state = train_state.create_train_state(spec, jax.random.key(0), mesh)
    images, classes, grade_known = _batch(seed=2)
    batch = {
        "images": images,
        "classes": classes,
        "grade_known": grade_known,
        "t2w_lower_ratio": jnp.zeros(4, jnp.float32),
    }
    batch = jax.device_put(batch, sharding.batch_sharding(mesh))
    step = step_lib.make_train_step(spec, mesh)
    state, metrics = step(state, batch, jax.random.key(1), jnp.float32(LAMBDA))
    assert int(state.step) == 1
    assert metrics["mfl_subset_share"].shape == (14,)
    np.testing.assert_allclose(np.sum(metrics["mfl_subset_share"]), 1.0, rtol=1e-6)
    expected = metrics[spec.loss.name] + LAMBDA * metrics["mfl"]
    np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)
    assert float(metrics["mfl"]) > 0 and np.isfinite(float(metrics["grad_norm"]))


@pytest.mark.parametrize("chunk", [-1, True])
def test_mfl_chunk_must_be_a_non_negative_int(chunk):
    config = tiny_config()
    config.loss.mfl_chunk = chunk
    with pytest.raises(ValueError, match=r"^loss\.mfl_chunk: expected an int >= 0"):
        RunSpec.from_config(config)


def test_subset_masks_follow_the_default_subset_order():
    masks = losses.subset_masks(COMPONENTS)
    assert masks.shape == (14, 4)
    assert masks[:4].tolist() == np.eye(4).tolist()  # single components first
    assert masks[4].tolist() == [1, 1, 0, 0] and masks[-1].tolist() == [0, 1, 1, 1]


def test_slices_without_lesions_train_no_subset_and_are_not_counted_as_choosing_one():
    # Slice 0 has no lesion: every subset's distance is 0, it adds 0 to MFL and trains nothing,
    # so it must not be logged as having chosen subset 0 (`data.slices=all` has many such).
    images, classes, grade_known = _batch(seed=2)
    classes = classes.at[0].set(0)
    specs = {mode: _spec("frozen", mode) for mode in ("vmap", "select")}
    masks = losses.subset_masks(COMPONENTS)

    @jax.jit
    def run(variables, images, classes, grade_known):
        out = {
            mode: _loss_and_grads(spec, variables, (images, classes, grade_known))
            for mode, spec in specs.items()
        }

        def probs(x):
            return jax.nn.sigmoid(specs["vmap"].model.apply(variables, x, train=True))

        own = jax.vmap(lambda m: probs(images * m))(masks)  # each subset on its own
        targets = encoding.encode(classes, "ordinal")
        return out, losses.mutual_finding_loss(probs(images), own, targets)

    out, (expected, chosen) = run(_variables(specs["vmap"]), images, classes, grade_known)
    share = np.zeros(len(masks))
    for b in (1, 2, 3):  # the lesion slices, each 1/4 of the batch
        share[int(chosen[b])] += 0.25
    for mode in ("vmap", "select"):
        terms = out[mode]["terms"]
        np.testing.assert_allclose(terms["mfl"], expected, rtol=1e-5)
        np.testing.assert_allclose(terms["mfl_subset_share"], share, atol=1e-7)
    _assert_close(out["select"]["grads"], out["vmap"]["grads"])


@pytest.mark.parametrize("chunk, stacks", [(0, {14}), (4, {4, 2})])
def test_the_subset_inputs_are_built_one_chunk_at_a_time(chunk, stacks):
    # The compiled probe holds `[n, B, H, W, C]` subset inputs for n = the chunk sizes only
    # (14 subsets in chunks of 4: 4, 4, 4, then 2); unchunked, the whole stack of 14.
    import flax.linen as nn

    model, b, size, c = nn.Conv(5, (3, 3)), 2, 8, len(COMPONENTS)
    images = jnp.ones((b, size, size, c))
    params = model.init(jax.random.key(0), images)
    full, targets = jnp.full((b, size, size, 5), 0.5), jnp.ones((b, size, size, 5))
    masks = losses.subset_masks(COMPONENTS)

    def probe(p, x):
        return losses.subset_distances(
            lambda y: jax.nn.sigmoid(model.apply(p, y)), x, masks, full, targets, chunk=chunk
        )

    hlo = jax.jit(probe).lower(params, images).compile().as_text()
    found = re.findall(rf"f32\[(\d+),{b},{size},{size},{c}\]", hlo)
    assert {int(n) for n in found} == stacks
