"""FocalNet's ordinal focal loss (Cao et al. 2019, section II-C) and the baseline pixel losses.

Each loss comes as a map and as the contract scalar built from it:

- ``<loss>_map(logits, targets, *, valid=None, ...)`` returns the per-pixel loss ``[B, H, W]``
  (summed over the K channels) or, for losses containing soft Dice, the per-image loss ``[B]``;
- ``<loss>(...)`` returns ``reductions.mean`` of that map (the mean over B, H, W), except the
  batch Dice (``batch_dice=True``), whose scalar is one Dice over the whole batch.

``logits`` and ``targets`` are ``[B, H, W, K]``; targets are 0/1 bits already encoded with the
loss's encoding (:mod:`focalnet_jax.encoding`). ``valid`` (``[B, H, W, K]``, default all ones)
marks the known target bits (grade-unknown lesions): invalid bits add no term of their own to a
loss and are left out of the focal weight's max (softmax CE of a grade-unknown pixel is
-log P(class >= 2), which the logits of its invalid bits enter: `softmax_cross_entropy_map`).
Inputs are checked as in :mod:`focalnet_jax.losses.checks`.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from focalnet_jax.losses import reductions
from focalnet_jax.losses.checks import check_inputs, check_scalar, concrete_real


def _log_focal_weight(logits, targets, gamma):
    """log of the per-bit margin y (1 - p)^gamma + (1 - y) p^gamma, exact for 0/1 targets.

    In log space (gamma * log-sigmoid) so that gamma < 1 keeps finite gradients at p -> 0 or 1.
    """
    return gamma * (
        targets * jax.nn.log_sigmoid(-logits) + (1 - targets) * jax.nn.log_sigmoid(logits)
    )


def _bit_cross_entropy(logits, targets, alpha):
    """-alpha y log p - (1 - alpha)(1 - y) log(1 - p) per bit, from logits (log-sigmoid)."""
    return -(
        alpha * targets * jax.nn.log_sigmoid(logits)
        + (1 - alpha) * (1 - targets) * jax.nn.log_sigmoid(-logits)
    )


def ordinal_focal_loss_map(logits, targets, *, alpha=0.75, gamma=2.0, pool_size=3, valid=None):
    """Per-pixel focal loss for ordinal encoding, eqs. (1)-(2) of Cao et al. 2019.

    .. math::

        q = \\operatorname{maxpool}_{s \\times s}\\Big(\\max_j\\, y_j (1 - p_j)^\\gamma
            + (1 - y_j)\\, p_j^\\gamma\\Big), \\qquad
        FL = q \\sum_j -\\alpha y_j \\log p_j - (1 - \\alpha)(1 - y_j) \\log(1 - p_j)

    with p = sigmoid(logits). The max over channels skips invalid bits; the s x s spatial max
    filter (stride 1, SAME padding, padding never wins the max) keeps the weights of pixels on
    either side of a lesion boundary consistent. Gradients flow through q.

    Args:
      logits: ``[B, H, W, K]`` floating.
      targets: ``[B, H, W, K]`` ordinal bits (0/1).
      alpha: weight of the positive terms, in [0, 1] (0.75: false negatives cost more).
      gamma: focusing exponent, >= 0.
      pool_size: side s of the max filter over q, a positive odd int (1 = no pooling).
      valid: optional ``[B, H, W, K]`` 0/1 mask of known bits.

    Returns:
      ``[B, H, W]`` per-pixel loss.

    Example (p = 0.5 everywhere, no lesion: q = 0.5**2, each bit costs 0.25 log 2):

    >>> loss = ordinal_focal_loss_map(jnp.zeros((1, 2, 2, 5)), jnp.zeros((1, 2, 2, 5)))
    >>> loss.shape, round(float(loss[0, 0, 0]), 4)  # 0.25 * 5 * 0.25 * log 2
    ((1, 2, 2), 0.2166)

    References:
      Cao et al., "Joint Prostate Cancer Detection and Gleason Score Prediction in mp-MRI via
      FocalNet", IEEE TMI 2019, eqs. (1)-(2); Lin et al., "Focal Loss for Dense Object
      Detection", ICCV 2017.
    """
    logits, targets, valid = check_inputs(logits, targets, valid)
    check_scalar(alpha, "alpha", 0.0, 1.0)
    check_scalar(gamma, "gamma", 0.0)
    odd = isinstance(pool_size, numbers.Integral) and not isinstance(pool_size, bool | np.bool_)
    if not odd or pool_size < 1 or pool_size % 2 != 1:  # -1 % 2 == 1 in Python
        raise ValueError(f"pool_size: expected a positive odd int, got {pool_size!r}")
    pool_size = int(pool_size)
    neg_inf = np.array(-np.inf, logits.dtype)  # concrete: lax.reduce_window picks its max rule
    log_margin = jnp.where(valid > 0, _log_focal_weight(logits, targets, gamma), neg_inf)
    log_q = jnp.max(log_margin, axis=-1)
    if pool_size > 1:
        # exp is monotone, so pooling log q equals pooling q; -inf init = padding never wins.
        window = (1, pool_size, pool_size)
        log_q = lax.reduce_window(log_q, neg_inf, lax.max, window, (1, 1, 1), "SAME")
    bits = valid * _bit_cross_entropy(logits, targets, alpha)
    return jnp.exp(log_q) * jnp.sum(bits, axis=-1)


def ordinal_focal_loss(logits, targets, *, alpha=0.75, gamma=2.0, pool_size=3, valid=None):
    """FocalNet's focal loss (eqs. 1-2) averaged over B, H, W (channel sum kept): **contract**.

    .. math:: L = \\frac{1}{BHW} \\sum_{b,h,w} FL_{bhw}

    Args and shapes as :func:`ordinal_focal_loss_map`.

    Returns:
      scalar: ``reductions.mean(ordinal_focal_loss_map(...))``.
    """
    per_pixel = ordinal_focal_loss_map(
        logits, targets, alpha=alpha, gamma=gamma, pool_size=pool_size, valid=valid
    )
    return reductions.mean(per_pixel)


def sigmoid_cross_entropy_map(logits, targets, *, valid=None):
    """Per-pixel binary cross-entropy summed over bits (the paper's "CE" ablation on ordinal bits).

    .. math:: CE_{bhw} = \\sum_j v_j [-y_j \\log p_j - (1 - y_j)\\log(1 - p_j)]

    Args:
      logits, targets, valid: ``[B, H, W, K]`` (targets and valid 0/1).

    Returns:
      ``[B, H, W]``.

    >>> ones = jnp.ones((1, 1, 1, 5))  # p = 0.5 on 5 positive bits: 5 log 2
    >>> round(float(sigmoid_cross_entropy_map(0 * ones, ones)[0, 0, 0]), 4)
    3.4657
    """
    logits, targets, valid = check_inputs(logits, targets, valid)
    bits = 2.0 * _bit_cross_entropy(logits, targets, 0.5)
    return jnp.sum(valid * bits, axis=-1)


def sigmoid_cross_entropy(logits, targets, *, valid=None):
    """Mean over B, H, W of :func:`sigmoid_cross_entropy_map`: **contract**; a scalar."""
    return reductions.mean(sigmoid_cross_entropy_map(logits, targets, valid=valid))


def focal_loss_map(logits, targets, *, alpha=0.75, gamma=2.0, valid=None):
    """Per-pixel plain sigmoid focal loss (Lin et al. 2017), summed over bits: no channel max, no
    pooling.

    .. math:: FL_{bhw} = \\sum_j v_j (1 - p_{t,j})^\\gamma
        [-\\alpha y_j \\log p_j - (1 - \\alpha)(1 - y_j) \\log(1 - p_j)]

    with :math:`p_t = p` where y = 1 and :math:`1 - p` where y = 0.

    Args:
      logits, targets, valid: ``[B, H, W, K]`` (targets and valid 0/1).
      alpha: weight of positive bits, in [0, 1]. gamma: focusing exponent, >= 0.

    Returns:
      ``[B, H, W]``.

    >>> ones = jnp.ones((1, 1, 1, 1))  # p = 0.5, y = 1: 0.5**2 * 0.75 * log 2
    >>> round(float(focal_loss_map(0 * ones, ones)[0, 0, 0]), 4)
    0.13

    References:
      Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017.
    """
    logits, targets, valid = check_inputs(logits, targets, valid)
    check_scalar(alpha, "alpha", 0.0, 1.0)
    check_scalar(gamma, "gamma", 0.0)
    weight = jnp.exp(_log_focal_weight(logits, targets, gamma))
    bits = valid * weight * _bit_cross_entropy(logits, targets, alpha)
    return jnp.sum(bits, axis=-1)


def focal_loss(logits, targets, *, alpha=0.75, gamma=2.0, valid=None):
    """Mean over B, H, W of :func:`focal_loss_map`: **contract**; a scalar."""
    return reductions.mean(focal_loss_map(logits, targets, alpha=alpha, gamma=gamma, valid=valid))


def softmax_cross_entropy_map(logits, targets, *, valid=None):
    """Per-pixel softmax cross-entropy on one-hot targets (DeepLab and U-Net-Mult baselines).

    .. math:: CE_{bhw} = -\\log \\sum_k w_k \\operatorname{softmax}(z)_k, \\qquad
        w_k = v_k y_k + (1 - v_k)\\,[\\text{no valid bit is } 1]

    the negative log-probability of the classes the pixel may have: with every bit valid, its
    class (the usual :math:`-\\log p_y`); where its class bit is unknown (a grade-unknown lesion,
    bits 2-5 invalid), the classes of the invalid bits, :math:`-\\log P(\\text{class} \\ge 2)`, the
    one-hot counterpart of the ordinal bits 1-2 it trains. A pixel with no bit known costs 0.

    Args:
      logits, targets, valid: ``[B, H, W, K]`` (K = 6; targets one-hot).

    Returns:
      ``[B, H, W]``.

    >>> targets = jnp.eye(6)[None, None, :1]  # class 0, uniform softmax: log 6
    >>> round(float(softmax_cross_entropy_map(jnp.zeros((1, 1, 1, 6)), targets)[0, 0, 0]), 4)
    1.7918
    >>> valid = jnp.array([[[[1.0, 1, 0, 0, 0, 0]]]])  # grade unknown: -log(4 / 6)
    >>> round(float(softmax_cross_entropy_map(jnp.zeros((1, 1, 1, 6)), jnp.roll(targets, 2, -1),
    ...                                       valid=valid)[0, 0, 0]), 4)
    0.4055
    """
    logits, targets, valid = check_inputs(logits, targets, valid)
    class_known = jnp.max(valid * targets, axis=-1, keepdims=True)
    possible = valid * targets + (1 - valid) * (1 - class_known)  # [B, H, W, K] 0/1
    anything_known = jnp.max(possible, axis=-1)
    # No possible class (all bits valid and 0: not one-hot) costs 0; the logsumexp gets every
    # class there, so it always has a finite term (no -inf, no NaN gradient).
    possible = jnp.where(anything_known[..., None] > 0, possible, 1)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    neg_inf = np.array(-np.inf, logits.dtype)
    log_possible = jax.nn.logsumexp(jnp.where(possible > 0, log_probs, neg_inf), axis=-1)
    return -anything_known * log_possible


def softmax_cross_entropy(logits, targets, *, valid=None):
    """Mean over B, H, W of :func:`softmax_cross_entropy_map`: **contract**; a scalar."""
    return reductions.mean(softmax_cross_entropy_map(logits, targets, valid=valid))


def _check_weights(weights) -> tuple[float, float]:
    given = tuple(weights)
    values = tuple(concrete_real(w) for w in given)
    if len(given) != 2 or any(w is None or not (0 <= w < math.inf) for w in values):
        raise ValueError(f"weights: expected two finite non-negative numbers, got {given!r}")
    if not any(values):  # a loss of 0 everywhere: nothing trained, an arm reported as real
        raise ValueError(f"weights: at least one term must weigh more than 0, got {given!r}")
    return values


def _sum_over_devices(local, axis_name):
    """`local` summed over the named mapped axis (`jax.shard_map`), as a per-device value.

    The data-parallel step takes each device's gradient of its own ("varying") loss and averages
    them (`lax.pmean`). The sum is cast to varying so that a loss built on it is one too: the
    cast's transpose sums the devices' cotangents, so the averaged gradient is the global loss's
    (an invariant loss would get 1 / N of it).
    """
    if axis_name is None:
        return local
    return lax.pcast(lax.psum(local, axis_name), axis_name, to="varying")


def dice_sums(
    logits, targets, *, valid=None, activation="sigmoid", dice_background=True, axes=(0, 1, 2)
):
    """The two sums of the soft Dice per channel over `axes`: ``(sum v p y, sum v (p + y))``,
    channel 0 left out unless `dice_background`; ``[K]`` each for the default axes (B, H, W).

    Sums add over batches, so the batch Dice of a whole validation fold is
    :func:`dice_loss_from_sums` of the batches' summed sums (a slice of weight 0 enters through
    ``valid = 0``).
    """
    logits, targets, valid = check_inputs(logits, targets, valid)
    if activation not in ("sigmoid", "softmax"):
        raise ValueError(f"activation: expected 'sigmoid' or 'softmax', got {activation!r}")
    if not dice_background and activation != "softmax":
        raise ValueError("dice_background=False: only a softmax output has a background channel")
    probs = jax.nn.sigmoid(logits) if activation == "sigmoid" else jax.nn.softmax(logits, -1)
    overlap = jnp.sum(valid * probs * targets, axis=axes)
    total = jnp.sum(valid * (probs + targets), axis=axes)
    return (overlap, total) if dice_background else (overlap[..., 1:], total[..., 1:])


def dice_loss_from_sums(overlap, total, eps):
    """``1 - mean_k (2 overlap_k + eps) / (total_k + eps)`` of :func:`dice_sums` ``[..., K]``.

    Computed in the sums' own array library: NumPy sums (validation's, fetched once) stay on
    the host, with no transfer to a device and no compiled op."""
    return 1.0 - ((2.0 * overlap + eps) / (total + eps)).mean(axis=-1)


def _dice(logits, targets, valid, eps, activation, dice_background, axes, axis_name=None):
    """Soft Dice per channel, summed over `axes` (`(1, 2)`: per image `[B, K]`; `(0, 1, 2)`: over
    the batch `[K]`, and over the devices of `axis_name` when given), channel 0 left out unless
    `dice_background`."""
    check_scalar(eps, "eps", 1e-12)
    overlap, total = dice_sums(
        logits, targets, valid=valid, activation=activation, dice_background=dice_background,
        axes=axes,
    )  # fmt: skip
    overlap, total = (_sum_over_devices(x, axis_name) for x in (overlap, total))
    return (2.0 * overlap + eps) / (total + eps)


def soft_dice_loss_map(
    logits, targets, *, valid=None, eps=1.0, activation="sigmoid", batch_dice=False,
    dice_background=True,
):  # fmt: skip
    """Per-image soft Dice loss: 1 - the mean over channels of the image's soft Dice.

    .. math:: D_b = 1 - \\frac{1}{K} \\sum_k
        \\frac{2 \\sum_{h,w} v p y + \\epsilon}{\\sum_{h,w} v (p + y) + \\epsilon}

    The smoothing eps (default 1) makes a channel with no lesion and no predicted lesion score 1
    instead of 0/0, so empty ordinal channels cost nothing once predicted empty. nnU-Net's default
    Dice (Bosma et al. 2022's CE+Dice) is ``batch_dice=True, dice_background=False, eps=1e-5``.

    Args:
      logits, targets, valid: ``[B, H, W, K]``.
      eps: smoothing added to numerator and denominator, > 0.
      activation: ``'sigmoid'`` (independent bits) or ``'softmax'`` (one-hot classes).
      batch_dice: accepted so the registry binds one set of options; a per-image map is each
        image's Dice (the batch Dice of a batch of one). :func:`soft_dice_loss` applies it.
      dice_background: False leaves channel 0 (the background class of a softmax output) out
        of the mean; ordinal and binary bits have no background channel, so it must stay True
        with ``'sigmoid'``.

    Returns:
      ``[B]``, each in [0, 1].

    >>> ones = jnp.ones((1, 1, 1, 1))  # p = 0.5, y = 1: 1 - (2 * 0.5 + 1) / (1.5 + 1)
    >>> round(float(soft_dice_loss_map(0 * ones, ones)[0]), 4)
    0.2

    References:
      Milletari et al., "V-Net", 3DV 2016; Isensee et al., "nnU-Net", Nature Methods 2021;
      Bosma et al., "Semi-supervised learning with report-guided pseudo labels for deep
      learning-based prostate cancer detection", 2022.
    """
    del batch_dice
    dice = _dice(logits, targets, valid, eps, activation, dice_background, axes=(1, 2))
    return 1.0 - jnp.mean(dice, axis=-1)


def soft_dice_loss(
    logits, targets, *, valid=None, eps=1.0, activation="sigmoid", batch_dice=False,
    dice_background=True, axis_name=None,
):  # fmt: skip
    """Mean over images of :func:`soft_dice_loss_map`: **contract**; a scalar in [0, 1].

    With ``batch_dice`` one Dice per channel over the whole batch (sums over B, H, W; nnU-Net's
    batch Dice), which no per-image map reduces to: ``1 - mean_k(batch Dice_k)``. Under
    ``jax.shard_map`` with ``axis_name`` (the data axis) the batch is the global one: the sums
    run over every device's share, each device returns the global loss, and the ``lax.pmean`` of
    the devices' gradients is its gradient (as for every mean loss). Without ``batch_dice``
    ``axis_name`` changes nothing (a mean over images needs no cross-device sum).
    """
    options = dict(valid=valid, eps=eps, activation=activation, dice_background=dice_background)
    if batch_dice:
        dice = _dice(logits, targets, **options, axes=(0, 1, 2), axis_name=axis_name)
        return 1.0 - jnp.mean(dice)
    return reductions.mean(soft_dice_loss_map(logits, targets, **options))


def ce_dice_loss_map(
    logits, targets, *, valid=None, eps=1.0, activation="sigmoid", batch_dice=False,
    dice_background=True, weights=(1.0, 1.0),
):  # fmt: skip
    """Per-image cross-entropy + soft Dice, weighted ``weights`` = (CE, Dice), 1:1 by default.
    nnU-Net's default 1:1 (used by Bosma et al. 2022) holds a CE of one term a pixel: softmax
    here; the sigmoid CE here sums its K bits where nnU-Net's averages them, so its 1:1 on
    sigmoid bits is ``weights=(1 / K, 1)``.

    .. math:: L_b = w_{CE} \\frac{1}{HW} \\sum_{h,w} CE_{bhw} + w_D D_b

    Sigmoid (bitwise) or softmax cross-entropy according to ``activation``, plus
    :func:`soft_dice_loss_map` with the same activation and Dice options. Shapes as
    :func:`soft_dice_loss_map`; returns ``[B]``.

    >>> ones = jnp.ones((1, 1, 1, 1))  # CE log 2 + Dice 0.2
    >>> round(float(ce_dice_loss_map(0 * ones, ones)[0]), 4)
    0.8931
    """
    w_ce, w_dice = _check_weights(weights)
    ce_map = sigmoid_cross_entropy_map if activation == "sigmoid" else softmax_cross_entropy_map
    dice = soft_dice_loss_map(
        logits, targets, valid=valid, eps=eps, activation=activation, batch_dice=batch_dice,
        dice_background=dice_background,
    )  # fmt: skip
    return w_ce * reductions.per_image(ce_map(logits, targets, valid=valid)) + w_dice * dice


def ce_dice_loss(
    logits, targets, *, valid=None, eps=1.0, activation="sigmoid", batch_dice=False,
    dice_background=True, weights=(1.0, 1.0), axis_name=None,
):  # fmt: skip
    """Mean over images of :func:`ce_dice_loss_map` (with ``batch_dice``: the mean CE plus the
    batch Dice loss of :func:`soft_dice_loss`, over the devices of ``axis_name`` when given): a
    scalar."""
    options = dict(valid=valid, eps=eps, activation=activation, dice_background=dice_background)
    if batch_dice:  # the CE's mean and the batch Dice loss, weighted: the logged terms' sum
        terms = ce_dice_terms(
            logits, targets, batch_dice=True, weights=weights, axis_name=axis_name, **options
        )
        return terms["ce"] + terms["dice"]
    return reductions.mean(ce_dice_loss_map(logits, targets, weights=weights, **options))


def ce_dice_terms(
    logits, targets, *, valid=None, eps=1.0, activation="sigmoid", batch_dice=False,
    dice_background=True, weights=(1.0, 1.0), axis_name=None,
):  # fmt: skip
    """The two weighted terms of :func:`ce_dice_loss` (the same arguments), for the training log:
    ``{"ce": w_CE * mean CE, "dice": w_D * Dice loss}``, scalars that sum to it (up to float
    rounding: the mean over images is linear).

    >>> ones = jnp.ones((1, 1, 1, 1))  # CE log 2, Dice 0.2
    >>> {k: round(float(v), 4) for k, v in ce_dice_terms(0 * ones, ones).items()}
    {'ce': 0.6931, 'dice': 0.2}
    """
    w_ce, w_dice = _check_weights(weights)
    ce_map = sigmoid_cross_entropy_map if activation == "sigmoid" else softmax_cross_entropy_map
    dice = soft_dice_loss(
        logits, targets, valid=valid, eps=eps, activation=activation, batch_dice=batch_dice,
        dice_background=dice_background, axis_name=axis_name,
    )  # fmt: skip
    return {
        "ce": w_ce * reductions.mean(ce_map(logits, targets, valid=valid)),
        "dice": w_dice * dice,
    }


def ce_focal_loss_map(logits, targets, *, alpha=0.75, gamma=2.0, valid=None, weights=(1.0, 1.0)):
    """Per-pixel sigmoid cross-entropy + plain focal loss, weighted ``weights`` = (CE, FL);
    Bosma et al. 2022's CE+FL (as picai_baseline's nnU-Net trainer) is ``weights=(0.5, 0.5)``.

    .. math:: L_{bhw} = w_{CE} CE_{bhw} + w_{FL} FL_{bhw}

    Shapes as :func:`focal_loss_map`; returns ``[B, H, W]``.

    >>> ones = jnp.ones((1, 1, 1, 1))  # log 2 + 0.25 * 0.75 * log 2
    >>> round(float(ce_focal_loss_map(0 * ones, ones)[0, 0, 0]), 4)
    0.8231
    """
    w_ce, w_focal = _check_weights(weights)
    focal = focal_loss_map(logits, targets, alpha=alpha, gamma=gamma, valid=valid)
    return w_ce * sigmoid_cross_entropy_map(logits, targets, valid=valid) + w_focal * focal


def ce_focal_loss(logits, targets, *, alpha=0.75, gamma=2.0, valid=None, weights=(1.0, 1.0)):
    """Mean over B, H, W of :func:`ce_focal_loss_map`: a scalar."""
    return reductions.mean(
        ce_focal_loss_map(logits, targets, alpha=alpha, gamma=gamma, valid=valid, weights=weights)
    )


def ce_focal_terms(logits, targets, *, alpha=0.75, gamma=2.0, valid=None, weights=(1.0, 1.0)):
    """The two weighted terms of :func:`ce_focal_loss` (the same arguments), for the training log:
    ``{"ce": w_CE * mean CE, "focal": w_FL * mean FL}``, scalars that sum to it."""
    w_ce, w_focal = _check_weights(weights)
    focal = focal_loss_map(logits, targets, alpha=alpha, gamma=gamma, valid=valid)
    return {
        "ce": w_ce * reductions.mean(sigmoid_cross_entropy_map(logits, targets, valid=valid)),
        "focal": w_focal * reductions.mean(focal),
    }
