"""Tests of focalnet_jax.losses against hand-computed values and an independent NumPy reference."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from focalnet_jax import encoding, losses

LN2, LN3, LN43 = math.log(2.0), math.log(3.0), math.log(4.0 / 3.0)


# ---------------------------------------------------------------------------------------------
# NumPy reference (float64, explicit loops): Cao et al. 2019, eqs. (1)-(3), and the baselines.
# ---------------------------------------------------------------------------------------------
def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def ref_ordinal_focal(logits, targets, alpha, gamma, pool_size, valid=None):
    """Eq. (2) per pixel over the valid bits, a pool_size^2 max filter, then eq. (1), mean."""
    x, y = np.asarray(logits, np.float64), np.asarray(targets, np.float64)
    v = np.ones_like(y) if valid is None else np.asarray(valid, np.float64)
    p = _sigmoid(x)
    batch, height, width, channels = x.shape
    q = np.zeros((batch, height, width))
    for b, h, w in np.ndindex(batch, height, width):
        margins = [
            y[b, h, w, j] * (1 - p[b, h, w, j]) ** gamma
            + (1 - y[b, h, w, j]) * p[b, h, w, j] ** gamma
            for j in range(channels)
            if v[b, h, w, j]
        ]
        q[b, h, w] = max(margins, default=0.0)  # eq. (2)
    r = pool_size // 2
    total = 0.0
    for b, h, w in np.ndindex(batch, height, width):
        pooled = q[b, max(h - r, 0) : h + r + 1, max(w - r, 0) : w + r + 1].max()
        ce = sum(
            v[b, h, w, j]
            * (
                -alpha * y[b, h, w, j] * math.log(p[b, h, w, j])
                - (1 - alpha) * (1 - y[b, h, w, j]) * math.log(1 - p[b, h, w, j])
            )
            for j in range(channels)
        )
        total += pooled * ce  # eq. (1)
    return total / (batch * height * width)


def ref_bce(logits, targets):
    p, y = _sigmoid(np.float64(logits)), np.float64(targets)
    return np.mean(np.sum(-y * np.log(p) - (1 - y) * np.log(1 - p), -1))


def ref_focal(logits, targets, alpha, gamma):
    p, y = _sigmoid(np.float64(logits)), np.float64(targets)
    pt = np.where(y == 1, p, 1 - p)
    at = np.where(y == 1, alpha, 1 - alpha)
    return np.mean(np.sum(-at * (1 - pt) ** gamma * np.log(pt), -1))


def ref_softmax_ce(logits, targets):
    z = np.float64(logits)
    log_softmax = z - np.log(np.sum(np.exp(z), -1, keepdims=True))
    return np.mean(-np.sum(np.float64(targets) * log_softmax, -1))


def ref_dice(logits, targets, eps, softmax=False):
    z = np.float64(logits)
    p = np.exp(z) / np.sum(np.exp(z), -1, keepdims=True) if softmax else _sigmoid(z)
    y = np.float64(targets)
    dice = (2 * np.sum(p * y, (1, 2)) + eps) / (np.sum(p + y, (1, 2)) + eps)
    return 1 - np.mean(dice)


def ref_mfl(full, subsets, targets):
    """Eq. (3) with a Python loop over subsets and slices."""
    batch, height, width, _ = full.shape
    chosen, best = [], []
    for b in range(batch):
        d = [np.sum((targets[b] * (full[b] - s[b])) ** 2) for s in subsets]
        chosen.append(int(np.argmin(d)))
        best.append(min(d))
    return np.mean(best) / (height * width), chosen


def _random_case(seed, shape=(2, 5, 6, 5), scale=3.0):
    rng = np.random.default_rng(seed)
    logits = (scale * rng.standard_normal(shape)).astype(np.float32)
    classes = rng.integers(0, 6, shape[:3])
    return logits, encoding.ordinal_encode(classes), classes


# ---------------------------------------------------------------------------------------------
# Ordinal focal loss
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# Baselines: golden values and the registry
# ---------------------------------------------------------------------------------------------
def _golden_inputs(k):
    """1x2x2xk logits (a fixed ramp) and targets of classes [[0, 1], [3, 5]] (ordinal/one-hot)."""
    logits = (np.arange(4 * k, dtype=np.float32).reshape(1, 2, 2, k) - 2.0 * k) / k
    classes = np.array([[[0, 1], [3, 5]]])
    name = {5: "ordinal", 6: "onehot", 1: "binary"}[k]
    return logits, encoding.encode(classes, name)


# (loss, params, K, expected): expected from the NumPy reference above (float64), frozen here.
GOLDEN = [
    ("ordinal_focal", {}, 5, 0.5955755),
    ("ordinal_focal", {"alpha": 0.5, "gamma": 1.0, "pool_size": 1}, 5, 0.7070710),
    ("sigmoid_ce", {}, 5, 2.3318101),
    ("focal", {}, 5, 0.2946999),
    ("focal", {"alpha": 0.25, "gamma": 0.0}, 5, 1.2174322),
    ("softmax_ce", {}, 6, 1.8735938),
    ("soft_dice", {}, 5, 0.2915839),
    ("soft_dice", {"eps": 1e-3}, 5, 0.3728565),
    ("ce_dice", {}, 5, 2.6233940),
    ("ce_focal", {}, 5, 2.6265100),
    ("softmax_ce_dice", {}, 6, 2.3439280),
    ("binary_ce", {}, 1, 0.6116496),
    ("binary_focal", {}, 1, 0.1684527),
]


@pytest.mark.parametrize("name, params, k, expected", GOLDEN)
def test_golden_values(name, params, k, expected):
    spec = losses.get_loss(name, **params)
    assert encoding.num_outputs(spec.encoding) == k
    logits, targets = _golden_inputs(k)
    np.testing.assert_allclose(spec.fn(logits, targets), expected, atol=1e-4)


def test_golden_values_agree_with_the_reference():
    logits, targets = _golden_inputs(5)
    np.testing.assert_allclose(
        GOLDEN[0][3], ref_ordinal_focal(logits, targets, 0.75, 2.0, 3), atol=1e-6
    )
    np.testing.assert_allclose(GOLDEN[2][3], ref_bce(logits, targets), atol=1e-6)
    np.testing.assert_allclose(GOLDEN[3][3], ref_focal(logits, targets, 0.75, 2.0), atol=1e-6)
    np.testing.assert_allclose(GOLDEN[6][3], ref_dice(logits, targets, 1.0), atol=1e-6)
    onehot_logits, onehot_targets = _golden_inputs(6)
    np.testing.assert_allclose(
        GOLDEN[5][3], ref_softmax_ce(onehot_logits, onehot_targets), atol=1e-6
    )
    np.testing.assert_allclose(
        GOLDEN[10][3],
        ref_softmax_ce(onehot_logits, onehot_targets)
        + ref_dice(onehot_logits, onehot_targets, 1.0, softmax=True),
        atol=1e-6,
    )


def test_baselines_hand_values_at_zero_logits():
    targets = encoding.ordinal_encode(np.array([[[0, 2], [5, 0]]]))  # 7 one-bits of 20
    zeros5 = np.zeros((1, 2, 2, 5), np.float32)
    np.testing.assert_allclose(losses.sigmoid_cross_entropy(zeros5, targets), 5 * LN2, rtol=1e-6)
    # p = 1/2: (1/2)^2 focal weight; alpha 3/4 on 7 positive bits, 1/4 on 13 negative bits.
    np.testing.assert_allclose(
        losses.focal_loss(zeros5, targets), 0.25 * LN2 * (0.75 * 7 + 0.25 * 13) / 4, rtol=1e-6
    )
    onehot = encoding.onehot_encode(np.array([[[0, 2], [5, 0]]]))
    np.testing.assert_allclose(
        losses.softmax_cross_entropy(np.zeros((1, 2, 2, 6), np.float32), onehot), math.log(6)
    )
    # Dice per channel with p = 1/2 on 4 pixels and n positives: (n + 1) / (2 + n + 1).
    per_channel = [(n + 1) / (3 + n) for n in (2, 2, 1, 1, 1)]
    np.testing.assert_allclose(
        losses.soft_dice_loss(zeros5, targets), 1 - np.mean(per_channel), rtol=1e-6
    )


def test_registry():
    assert set(losses.LOSS_NAMES) >= {
        "ordinal_focal",
        "sigmoid_ce",
        "focal",
        "softmax_ce",
        "soft_dice",
        "ce_dice",
        "ce_focal",
        "binary_ce",
        "binary_focal",
    }
    spec = losses.get_loss("ordinal_focal")
    assert (spec.name, spec.encoding, spec.fn) == (
        "ordinal_focal",
        "ordinal",
        losses.ordinal_focal_loss,
    )
    assert losses.get_loss("softmax_ce").encoding == "onehot"
    assert losses.get_loss("binary_focal").encoding == "binary"
    assert losses.get_loss("sigmoid_ce", alpha=None).fn is losses.sigmoid_cross_entropy
    with pytest.raises(ValueError, match="name: unknown loss 'dice'.*ordinal_focal"):
        losses.get_loss("dice")
    with pytest.raises(ValueError, match="does not take \\['alpha'\\]"):
        losses.get_loss("sigmoid_ce", alpha=0.5)


# ---------------------------------------------------------------------------------------------
# Mutual finding loss, subsets and the positive-bit ratio
# ---------------------------------------------------------------------------------------------
def _mfl_example():
    """B=2, 2x2 pixels, K=2, two subsets; positive bits: slice 0 (0,0,bit 1); slice 1 (1,1,both).

    full = 0.8 everywhere. Slice 0: subset 0 has 0.6 there -> d = 0.2^2 = 0.04, subset 1 has 0.3
    -> 0.25: chooses 0. Slice 1: subset 0 has 0.2, 0.4 -> 0.36 + 0.16 = 0.52; subset 1 has 0.7, 0.9
    -> 0.01 + 0.01 = 0.02: chooses 1. MFL = mean(0.04, 0.02) / (2 * 2) = 0.0075.
    Every other subset output is 0 or 1, far from full, so counting them would change the result.
    """
    targets = np.zeros((2, 2, 2, 2), np.float32)
    targets[0, 0, 0, 0] = 1
    targets[1, 1, 1, :] = 1
    full = np.full((2, 2, 2, 2), 0.8, np.float32)
    subsets = np.zeros((2, 2, 2, 2, 2), np.float32)
    subsets[1] = 1.0
    subsets[0, 0, 0, 0, 0], subsets[1, 0, 0, 0, 0] = 0.6, 0.3
    subsets[0, 1, 1, 1], subsets[1, 1, 1, 1] = [0.2, 0.4], [0.7, 0.9]
    return full, subsets, targets


def test_mutual_finding_loss_hand_example_and_per_slice_choice():
    full, subsets, targets = _mfl_example()
    loss, chosen = losses.mutual_finding_loss(full, subsets, targets)
    np.testing.assert_allclose(loss, 0.0075, rtol=1e-6)
    np.testing.assert_array_equal(chosen, [0, 1])
    assert chosen.dtype == jnp.int32
    expected_loss, expected_chosen = ref_mfl(full, subsets, targets)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
    assert list(chosen) == expected_chosen


def test_mutual_finding_loss_ignores_pixels_outside_positive_bits():
    full, subsets, targets = _mfl_example()
    noise = np.random.default_rng(0).random(subsets.shape).astype(np.float32)
    changed = np.where(targets[None] == 1, subsets, noise)
    loss, chosen = losses.mutual_finding_loss(np.where(targets == 1, full, 0.1), changed, targets)
    np.testing.assert_allclose(loss, 0.0075, rtol=1e-6)
    np.testing.assert_array_equal(chosen, [0, 1])


def test_mutual_finding_loss_takes_the_tail_sums_of_a_onehot_output():
    # The softmax tail sums MFL compares for a one-hot model rounded above 1 where class 0 is
    # all but impossible, and mutual_finding_loss refused its own inputs outside jit.
    logits = np.random.default_rng(0).normal(size=(1, 8, 8, 6)).astype(np.float32)
    logits[..., 0] = -30.0
    full = losses.mfl_probs(jnp.asarray(logits), "onehot")
    subsets = losses.mfl_probs(jnp.asarray(logits[None] + 1.0), "onehot")
    targets = np.ones((1, 8, 8, 5), np.float32)
    loss, chosen = losses.mutual_finding_loss(full, subsets, targets)
    expected = np.sum((np.asarray(full) - np.asarray(subsets[0])) ** 2) / 64
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    assert chosen.tolist() == [0]


def test_mutual_finding_loss_gradients():
    full, subsets, targets = _mfl_example()
    grad_full = jax.grad(lambda f: losses.mutual_finding_loss(f, subsets, targets)[0])(full)
    assert np.all(np.asarray(grad_full) == 0.0)
    grad_sub = jax.grad(lambda s: losses.mutual_finding_loss(full, s, targets)[0])(subsets)
    # d/ds of mean_b d_b / (HW) = -2 y (full - s) / (B H W), on the chosen subset only.
    expected = np.zeros_like(subsets)
    for b, i in enumerate([0, 1]):
        expected[i, b] = -2 * targets[b] * (full[b] - subsets[i, b]) / (2 * 2 * 2)
    np.testing.assert_allclose(grad_sub, expected, atol=1e-7)


def test_mutual_finding_loss_valid_mask_removes_bits():
    full, subsets, targets = _mfl_example()
    valid = np.ones_like(targets)
    valid[1, 1, 1, 1] = 0  # slice 1 keeps bit 1 only: subset 0 -> 0.36, subset 1 -> 0.01
    loss, chosen = losses.mutual_finding_loss(full, subsets, targets, valid=valid)
    np.testing.assert_allclose(loss, (0.04 + 0.01) / 2 / 4, rtol=1e-6)
    np.testing.assert_array_equal(chosen, [0, 1])


def test_select_mode_matches_all_subsets():
    rng = np.random.default_rng(5)
    full = rng.random((3, 4, 4, 5)).astype(np.float32)
    subsets = rng.random((3, 3, 4, 4, 5)).astype(np.float32)
    targets = encoding.ordinal_encode(rng.integers(0, 6, (3, 4, 4)))
    loss, chosen = losses.mutual_finding_loss(full, subsets, targets)
    picked = losses.mfl_select(subsets, chosen)
    assert picked.shape == (3, 4, 4, 5)
    for b in range(3):
        np.testing.assert_array_equal(picked[b], subsets[int(chosen[b]), b])
    selected_loss, single = losses.mutual_finding_loss(full, picked[None], targets)
    np.testing.assert_allclose(selected_loss, loss, rtol=1e-6)
    np.testing.assert_array_equal(single, [0, 0, 0])


def test_component_subsets_default_order_and_validation():
    assert losses.component_subsets(("t2w", "adc")) == [("t2w",), ("adc",)]
    assert losses.component_subsets(["t2w", "adc", "hbv"]) == [
        ("t2w",),
        ("adc",),
        ("hbv",),
        ("t2w", "adc"),
        ("t2w", "hbv"),
        ("adc", "hbv"),
    ]
    given = losses.component_subsets(("t2w", "adc", "hbv"), [["adc", "t2w"], ("hbv",)])
    assert given == [("t2w", "adc"), ("hbv",)]


@pytest.mark.parametrize(
    "components, subsets, error, match",
    [
        (("t2w", "adc"), [], ValueError, "subsets: expected a non-empty list"),
        (("t2w", "adc"), [("dwi",)], ValueError, r"subsets\[0\]: unknown component.*dwi"),
        (("t2w", "adc"), [("t2w",), ()], ValueError, r"subsets\[1\]: expected a non-empty"),
        (("t2w", "adc"), [("t2w", "adc")], ValueError, r"subsets\[0\].*proper subset"),
        (("t2w", "adc"), [("adc",), ("adc",)], ValueError, r"subsets\[1\].*listed twice"),
        (("t2w", "adc"), ["t2w"], TypeError, r"subsets\[0\].*string"),
        (("t2w",), None, ValueError, "components: expected at least 2"),
        (("t2w", "t2w"), None, ValueError, "components"),
    ],
)
def test_component_subsets_bad_input(components, subsets, error, match):
    with pytest.raises(error, match=match):
        losses.component_subsets(components, subsets)


def test_subset_inputs_zero_the_other_components():
    images = np.arange(2 * 3 * 3 * 3, dtype=np.float32).reshape(2, 3, 3, 3) + 1
    out = losses.subset_inputs(images, ("t2w", "adc", "hbv"), [("adc",), ("t2w", "hbv")])
    assert out.shape == (2, 2, 3, 3, 3)
    np.testing.assert_array_equal(out[0], images * np.array([0, 1, 0]))
    np.testing.assert_array_equal(out[1], images * np.array([1, 0, 1]))
    assert losses.subset_inputs(images, ("t2w", "adc", "hbv")).shape == (6, 2, 3, 3, 3)
    with pytest.raises(ValueError, match="images: expected 2 channels"):
        losses.subset_inputs(images, ("t2w", "adc"), None)


def test_positive_bit_ratio_from_classes_memmap_and_bits(tmp_path):
    classes = np.zeros((5, 4, 4), np.uint8)
    classes[0, 0, :3] = [1, 3, 5]  # 1 + 3 + 5 = 9 ordinal one-bits
    classes[3, 2, 2] = 2  # 2 more
    grade_known = np.ones_like(classes)
    grade_known[0, 0, 2] = 0  # class-5 pixel of unknown grade: 2 known ones of 2 valid bits
    total_bits = classes.size * 5
    stored = np.memmap(tmp_path / "classes.u8", np.uint8, "w+", shape=classes.shape)
    stored[:] = classes
    for chunk_size in (1, 2, 64):
        ratio = losses.positive_bit_ratio(stored, chunk_size=chunk_size)
        assert ratio == pytest.approx(11 / total_bits)
        ratio = losses.positive_bit_ratio(classes, grade_known=grade_known, chunk_size=chunk_size)
        assert ratio == pytest.approx(8 / (total_bits - 3))
    bits = encoding.ordinal_encode(classes)
    valid = encoding.target_validity(grade_known, classes, "ordinal")
    assert losses.positive_bit_ratio(bits, valid=valid) == pytest.approx(8 / (total_bits - 3))
    assert losses.positive_bit_ratio(classes, encoding="binary") == pytest.approx(4 / 80)
    assert losses.mfl_weight(classes) == pytest.approx(total_bits / 11)
    with pytest.raises(ValueError, match="labels: no positive target bits"):
        losses.mfl_weight(np.zeros((2, 3, 3), np.uint8))
    with pytest.raises(ValueError, match="labels: expected classes in 0..5"):
        losses.positive_bit_ratio(np.full((2, 2), 7, np.uint8))
    with pytest.raises(ValueError, match="grade_known: expected the shape"):
        losses.positive_bit_ratio(classes, grade_known=grade_known[:2])
    rows = np.array([0, 3, 4])  # the three slices counted; 11 ones of which 3 bits invalid
    for chunk_size in (1, 2, 64):
        ratio = losses.positive_bit_ratio(
            stored, grade_known=grade_known, rows=rows, chunk_size=chunk_size
        )
        assert ratio == pytest.approx(8 / (3 * 16 * 5 - 3))
    assert losses.positive_bit_ratio(stored, rows=np.array([1, 2])) == 0.0
    with pytest.raises(ValueError, match="rows: expected a 1-D integer index"):
        losses.positive_bit_ratio(classes, rows=np.array([0.0, 1.0]))


# ---------------------------------------------------------------------------------------------
# Bad input: each error names the argument
# ---------------------------------------------------------------------------------------------
_X = np.zeros((1, 2, 2, 5), np.float32)
_Y = np.zeros((1, 2, 2, 5), np.float32)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: losses.ordinal_focal_loss(_X.astype(np.int32), _Y), TypeError, "logits"),
        (lambda: losses.ordinal_focal_loss(_X[0], _Y[0]), ValueError, "logits"),
        (lambda: losses.ordinal_focal_loss(_X, _Y[..., :4]), ValueError, "targets: expected shape"),
        (lambda: losses.ordinal_focal_loss(_X, _Y + 0.5), ValueError, "targets: expected only 0/1"),
        (lambda: losses.ordinal_focal_loss(_X, _Y, valid=_Y[:, :1]), ValueError, "valid"),
        (lambda: losses.ordinal_focal_loss(_X, _Y, valid=_Y + 2), ValueError, "valid"),
        (lambda: losses.ordinal_focal_loss(_X, _Y.astype(str)), TypeError, "targets"),
        (lambda: losses.ordinal_focal_loss(_X, _Y, alpha=1.5), ValueError, "alpha"),
        (lambda: losses.ordinal_focal_loss(_X, _Y, gamma=-1.0), ValueError, "gamma"),
        (lambda: losses.ordinal_focal_loss(_X, _Y, pool_size=2), ValueError, "pool_size"),
        (lambda: losses.ordinal_focal_loss(_X, _Y, pool_size=-1), ValueError, "pool_size"),
        (lambda: losses.ordinal_focal_loss(_X, _Y, pool_size=-3), ValueError, "pool_size"),
        (lambda: losses.sigmoid_cross_entropy(_X, _Y - 1), ValueError, "targets"),
        (lambda: losses.focal_loss(_X, _Y[..., :1]), ValueError, "targets"),
        (lambda: losses.softmax_cross_entropy(_X.astype(np.int8), _Y), TypeError, "logits"),
        (lambda: losses.soft_dice_loss(_X, _Y, activation="relu"), ValueError, "activation"),
        (lambda: losses.mutual_finding_loss(_X, _X, _Y), ValueError, "subset_probs"),
        (lambda: losses.mutual_finding_loss(_X, _X[None] + 3, _Y), ValueError, "subset_probs"),
        (lambda: losses.mutual_finding_loss(_X - 1, _X[None], _Y), ValueError, "full_probs"),
        (lambda: losses.mutual_finding_loss(_X, _X[None], _Y + 3), ValueError, "targets"),
        (lambda: losses.mfl_select(_X[None], np.zeros(2, int)), ValueError, "chosen"),
        # An index past the subsets was clamped to the last, -1 wrapped to it: another subset.
        (
            lambda: losses.mfl_select(np.zeros((2, 3)), np.array([0, 2, -1])),
            ValueError,
            r"chosen: expected subsets in 0\.\.1, got \[ 2 -1\]",
        ),
        (lambda: losses.positive_bit_ratio(_Y.astype(str)), TypeError, "labels"),
    ],
)
def test_bad_input_names_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: losses.ordinal_focal_loss(_X, _Y, gamma=np.float32(-1)), "gamma: .* >= 0.0"),
        (lambda: losses.ordinal_focal_loss(_X, _Y, gamma=jnp.array(-1.0)), "gamma: .* >= 0.0"),
        (lambda: losses.focal_loss(_X, _Y, gamma=np.float32("nan")), "gamma: .*finite"),
        (lambda: losses.focal_loss(_X, _Y, alpha=np.float32(1.5)), r"alpha: .*\[0.0, 1.0\]"),
        (lambda: losses.soft_dice_loss(_X, _Y, eps=np.float32(0)), "eps: .* >= 1e-12"),
        (lambda: losses.ce_focal_loss(_X, _Y, weights=(np.float32(-1), 1)), "weights"),
        # Not a number: a one-element array (alpha 2 weighted the negative bits by -1, unchecked),
        # None or a string (a TypeError inside JAX that named no option).
        (lambda: losses.focal_loss(_X, _Y, alpha=np.array([2.0])), r"alpha: .*real number"),
        (lambda: losses.ordinal_focal_loss(_X, _Y, gamma=np.array([-1.0])), "gamma: .*real"),
        (lambda: losses.soft_dice_loss(_X, _Y, eps=jnp.array([0.0])), "eps: .*real number"),
        (lambda: losses.focal_loss(_X, _Y, alpha=None), "alpha: expected a real number, got None"),
        (lambda: losses.focal_loss(_X, _Y, gamma="2"), "gamma: expected a real number, got '2'"),
        (lambda: losses.focal_loss(_X, _Y, gamma=(2.0,)), r"gamma: .*got \(2.0,\)"),
    ],
)
def test_numpy_and_jax_scalars_are_range_checked_like_python_floats(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_traced_hyperparameters_pass_unchecked_when_scalar():
    expected = losses.focal_loss(_X, _Y, gamma=1.5)
    traced = jax.jit(lambda gamma: losses.focal_loss(_X, _Y, gamma=gamma))(1.5)
    np.testing.assert_allclose(traced, expected, rtol=1e-6)
    with pytest.raises(ValueError, match=r"gamma: expected a scalar, got shape \(1,\)"):
        jax.jit(lambda gamma: losses.focal_loss(_X, _Y, gamma=gamma))(jnp.ones(1))


def test_numpy_integer_pool_size_and_weights_are_accepted():
    expected = losses.ordinal_focal_loss(_X, _Y, pool_size=3)
    np.testing.assert_allclose(losses.ordinal_focal_loss(_X, _Y, pool_size=np.int64(3)), expected)
    weighted = losses.ce_focal_loss(_X, _Y, weights=(np.float32(2), 1.0))
    np.testing.assert_allclose(weighted, losses.ce_focal_loss(_X, _Y, weights=(2.0, 1.0)))


def test_mutual_finding_loss_ties_train_the_first_subset_only():
    # Equal distances (here identical subset outputs, or a slice without lesions where every
    # distance is 0) choose the first subset, and only it receives the gradient, as `select`
    # recomputes only that one.
    full, subsets, targets = _mfl_example()
    tied = np.stack([subsets[1], subsets[1], subsets[0]])
    targets = targets.copy()
    targets[0] = 0  # slice 0: no positive bit, every distance 0
    loss, chosen = losses.mutual_finding_loss(full, tied, targets)
    np.testing.assert_array_equal(chosen, [0, 0])
    np.testing.assert_allclose(loss, 0.02 / 2 / 4, rtol=1e-6)  # slice 1 as subset 1 before
    grad = jax.grad(lambda s: losses.mutual_finding_loss(full, s, targets)[0])(tied)
    expected = np.zeros_like(tied)
    expected[0, 1] = -2 * targets[1] * (full[1] - tied[0, 1]) / (2 * 2 * 2)
    np.testing.assert_allclose(grad, expected, atol=1e-7)
    assert ref_mfl(full, tied, targets) == (pytest.approx(float(loss)), [0, 0])


def test_softmax_ce_trains_a_grade_unknown_lesion_as_clinically_significant():
    # A grade-unknown lesion pixel (class 2, grade_known 0): one-hot bits 2-5 unknown. What is
    # known is "class >= 2", so the pixel costs -log P(class >= 2) = -log(p2 + ... + p5), the
    # one-hot counterpart of the ordinal bits 1-2 it trains, and a background prediction there is
    # penalised. Hand values: logits (10, 0, 0, 0, 0, 0) give P(class >= 2) = 4 / (e^10 + 5).
    classes, grade_known = np.array([[[2, 2, 0]]]), np.array([[[0, 1, 0]]])
    targets = encoding.onehot_encode(classes)
    valid = encoding.target_validity(grade_known, classes, "onehot")
    logits = np.zeros((1, 1, 3, 6), np.float64)
    logits[..., 0] = 10.0
    per_pixel = losses.softmax_cross_entropy_map(logits, targets, valid=valid)
    normaliser = math.exp(10.0) + 5.0
    expected = [-math.log(n / normaliser) for n in (4.0, 1.0, math.exp(10.0))]
    np.testing.assert_allclose(per_pixel[0, 0], expected, rtol=1e-6, atol=1e-5)  # float32
    # The gradient at the unknown pixel: softmax - (p_k / P(class >= 2) on classes 2-5), here
    # 1/4 each (their logits are equal).
    grad = jax.grad(lambda z: losses.softmax_cross_entropy(z, targets, valid=valid))(logits)
    p = np.exp(logits[0, 0, 0]) / normaliser
    expected_grad = (p - np.r_[0, 0, 0.25, 0.25, 0.25, 0.25]) / 3  # softmax - target, mean of 3
    np.testing.assert_allclose(grad[0, 0, 0], expected_grad, rtol=1e-6, atol=1e-12)
    # Nothing known at a pixel (every bit invalid): no cost; all bits valid: the usual CE.
    none_known = np.zeros_like(valid)
    assert float(losses.softmax_cross_entropy(logits, targets, valid=none_known)) == 0.0
    np.testing.assert_allclose(
        losses.softmax_cross_entropy(logits, targets, valid=np.ones_like(valid)),
        ref_softmax_ce(logits, targets),
        rtol=1e-7,
    )


@pytest.mark.parametrize("value", ["-130", -1.0, "nan", float("inf"), True])
def test_mfl_weight_must_be_auto_or_a_finite_non_negative_number(value):
    # A negative lambda would ascend MFL, a NaN or infinite one makes every step's loss NaN.
    with pytest.raises(ValueError, match=r"^loss\.mfl_weight: expected .*number"):
        losses.parse_mfl_weight(value)
    assert losses.parse_mfl_weight(" Auto ") is None
    assert losses.parse_mfl_weight("0") == 0.0 and losses.parse_mfl_weight(130) == 130.0


def test_mfl_select_traced_reads_no_other_subset_for_an_index_outside():
    select = jax.jit(losses.mfl_select)
    values = jnp.array([[10.0, 11.0], [20.0, 21.0]])
    for outside in (2, -1):  # clamped, or wrapped, to subset 1 (20) before
        picked = select(values, jnp.array([outside, 0]))
        assert np.isnan(picked[0]) and picked[1] == 11.0
    assert select(values.astype(jnp.int32), jnp.array([-1, 1])).tolist() == [0, 21]
