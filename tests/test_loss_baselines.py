"""The baseline losses of focalnet_jax.losses (sigmoid and softmax CE, focal, soft Dice and their
sums): golden values frozen from the NumPy reference, hand values at zero logits, the registry, and
softmax CE on a grade-unknown lesion."""

import math

import jax
import numpy as np
import pytest
from loss_reference import LN2, ref_bce, ref_dice, ref_focal, ref_ordinal_focal, ref_softmax_ce

from focalnet_jax import encoding, losses


def _golden_inputs(k):
    """1x2x2xk logits (a fixed ramp) and targets of classes [[0, 1], [3, 5]] (ordinal/one-hot)."""
    logits = (np.arange(4 * k, dtype=np.float32).reshape(1, 2, 2, k) - 2.0 * k) / k
    classes = np.array([[[0, 1], [3, 5]]])
    name = {5: "ordinal", 6: "onehot", 1: "binary"}[k]
    return logits, encoding.encode(classes, name)


# (loss, params, K, expected): expected from the NumPy reference (float64), frozen here.
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
