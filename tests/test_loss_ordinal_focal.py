"""The ordinal focal loss (focalnet_jax.losses; Cao et al. 2019, eqs. 1-2) against hand-computed
values and an independent NumPy reference: pooling across a lesion boundary, valid bits, extreme
logits, gradients, its special cases (BCE, plain focal) and jit."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from loss_reference import LN2, ref_bce, ref_ordinal_focal

from focalnet_jax import encoding, losses

LN3, LN43 = math.log(3.0), math.log(4.0 / 3.0)


def _random_case(seed, shape=(2, 5, 6, 5), scale=3.0):
    rng = np.random.default_rng(seed)
    logits = (scale * rng.standard_normal(shape)).astype(np.float32)
    classes = rng.integers(0, 6, shape[:3])
    return logits, encoding.ordinal_encode(classes), classes


def _hand_example():
    """1x3x3x5: a GS 3+4 (class 2) lesion at the centre, a false positive at the top-left corner.

    logit ln 3 -> p = 3/4, logit 0 -> p = 1/2, logit -ln 3 -> p = 1/4.
    - background pixels: all bits -ln 3 -> p = 1/4, y = 0: margin p^2 = 1/16 per bit, q = 1/16;
    - corner (0, 0): bit 1 = ln 3 (p = 3/4, y = 0): margin 9/16, q = 9/16;
    - centre: y = 1,1,0,0,0, logits 0, ln 3, -ln 3 x 3: margins (1/2)^2, (1/4)^2, (1/4)^2 x 3,
      so q = 1/4.
    """
    logits = np.full((1, 3, 3, 5), -LN3, np.float32)
    logits[0, 0, 0, 0] = LN3
    logits[0, 1, 1, :2] = [0.0, LN3]
    targets = np.zeros((1, 3, 3, 5), np.float32)
    targets[0, 1, 1, :2] = 1.0
    return logits, targets


def test_ordinal_focal_loss_hand_example_with_pooling_across_the_lesion_boundary():
    logits, targets = _hand_example()
    # Cross-entropy sums (alpha = 3/4): -3/4 y log p - 1/4 (1 - y) log(1 - p) per bit.
    ce_background = 5 * 0.25 * LN43  # five bits, p = 1/4, y = 0
    ce_corner = 0.25 * math.log(4) + 4 * 0.25 * LN43  # bit 1 has 1 - p = 1/4
    ce_centre = 0.75 * LN2 + 0.75 * LN43 + 3 * 0.25 * LN43
    # 3x3 max filter on a 3x3 image: pixels whose window holds the corner, i.e. (0,0), (0,1),
    # (1,0) and the lesion centre (1,1), take q = 9/16; the other five see the centre, q = 1/4.
    pooled = (9 / 16 * (ce_corner + 2 * ce_background + ce_centre) + 1 / 4 * 5 * ce_background) / 9
    got = losses.ordinal_focal_loss(logits, targets)
    np.testing.assert_allclose(got, pooled, rtol=1e-6)
    # Without pooling each pixel keeps its own q.
    unpooled = (9 / 16 * ce_corner + 1 / 4 * ce_centre + 1 / 16 * 7 * ce_background) / 9
    np.testing.assert_allclose(
        losses.ordinal_focal_loss(logits, targets, pool_size=1), unpooled, rtol=1e-6
    )
    per_pixel = losses.ordinal_focal_loss_map(logits, targets)
    assert per_pixel.shape == (1, 3, 3)
    np.testing.assert_allclose(per_pixel[0, 1, 1], 9 / 16 * ce_centre, rtol=1e-6)
    np.testing.assert_allclose(per_pixel[0, 2, 2], 1 / 4 * ce_background, rtol=1e-6)


@pytest.mark.parametrize(
    "alpha, gamma, pool_size, with_valid",
    [(0.75, 2.0, 3, False), (0.25, 0.5, 1, False), (0.75, 2.0, 5, True), (0.5, 1.0, 3, True)],
)
def test_ordinal_focal_loss_matches_numpy_reference(alpha, gamma, pool_size, with_valid):
    logits, targets, _ = _random_case(pool_size)
    valid = None
    if with_valid:
        valid = (np.random.default_rng(7).random(logits.shape) > 0.3).astype(np.float32)
        valid[0, 0, 0] = 0  # one pixel with no valid bit at all
    got = losses.ordinal_focal_loss(
        logits, targets, alpha=alpha, gamma=gamma, pool_size=pool_size, valid=valid
    )
    expected = ref_ordinal_focal(logits, targets, alpha, gamma, pool_size, valid)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize("gamma", [2.0, 0.5, 0.0])
def test_ordinal_focal_loss_finite_at_extreme_logits(gamma):
    targets = np.zeros((1, 4, 4, 5), np.float32)
    targets[0, 1:3, 1:3, :3] = 1
    logits = np.where(np.arange(16).reshape(1, 4, 4, 1) % 2, 100.0, -100.0) * np.ones(
        (1, 4, 4, 5), np.float32
    )
    for sign in (1.0, -1.0):  # confidently right and confidently wrong
        x = jnp.asarray(sign * logits * (2 * targets - 1))
        value, grad = jax.value_and_grad(
            lambda z: losses.ordinal_focal_loss(z, targets, gamma=gamma)
        )(x)
        assert np.isfinite(value) and np.all(np.isfinite(grad))
        for name in ("focal", "sigmoid_ce", "ce_focal", "soft_dice", "ce_dice"):
            fn = losses.get_loss(name).fn
            value, grad = jax.value_and_grad(lambda z, fn=fn: fn(z, targets))(x)
            assert np.isfinite(value) and np.all(np.isfinite(grad)), name


def test_ordinal_focal_loss_wrong_by_100_is_huge_and_right_by_100_is_zero():
    targets = np.ones((1, 2, 2, 5), np.float32)
    right = losses.ordinal_focal_loss(np.full(targets.shape, 100.0, np.float32), targets)
    wrong = losses.ordinal_focal_loss(np.full(targets.shape, -100.0, np.float32), targets)
    assert right == 0.0
    np.testing.assert_allclose(wrong, 5 * 0.75 * 100.0, rtol=1e-5)  # q = 1, -log p = 100


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def test_check_grads(x64):
    logits, targets, _ = _random_case(3, shape=(1, 4, 4, 5), scale=1.5)
    logits = jnp.asarray(logits, jnp.float64)
    valid = (np.random.default_rng(1).random(logits.shape) > 0.2).astype(np.float64)
    functions = [
        lambda z: losses.ordinal_focal_loss(z, targets, valid=valid),
        lambda z: losses.ordinal_focal_loss(z, targets, gamma=0.5, pool_size=1),
        lambda z: losses.focal_loss(z, targets, valid=valid),
        lambda z: losses.ce_dice_loss(z, targets),
        lambda z: losses.softmax_cross_entropy(z[..., :4], targets[..., :4] * 0 + np.eye(4)[1]),
    ]
    for fn in functions:
        check_grads(
            jax.jit(fn), (logits,), order=1, modes=("fwd", "rev"), eps=1e-6, atol=1e-5, rtol=1e-5
        )
    full = jax.nn.sigmoid(logits)
    subsets = jax.nn.sigmoid(jnp.stack([logits + 1.0, logits - 0.5]))
    check_grads(
        jax.jit(lambda s: losses.mutual_finding_loss(full, s, targets)[0]),
        (subsets,),
        order=1,
        modes=("fwd", "rev"),
        eps=1e-6,
    )


def test_gamma_zero_alpha_half_no_pooling_is_half_bce():
    logits, targets, _ = _random_case(11)
    got = losses.ordinal_focal_loss(logits, targets, alpha=0.5, gamma=0.0, pool_size=1)
    np.testing.assert_allclose(got, 0.5 * losses.sigmoid_cross_entropy(logits, targets), rtol=1e-6)
    np.testing.assert_allclose(got, 0.5 * ref_bce(logits, targets), rtol=1e-5)


def test_single_channel_without_pooling_equals_plain_focal():
    logits, targets, _ = _random_case(12, shape=(2, 4, 4, 1))
    targets = targets[..., :1]  # the lesion bit
    np.testing.assert_allclose(
        losses.ordinal_focal_loss(logits, targets, pool_size=1),
        losses.focal_loss(logits, targets),
        rtol=1e-6,
    )


def test_invalid_bits_add_nothing_and_leave_the_focal_max():
    logits, targets, _ = _random_case(13)
    valid = np.ones_like(targets)
    valid[..., 2:] = 0  # grade bits unknown everywhere
    base = losses.ordinal_focal_loss(logits, targets, valid=valid)
    scrambled = logits.copy()
    scrambled[..., 2:] = -scrambled[..., 2:] * 5
    np.testing.assert_allclose(losses.ordinal_focal_loss(scrambled, targets, valid=valid), base)
    np.testing.assert_allclose(
        base, losses.ordinal_focal_loss(logits[..., :2], targets[..., :2]), rtol=1e-6
    )
    np.testing.assert_allclose(
        losses.ordinal_focal_loss(logits, targets, valid=np.ones_like(targets)),
        losses.ordinal_focal_loss(logits, targets),
    )
    for name in ("sigmoid_ce", "focal", "soft_dice", "ce_dice", "ce_focal"):
        fn = losses.get_loss(name).fn
        np.testing.assert_allclose(
            fn(scrambled, targets, valid=valid), fn(logits, targets, valid=valid), rtol=1e-6
        )


def test_jit_skips_value_checks_but_computes_the_same():
    logits, targets, _ = _random_case(14)
    np.testing.assert_allclose(
        jax.jit(losses.ordinal_focal_loss)(logits, targets),
        losses.ordinal_focal_loss(logits, targets),
        rtol=1e-6,
    )
    # Differentiating under jit (as a train step does) keeps the max-filter's gradient rule.
    grad = jax.grad(losses.ordinal_focal_loss)
    np.testing.assert_allclose(
        jax.jit(grad)(logits, targets), grad(logits, targets), rtol=1e-5, atol=1e-8
    )
