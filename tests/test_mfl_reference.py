"""MFL over component subsets through the train step's loss against an independent NumPy
reference of the paper's definition (Cao et al. 2019, eqs. 3-5): for each subset, the network
applied to the input with the other components zeroed; per slice, the squared L2 distance to the
full-input output on the known positive target bits; the smallest over subsets, over H*W,
averaged over slices; the full output a reference without gradient.

The network is one per-pixel linear layer (`nn.Dense` on the channels), so the reference can
apply it, and differentiate MFL with respect to its weights, in a few lines of NumPy (float64).
Three components (6 subsets by default), the given components in any order, an explicit subset
list given out of component order, the paper's two components, both MFL modes, chunked and not.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from test_train_helpers import tiny_config

from focalnet_jax import encoding, losses
from focalnet_jax.run import RunSpec
from focalnet_jax.training import step as step_lib

COMPONENTS = ("t2w", "adc", "hbv")
B, H, W, K = 4, 5, 6, 5


class PixelLinear(nn.Module):
    """`[B, H, W, C] -> [B, H, W, 5]` logits: one Dense layer applied at every pixel."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(K, kernel_init=nn.initializers.normal(1.0), param_dtype=jnp.float64)(x)


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def _data(components, seed=0):
    """Images named by component (so any channel order holds the same exam), classes with one
    lesion-free slice and one grade-unknown lesion pixel."""
    rng = np.random.default_rng(seed)
    by_name = {c: rng.uniform(0.0, 1.0, (B, H, W)) for c in COMPONENTS}
    images = np.stack([by_name[c] for c in components], axis=-1)
    classes = np.zeros((B, H, W), np.int32)
    for b in range(1, B):  # slice 0: no lesion
        classes[b, 1:4, b : b + 3] = 1 + (2 * b) % 5
    grade_known = np.ones_like(classes, np.uint8)
    classes[2, 1, 2], grade_known[2, 1, 2] = 2, 0  # csPCa of unknown grade: bits 3-5 unknown
    return images, classes, grade_known


def _reference(kernel, bias, images, classes, grade_known, components, subsets):
    """(MFL, chosen [B], dMFL/dkernel, dMFL/dbias) of eq. 3 in float64 NumPy."""
    targets = np.stack([classes >= k for k in range(1, K + 1)], -1).astype(np.float64)
    valid = np.ones_like(targets)
    valid[..., 2:] = np.where((grade_known == 0) & (classes >= 1), 0.0, 1.0)[..., None]
    mask = targets * valid

    def probs(x):
        return 1.0 / (1.0 + np.exp(-(x @ kernel + bias)))

    full = probs(images)
    inputs = [images * np.array([c in s for c in components], np.float64) for s in subsets]
    outs = [probs(x) for x in inputs]
    d = np.array([[np.sum((mask[b] * (full[b] - p[b])) ** 2) for b in range(B)] for p in outs])
    chosen = np.argmin(d, axis=0)
    mfl = np.mean(d[chosen, np.arange(B)]) / (H * W)
    grad_kernel, grad_bias = np.zeros_like(kernel), np.zeros_like(bias)
    for b, i in enumerate(chosen):
        p = outs[i][b]
        dz = -2.0 * mask[b] ** 2 * (full[b] - p) * p * (1.0 - p) / (B * H * W)  # [H, W, K]
        grad_kernel += np.einsum("hwc,hwk->ck", inputs[i][b], dz)
        grad_bias += dz.sum(axis=(0, 1))
    return mfl, chosen, grad_kernel, grad_bias


def _spec(components, subsets, mode, chunk):
    config = tiny_config(overrides=[f"--config.train.batch_size={B}"])
    config.data.components = components
    config.loss.subsets = subsets
    config.loss.mfl_mode, config.loss.mfl_chunk = mode, chunk
    spec = RunSpec.from_config(config, image_size=(H, W))
    return dataclasses.replace(spec, model=PixelLinear())


def _loss(spec, params, data, mfl_weight):
    total, (terms, _) = step_lib.loss_fn(params, {}, *map(jnp.asarray, data), mfl_weight, spec=spec)
    return total, terms


PIRADS_LIKE = [("hbv", "adc"), ("t2w",), ("adc",)]  # out of component order on purpose


@pytest.mark.parametrize("mode", ["vmap", "select"])
@pytest.mark.parametrize("chunk", [0, 4, 1])
@pytest.mark.parametrize(
    "components, subsets",
    [
        (COMPONENTS, None),
        (("hbv", "t2w", "adc"), None),
        (("adc", "hbv", "t2w"), PIRADS_LIKE),
        (("t2w", "adc"), None),  # the paper's two subsets (chunk 1: a loop of 2 chunks)
    ],
)
def test_mfl_value_choice_and_gradient_equal_the_numpy_reference(mode, chunk, components, subsets):
    spec = _spec(components, subsets, mode, chunk)
    assert len(spec.subsets) == (2 ** len(components) - 2 if subsets is None else 3)
    data = _data(components)
    shape = (1, H, W, len(components))
    params = PixelLinear().init(jax.random.key(0), jnp.zeros(shape))["params"]
    kernel = np.asarray(params["Dense_0"]["kernel"])
    bias = np.asarray(params["Dense_0"]["bias"])
    mfl, chosen, grad_kernel, grad_bias = _reference(kernel, bias, *data, components, spec.subsets)
    total, terms = _loss(spec, params, data, 130.0)
    np.testing.assert_allclose(terms["mfl"], mfl, rtol=1e-10)
    np.testing.assert_allclose(total, terms["ordinal_focal"] + 130.0 * mfl, rtol=1e-10)
    lesion = np.array([0.0, 1.0, 1.0, 1.0])  # slice 0 has no lesion: trains no subset
    share = np.eye(len(spec.subsets))[chosen].T @ lesion / B
    np.testing.assert_allclose(terms["mfl_subset_share"], share, atol=1e-12)
    # MFL's gradient alone: the step's gradient at lambda = 1 minus that at lambda = 0.
    grads = [
        jax.grad(lambda p, w=w: _loss(spec, p, data, w)[0])(params)["Dense_0"] for w in (1.0, 0.0)
    ]
    np.testing.assert_allclose(grads[0]["kernel"] - grads[1]["kernel"], grad_kernel, atol=1e-12)
    np.testing.assert_allclose(grads[0]["bias"] - grads[1]["bias"], grad_bias, atol=1e-12)


@pytest.mark.parametrize("chunk, checkpointed", [(0, False), (4, False), (4, True), (1, True)])
def test_check_grads_of_the_chunked_subset_probe(chunk, checkpointed):
    # Finite differences of MFL with respect to the weights, in float64, through lax.map over
    # chunks of subsets (jax.checkpoint-ed as the vmap mode's chunks). The full output is held
    # fixed: it is MFL's reference, not differentiated (the whole step's loss is not a test
    # of that: finite differences there see MFL move with the full output, which the paper's
    # gradient leaves out).
    images, classes, grade_known = map(jnp.asarray, _data(COMPONENTS, seed=1))
    model = PixelLinear()
    params = model.init(jax.random.key(1), images[:1])["params"]
    targets = encoding.encode(classes, "ordinal")
    valid = encoding.target_validity(grade_known, classes, "ordinal")
    full = jax.nn.sigmoid(model.apply({"params": params}, images))
    masks = losses.subset_masks(COMPONENTS, dtype=np.float64)

    def mfl(p):
        probs_of = lambda x: jax.nn.sigmoid(model.apply({"params": p}, x))  # noqa: E731
        probs_of = jax.checkpoint(probs_of) if checkpointed else probs_of
        d = losses.subset_distances(
            probs_of, images, masks, full, targets, valid=valid, chunk=chunk
        )
        return jnp.mean(losses.loss_from_distances(d, H, W)[0])

    check_grads(jax.jit(mfl), (params,), order=1, modes=("rev",), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_mfl_weight_zero_trains_as_without_mfl():
    # lambda = 0: the loss and gradient are the focal loss's alone; MFL is still computed and
    # logged (its probe runs: loss.mfl=False is what saves its cost).
    data = _data(COMPONENTS, seed=2)
    params = PixelLinear().init(jax.random.key(2), jnp.zeros((1, H, W, 3)))["params"]
    with_mfl = _spec(COMPONENTS, None, "select", 4)
    without = dataclasses.replace(with_mfl, mfl=False, subsets=())
    (total, terms), grads = jax.value_and_grad(
        lambda p: _loss(with_mfl, p, data, 0.0), has_aux=True
    )(params)
    (plain, _), plain_grads = jax.value_and_grad(
        lambda p: _loss(without, p, data, 0.0), has_aux=True
    )(params)
    assert float(terms["mfl"]) > 0 and float(total) == float(plain)
    for x, y in zip(jax.tree.leaves(grads), jax.tree.leaves(plain_grads), strict=True):
        np.testing.assert_array_equal(x, y)
