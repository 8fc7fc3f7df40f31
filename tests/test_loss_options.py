"""Options of the benchmark losses used by the Bosma22 study (CE+FL and CE+Dice weights, soft Dice
per image or over the batch, its smoothing, valid bits and nnU-Net's softmax Dice without the
background channel, focal alpha and gamma) against NumPy references and hand values, their binding
from a config, the rules that a benchmark loss never inherits MFL from a FocalNet config and that
an option the loss does not take is refused rather than ignored."""

from __future__ import annotations

import re

import numpy as np
import pytest
from test_train_helpers import REPO

from focalnet_jax import losses
from focalnet_jax.config_loading import load_config
from focalnet_jax.run import RunSpec

RNG = np.random.default_rng(0)
LOGITS = RNG.normal(size=(3, 4, 5, 6)).astype(np.float32)
ONEHOT = np.eye(6, dtype=np.float32)[RNG.integers(0, 6, (3, 4, 5))]
BITS = (RNG.uniform(size=(3, 4, 5, 6)) < 0.3).astype(np.float32)


def _sigmoid(x):
    return 1 / (1 + np.exp(-x.astype(np.float64)))


def _softmax(x):
    e = np.exp(x.astype(np.float64) - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def dice_reference(probs, targets, eps, batch, background, valid=None):
    """1 - mean Dice; per channel over the batch (batch) or per image and channel, over the
    valid bits only."""
    valid = np.ones_like(targets) if valid is None else valid
    axes = (0, 1, 2) if batch else (1, 2)
    overlap, total = (valid * probs * targets).sum(axes), (valid * (probs + targets)).sum(axes)
    dice = (2 * overlap + eps) / (total + eps)
    return 1 - (dice if background else dice[..., 1:]).mean()


def bce_reference(logits, targets, valid):
    """Mean over pixels of the sum over valid bits of -y log p - (1 - y) log(1 - p)."""
    p = _sigmoid(logits)
    return (valid * (-targets * np.log(p) - (1 - targets) * np.log(1 - p))).sum(-1).mean()


VALID = (RNG.uniform(size=(3, 4, 5, 6)) < 0.8).astype(np.float32)


@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("eps", [1.0, 1e-5])
def test_sigmoid_dice_per_image_or_batch(batch, eps):
    got = losses.soft_dice_loss(LOGITS, BITS, eps=eps, batch_dice=batch)
    expected = dice_reference(_sigmoid(LOGITS), BITS, eps, batch, True)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_softmax_batch_dice_without_background_is_nnunets():
    got = losses.soft_dice_loss(
        LOGITS, ONEHOT, eps=1e-5, activation="softmax", batch_dice=True, dice_background=False
    )
    expected = dice_reference(_softmax(LOGITS), ONEHOT, 1e-5, True, False)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize("batch", [False, True])
def test_dice_sums_only_the_valid_bits(batch):
    """Grade-unknown bits (valid 0) leave both Dice sums; a per-image softmax Dice without the
    background channel is the mean of the per-image Dice of classes 1..5."""
    got = losses.soft_dice_loss(LOGITS, BITS, valid=VALID, eps=1e-5, batch_dice=batch)
    expected = dice_reference(_sigmoid(LOGITS), BITS, 1e-5, batch, True, VALID)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    got = losses.soft_dice_loss(
        LOGITS, ONEHOT, eps=1.0, activation="softmax", batch_dice=batch, dice_background=False
    )
    expected = dice_reference(_softmax(LOGITS), ONEHOT, 1.0, batch, False)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_dice_hand_values_per_image_and_batch():
    """p = 1/2 everywhere (logits 0) on two 1x2 images, one bit: image 0 has y = (1, 0), image 1
    none. Per image (eps 1): Dice 2/3 and 1/2, loss 1 - 7/12. Batch: (2 * 1/2 + 1) / (2 + 1 + 1)
    = 1/2, loss 1/2."""
    logits = np.zeros((2, 1, 2, 1), np.float32)
    targets = np.array([[[[1.0], [0.0]]], [[[0.0], [0.0]]]], np.float32)
    np.testing.assert_allclose(losses.soft_dice_loss(logits, targets), 5 / 12, rtol=1e-6)
    np.testing.assert_allclose(
        losses.soft_dice_loss(logits, targets, batch_dice=True), 1 / 2, rtol=1e-6
    )


@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (2.0, 0.5), (0.0, 1.0), (1.0, 0.0)])
def test_ce_dice_weights_against_numpy(batch, weights):
    got = losses.ce_dice_loss(
        LOGITS, BITS, valid=VALID, eps=1e-5, batch_dice=batch, weights=weights
    )
    dice = dice_reference(_sigmoid(LOGITS), BITS, 1e-5, batch, True, VALID)
    expected = weights[0] * bce_reference(LOGITS, BITS, VALID) + weights[1] * dice
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_ce_dice_at_one_fifth_ce_is_nnunets_sigmoid_ce_and_dice():
    """nnU-Net's sigmoid CE + Dice (`BCEWithLogitsLoss`: a mean over every element, bits too)
    at 1:1 is `weights=(1 / K, 1)` here, whose CE sums the K bits (K = 5 in the bosma22 study)."""
    p, bits = _sigmoid(LOGITS), BITS.shape[-1]
    bce = -(BITS * np.log(p) + (1 - BITS) * np.log(1 - p))
    expected = bce.mean() + dice_reference(p, BITS, 1e-5, True, True)
    got = losses.ce_dice_loss(LOGITS, BITS, eps=1e-5, batch_dice=True, weights=(1 / bits, 1.0))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 3.5])
def test_focal_alpha_gamma_and_valid_against_numpy(alpha, gamma):
    """sum over valid bits of -a_t (1 - p_t)^gamma log p_t, mean over pixels (Lin et al.)."""
    p = _sigmoid(LOGITS)
    p_t = np.where(BITS == 1, p, 1 - p)
    a_t = np.where(BITS == 1, alpha, 1 - alpha)
    expected = (VALID * -a_t * (1 - p_t) ** gamma * np.log(p_t)).sum(-1).mean()
    got = losses.focal_loss(LOGITS, BITS, alpha=alpha, gamma=gamma, valid=VALID)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_background_channel_exists_only_for_softmax():
    with pytest.raises(ValueError, match="only a softmax output has a background channel"):
        losses.soft_dice_loss(LOGITS, BITS, dice_background=False)


@pytest.mark.parametrize(
    ("loss", "option"),
    [
        ("ordinal_focal_loss", {"gamma": np.inf}),  # was accepted: loss 0, NaN gradients
        ("focal_loss", {"gamma": np.inf}),
        ("soft_dice_loss", {"eps": np.inf}),  # was accepted: a NaN loss
        ("ce_focal_loss", {"weights": (np.inf, 1.0)}),  # was accepted: an infinite loss
        ("ce_dice_loss", {"weights": (1.0, np.nan)}),
    ],
)
def test_a_non_finite_option_is_refused(loss, option):
    name = next(iter(option))
    with pytest.raises(ValueError, match=f"^{name}: expected .*finite"):
        getattr(losses, loss)(LOGITS[..., :5], BITS[..., :5], **option)


def test_combined_losses_are_weighted_sums():
    ce = losses.sigmoid_cross_entropy(LOGITS, BITS)
    fl = losses.focal_loss(LOGITS, BITS)
    dice = losses.soft_dice_loss(LOGITS, BITS, eps=1e-5, batch_dice=True)
    np.testing.assert_allclose(
        losses.ce_focal_loss(LOGITS, BITS, weights=(0.5, 0.5)), 0.5 * ce + 0.5 * fl, rtol=1e-6
    )
    np.testing.assert_allclose(losses.ce_focal_loss(LOGITS, BITS), ce + fl, rtol=1e-6)
    got = losses.ce_dice_loss(LOGITS, BITS, eps=1e-5, batch_dice=True, weights=(2.0, 1.0))
    np.testing.assert_allclose(got, 2 * ce + dice, rtol=1e-6)
    with pytest.raises(ValueError, match="weights"):
        losses.ce_focal_loss(LOGITS, BITS, weights=(1.0,))


def test_config_options_reach_the_loss():
    config = load_config(
        str(REPO / "configs" / "focalnet.py"),
        [
            "--config.loss.name=ce_dice",
            "--config.loss.mfl=false",
            "--config.loss.eps=1e-5",
            "--config.loss.batch_dice=true",
        ],
    )
    spec = RunSpec.from_config(config, num_devices=1)
    encoding, fn = spec.output_encoding, spec.loss.fn
    expected = losses.sigmoid_cross_entropy(LOGITS[..., :5], BITS[..., :5])
    expected += losses.soft_dice_loss(LOGITS[..., :5], BITS[..., :5], eps=1e-5, batch_dice=True)
    assert encoding == "ordinal"
    np.testing.assert_allclose(fn(LOGITS[..., :5], BITS[..., :5]), expected, rtol=1e-6)


def test_the_focal_weight_pool_size_is_a_config_option():
    """The paper's 3 x 3 max filter over q (eq. 2) can be set (an ablation, 1 = none) like alpha
    and gamma; a size the loss refuses is an error naming the key, and a loss without the filter
    refuses it."""
    focalnet = str(REPO / "configs" / "focalnet.py")
    logits, bits = LOGITS[..., :5], BITS[..., :5]
    default = RunSpec.from_config(load_config(focalnet), num_devices=1).loss.fn(logits, bits)
    np.testing.assert_allclose(default, losses.ordinal_focal_loss(logits, bits), rtol=1e-6)
    config = load_config(focalnet, ["--config.loss.pool_size=1"])
    unpooled = RunSpec.from_config(config, num_devices=1).loss.fn(logits, bits)
    expected = losses.ordinal_focal_loss(logits, bits, pool_size=1)
    np.testing.assert_allclose(unpooled, expected, rtol=1e-6)
    assert float(unpooled) < float(default)  # pooling only raises each pixel's weight
    with pytest.raises(ValueError, match=r"^loss\.pool_size: expected a positive odd int"):
        RunSpec.from_config(load_config(focalnet, ["--config.loss.pool_size=2"]), num_devices=1)
    argv = ["--config.loss.name=sigmoid_ce", "--config.loss.mfl=false", "--config.loss.pool_size=5"]
    with pytest.raises(ValueError, match=r"^loss\.pool_size=5: loss 'sigmoid_ce' does not take"):
        load_config(focalnet, argv)


def test_benchmark_loss_does_not_inherit_mfl():
    focalnet = str(REPO / "configs" / "focalnet.py")
    with pytest.raises(ValueError, match="loss.mfl=True with loss.name='ce_focal'"):
        load_config(focalnet, ["--config.loss.name=ce_focal"])
    assert not load_config(
        focalnet, ["--config.loss.name=ce_focal", "--config.loss.mfl=false"]
    ).loss.mfl
    asked = load_config(
        focalnet, ["--config.loss.name=ce_focal", "--config.loss.mfl_any_loss=true"]
    )
    assert asked.loss.mfl and asked.loss.name == "ce_focal"
    assert load_config(focalnet).loss.mfl  # FocalNet itself keeps FL + MFL


@pytest.mark.parametrize(
    ("overrides", "refused"),
    [
        (["--config.loss.name=sigmoid_ce", "--config.loss.alpha=0.25"], "loss.alpha=0.25"),
        (["--config.loss.name=focal", "--config.loss.eps=1e-05"], "loss.eps=1e-05"),
        (["--config.loss.name=focal", "--config.loss.weights=(0.5,0.5)"], "loss.weights"),
        (["--config.loss.name=ce_focal", "--config.loss.batch_dice=true"], "loss.batch_dice"),
        (["--config.loss.name=ce_dice", "--config.loss.eps=1e-05"], None),
        (["--config.loss.name=focal", "--config.loss.alpha=0.25", "--config.loss.eps=1.0"], None),
    ],
)
def test_a_loss_option_the_loss_does_not_take_is_refused(overrides, refused):
    """An arm `{'name': 'sigmoid_ce', 'alpha': 0.25}` trained plain CE, the same recipe as the CE
    arm, without a word; options at their defaults (every config sets them all) stay allowed."""
    focalnet = str(REPO / "configs" / "focalnet.py")
    argv = ["--config.loss.mfl=false", *overrides]
    if refused is None:
        load_config(focalnet, argv)
        return
    with pytest.raises(ValueError, match=rf"^{re.escape(refused)}.*does not take"):
        load_config(focalnet, argv)
