"""FocalNet losses (Cao et al. 2019, section II-C) and the baseline losses, as pure functions.

Conventions shared by every loss here:

- ``logits`` and ``targets`` are ``[B, H, W, K]``; targets are 0/1 bits already encoded with the
  loss's encoding (:mod:`focalnet_jax.encoding`); a loss returns a scalar.
- Per-pixel losses sum over the K channels and average over B, H and W (soft Dice averages over
  images and channels).
- ``valid`` (``[B, H, W, K]``, default all ones) marks the known target bits (grade-unknown
  lesions): invalid bits add nothing to a loss and are left out of the focal weight's max.
- Inputs are checked when the function is called: ``logits`` must be floating, every array must
  have the expected shape, and ``targets``/``valid`` must hold only 0 and 1. The 0/1 check needs
  the values, so it runs on concrete arrays only and is skipped under ``jit``/``grad`` tracing.

The registry :func:`get_loss` selects a loss and its encoding by name (``config.loss.name``).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from focalnet_jax import encoding as enc


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_bits(x, name: str, shape: tuple[int, ...], dtype):
    """Checks a 0/1 array of the given shape (values only where concrete); casts it to dtype."""
    x = jnp.asarray(x) if isinstance(x, jax.Array) else np.asarray(x)
    if x.dtype != np.bool_ and not (
        jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)
    ):
        raise TypeError(f"{name}: expected 0/1 bits (float, int or bool), got dtype {x.dtype}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(x.shape)}")
    if _is_concrete(x):
        values = np.asarray(x)
        bad = values[(values != 0) & (values != 1)]
        if bad.size:
            raise ValueError(f"{name}: expected only 0/1 bits, got values such as {bad[:3]}")
    return jnp.asarray(x, dtype)


def _check_floating(x, name: str, ndim: int, layout: str):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name}: expected a floating array, got dtype {x.dtype}")
    if x.ndim != ndim:
        raise ValueError(f"{name}: expected shape {layout}, got {x.shape}")
    return x


def _check_inputs(logits, targets, valid):
    """Validated (logits, targets, valid) with targets and valid in the dtype of logits."""
    logits = _check_floating(logits, "logits", 4, "[B, H, W, K]")
    targets = _check_bits(targets, "targets", logits.shape, logits.dtype)
    if valid is None:
        return logits, targets, jnp.ones_like(targets)
    return logits, targets, _check_bits(valid, "valid", logits.shape, logits.dtype)


def _check_scalar(value, name: str, low: float, high: float | None = None):
    """Range check for Python hyperparameters (traced values pass through unchecked)."""
    if isinstance(value, int | float) and not (value >= low and (high is None or value <= high)):
        interval = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name}: expected a value in {interval}, got {value}")


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

    References:
      Cao et al., "Joint Prostate Cancer Detection and Gleason Score Prediction in mp-MRI via
      FocalNet", IEEE TMI 2019, eqs. (1)-(2); Lin et al., "Focal Loss for Dense Object
      Detection", ICCV 2017.
    """
    logits, targets, valid = _check_inputs(logits, targets, valid)
    _check_scalar(alpha, "alpha", 0.0, 1.0)
    _check_scalar(gamma, "gamma", 0.0)
    if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size % 2 != 1:
        raise ValueError(f"pool_size: expected a positive odd int, got {pool_size!r}")
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
    """FocalNet's focal loss (eqs. 1-2) averaged over B, H, W (channel sum kept).

    .. math:: L = \\frac{1}{BHW} \\sum_{b,h,w} FL_{bhw}

    Args and shapes as :func:`ordinal_focal_loss_map`.

    Returns:
      scalar.
    """
    per_pixel = ordinal_focal_loss_map(
        logits, targets, alpha=alpha, gamma=gamma, pool_size=pool_size, valid=valid
    )
    return jnp.mean(per_pixel)


def sigmoid_cross_entropy(logits, targets, *, valid=None):
    """Binary cross-entropy per bit (the paper's "CE" ablation on ordinal bits).

    .. math:: L = \\frac{1}{BHW} \\sum_{b,h,w,j} v_j [-y_j \\log p_j - (1 - y_j)\\log(1 - p_j)]

    Args:
      logits, targets, valid: ``[B, H, W, K]`` (targets and valid 0/1).

    Returns:
      scalar.
    """
    logits, targets, valid = _check_inputs(logits, targets, valid)
    bits = 2.0 * _bit_cross_entropy(logits, targets, 0.5)
    return jnp.mean(jnp.sum(valid * bits, axis=-1))


def focal_loss(logits, targets, *, alpha=0.75, gamma=2.0, valid=None):
    """Plain per-bit sigmoid focal loss (Lin et al. 2017): no channel max, no pooling.

    .. math:: L = \\frac{1}{BHW} \\sum_{b,h,w,j} v_j (1 - p_{t,j})^\\gamma
        [-\\alpha y_j \\log p_j - (1 - \\alpha)(1 - y_j) \\log(1 - p_j)]

    with :math:`p_t = p` where y = 1 and :math:`1 - p` where y = 0.

    Args:
      logits, targets, valid: ``[B, H, W, K]`` (targets and valid 0/1).
      alpha: weight of positive bits, in [0, 1]. gamma: focusing exponent, >= 0.

    Returns:
      scalar.

    References:
      Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017.
    """
    logits, targets, valid = _check_inputs(logits, targets, valid)
    _check_scalar(alpha, "alpha", 0.0, 1.0)
    _check_scalar(gamma, "gamma", 0.0)
    weight = jnp.exp(_log_focal_weight(logits, targets, gamma))
    bits = valid * weight * _bit_cross_entropy(logits, targets, alpha)
    return jnp.mean(jnp.sum(bits, axis=-1))


def softmax_cross_entropy(logits, targets, *, valid=None):
    """Softmax cross-entropy on one-hot targets (the DeepLab and U-Net-Mult baselines).

    .. math:: L = \\frac{1}{BHW} \\sum_{b,h,w} \\sum_k -v_k y_k \\log \\operatorname{softmax}(z)_k

    An invalid bit of the true class removes that pixel's term.

    Args:
      logits, targets, valid: ``[B, H, W, K]`` (K = 6; targets one-hot).

    Returns:
      scalar.
    """
    logits, targets, valid = _check_inputs(logits, targets, valid)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return jnp.mean(-jnp.sum(valid * targets * log_probs, axis=-1))


def soft_dice_loss(
    logits,
    targets,
    *,
    valid=None,
    eps=1.0,
    activation="sigmoid",
    batch_dice=False,
    dice_background=True,
):
    """Soft Dice loss: 1 - mean over images and channels of the per-image soft Dice.

    .. math:: L = 1 - \\frac{1}{BK} \\sum_{b,k}
        \\frac{2 \\sum_{h,w} v p y + \\epsilon}{\\sum_{h,w} v (p + y) + \\epsilon}

    The smoothing eps (default 1) makes a channel with no lesion and no predicted lesion score 1
    instead of 0/0, so empty ordinal channels cost nothing once predicted empty. nnU-Net's default
    Dice (Bosma et al. 2022's CE+Dice) is ``batch_dice=True, dice_background=False, eps=1e-5``.

    Args:
      logits, targets, valid: ``[B, H, W, K]``.
      eps: smoothing added to numerator and denominator, > 0.
      activation: ``'sigmoid'`` (independent bits) or ``'softmax'`` (one-hot classes).
      batch_dice: one Dice per channel over the whole batch (sums over B, H, W) instead of one
        per image and channel.
      dice_background: False leaves channel 0 (the background class of a softmax output) out
        of the mean; ordinal and binary bits have no background channel, so it must stay True
        with ``'sigmoid'``.

    Returns:
      scalar in [0, 1].

    References:
      Milletari et al., "V-Net", 3DV 2016; Isensee et al., "nnU-Net", Nature Methods 2021;
      Bosma et al., "Semi-supervised learning with report-guided pseudo labels for deep
      learning-based prostate cancer detection", 2022.
    """
    logits, targets, valid = _check_inputs(logits, targets, valid)
    if activation not in ("sigmoid", "softmax"):
        raise ValueError(f"activation: expected 'sigmoid' or 'softmax', got {activation!r}")
    if not dice_background and activation != "softmax":
        raise ValueError("dice_background=False: only a softmax output has a background channel")
    _check_scalar(eps, "eps", 1e-12)
    probs = jax.nn.sigmoid(logits) if activation == "sigmoid" else jax.nn.softmax(logits, -1)
    axes = (0, 1, 2) if batch_dice else (1, 2)
    overlap = jnp.sum(valid * probs * targets, axis=axes)
    total = jnp.sum(valid * (probs + targets), axis=axes)
    dice = (2.0 * overlap + eps) / (total + eps)
    return 1.0 - jnp.mean(dice if dice_background else dice[..., 1:])


def _check_weights(weights) -> tuple[float, float]:
    weights = tuple(weights)
    if len(weights) != 2 or any(not isinstance(w, int | float) or w < 0 for w in weights):
        raise ValueError(f"weights: expected two non-negative numbers, got {weights!r}")
    return weights


def ce_dice_loss(
    logits,
    targets,
    *,
    valid=None,
    eps=1.0,
    activation="sigmoid",
    batch_dice=False,
    dice_background=True,
    weights=(1.0, 1.0),
):
    """Cross-entropy + soft Dice, weighted ``weights`` = (CE, Dice), 1:1 by default (nnU-Net's
    default, used by Bosma et al. 2022).

    Sigmoid (bitwise) or softmax cross-entropy according to ``activation``, plus
    :func:`soft_dice_loss` with the same activation and Dice options. Shapes as
    :func:`soft_dice_loss`.
    """
    w_ce, w_dice = _check_weights(weights)
    ce = sigmoid_cross_entropy if activation == "sigmoid" else softmax_cross_entropy
    dice = soft_dice_loss(
        logits,
        targets,
        valid=valid,
        eps=eps,
        activation=activation,
        batch_dice=batch_dice,
        dice_background=dice_background,
    )
    return w_ce * ce(logits, targets, valid=valid) + w_dice * dice


def ce_focal_loss(logits, targets, *, alpha=0.75, gamma=2.0, valid=None, weights=(1.0, 1.0)):
    """Sigmoid cross-entropy + plain focal loss, weighted ``weights`` = (CE, FL); Bosma et al.
    2022's CE+FL (as picai_baseline's nnU-Net trainer) is ``weights=(0.5, 0.5)``.

    Shapes as :func:`focal_loss`.
    """
    w_ce, w_focal = _check_weights(weights)
    focal = focal_loss(logits, targets, alpha=alpha, gamma=gamma, valid=valid)
    return w_ce * sigmoid_cross_entropy(logits, targets, valid=valid) + w_focal * focal


class LossSpec(NamedTuple):
    """A loss chosen by name: its output encoding and ``fn(logits, targets, *, valid=None)``."""

    name: str
    encoding: str
    fn: Callable
    hyperparameters: tuple[str, ...] = ()


_CE_DICE_OPTIONS = ("eps", "batch_dice", "dice_background", "weights")
_REGISTRY = {
    spec.name: spec
    for spec in (
        LossSpec("ordinal_focal", "ordinal", ordinal_focal_loss, ("alpha", "gamma", "pool_size")),
        LossSpec("sigmoid_ce", "ordinal", sigmoid_cross_entropy),
        LossSpec("focal", "ordinal", focal_loss, ("alpha", "gamma")),
        LossSpec("softmax_ce", "onehot", softmax_cross_entropy),
        LossSpec("soft_dice", "ordinal", soft_dice_loss, ("eps", "batch_dice", "dice_background")),
        LossSpec("ce_dice", "ordinal", ce_dice_loss, _CE_DICE_OPTIONS),
        LossSpec("ce_focal", "ordinal", ce_focal_loss, ("alpha", "gamma", "weights")),
        LossSpec(
            "softmax_ce_dice",
            "onehot",
            functools.partial(ce_dice_loss, activation="softmax"),
            _CE_DICE_OPTIONS,
        ),
        LossSpec("binary_ce", "binary", sigmoid_cross_entropy),
        LossSpec("binary_focal", "binary", focal_loss, ("alpha", "gamma")),
    )
}
LOSS_NAMES = tuple(_REGISTRY)
"""Names accepted by :func:`get_loss`."""


def get_loss(name: str, **hyperparameters) -> LossSpec:
    """The registered loss ``name``, with hyperparameters bound into ``fn``.

    Args:
      name: one of :data:`LOSS_NAMES`.
      **hyperparameters: values for the names in the spec's ``hyperparameters`` (e.g. ``alpha``,
        ``gamma`` for focal losses); None keeps the loss's default.

    Returns:
      :class:`LossSpec`; ``spec.fn(logits, targets, valid=None)`` returns a scalar.
    """
    if name not in _REGISTRY:
        raise ValueError(f"name: unknown loss {name!r}; expected one of {LOSS_NAMES}")
    spec = _REGISTRY[name]
    given = {key: value for key, value in hyperparameters.items() if value is not None}
    unknown = sorted(set(given) - set(spec.hyperparameters))
    if unknown:
        raise ValueError(
            f"hyperparameters: loss {name!r} does not take {unknown}; "
            f"it takes {list(spec.hyperparameters)}"
        )
    return spec._replace(fn=functools.partial(spec.fn, **given)) if given else spec


MFL_LOSSES = ("ordinal_focal",)
"""Losses that FocalNet combines with MFL (paper eq. 4: FL + lambda MFL). ``loss.mfl`` with any
other loss must be asked for with ``loss.mfl_any_loss``, so a benchmark loss chosen on top of a
FocalNet config never inherits MFL silently."""


def check_mfl(name: str, mfl: bool, mfl_any_loss: bool = False) -> None:
    """Refuses MFL with a loss outside :data:`MFL_LOSSES` unless ``mfl_any_loss`` asks for it."""
    if mfl and name not in MFL_LOSSES and not mfl_any_loss:
        raise ValueError(
            f"loss.mfl=True with loss.name={name!r}: MFL belongs to {list(MFL_LOSSES)}; set "
            "loss.mfl=False for a benchmark loss, or loss.mfl_any_loss=True to add MFL to it"
        )


def component_subsets(components: Sequence[str], subsets=None) -> list[tuple[str, ...]]:
    """Component subsets compared by the mutual finding loss.

    With ``subsets=None``: every non-empty proper subset of ``components``, ordered by size, then
    by component order (``('t2w', 'adc', 'hbv')`` -> t2w, adc, hbv, t2w+adc, t2w+hbv, adc+hbv).
    A given list is validated (non-empty; each subset a non-empty sequence of known, distinct
    component names, not all of them; no subset twice) and returned with each subset's names in
    component order.

    Args:
      components: the model's input components, e.g. ``('t2w', 'adc')``.
      subsets: None or a sequence of sequences of component names.

    Returns:
      list of tuples of component names.
    """
    if isinstance(components, str) or not all(isinstance(c, str) for c in components):
        raise TypeError(f"components: expected a sequence of names, got {components!r}")
    components = tuple(components)
    if len(set(components)) != len(components) or len(components) < 2:
        raise ValueError(
            f"components: expected at least 2 distinct names for subsets, got {components}"
        )
    if subsets is None:
        sizes = range(1, len(components))
        return [s for n in sizes for s in itertools.combinations(components, n)]
    if isinstance(subsets, str) or len(subsets) == 0:
        raise ValueError(f"subsets: expected a non-empty list of subsets, got {subsets!r}")
    result = []
    for i, subset in enumerate(subsets):
        if isinstance(subset, str):
            raise TypeError(
                f"subsets[{i}]: expected a sequence of names, got the string {subset!r}"
            )
        names = tuple(subset)
        unknown = [n for n in names if n not in components]
        if unknown:
            raise ValueError(f"subsets[{i}]: unknown component(s) {unknown}; known: {components}")
        if not names or len(set(names)) != len(names) or len(names) == len(components):
            raise ValueError(
                f"subsets[{i}]: expected a non-empty proper subset of {components} without "
                f"repeated names, got {names}"
            )
        ordered = tuple(c for c in components if c in names)
        if ordered in result:
            raise ValueError(f"subsets[{i}]: {names} is listed twice")
        result.append(ordered)
    return result


def subset_inputs(images, components: Sequence[str], subsets=None):
    """Inputs with only one subset's components kept (the others zeroed), stacked on a new axis.

    Args:
      images: ``[B, H, W, C]`` with channels in ``components`` order.
      components: the C component names.
      subsets: as in :func:`component_subsets` (None = every non-empty proper subset).

    Returns:
      ``[M, B, H, W, C]`` for M subsets, so the model runs over them with one ``jax.vmap``.
    """
    images = _check_floating(images, "images", 4, "[B, H, W, C]")
    subsets = component_subsets(components, subsets)
    if images.shape[-1] != len(components):
        raise ValueError(
            f"images: expected {len(components)} channels for components {tuple(components)}, "
            f"got shape {images.shape}"
        )
    mask = np.array([[c in s for c in components] for s in subsets], dtype=images.dtype)
    return images[None] * mask[:, None, None, None, :]


def mutual_finding_loss(full_probs, subset_probs, targets, *, valid=None):
    """Mutual finding loss, eq. (3) of Cao et al. 2019, with the per-slice chosen subset.

    .. math::

        d_{i,b} = \\lVert y_b \\odot v_b \\odot (\\mathrm{sg}(f_b) - f^{(i)}_b) \\rVert_2^2, \\qquad
        MFL = \\frac{1}{B\\,HW} \\sum_b \\min_i d_{i,b}

    with sg = stop_gradient: the full output is a reference, trained by the focal loss only. The
    gradient reaches only the chosen subset's output (the first one on ties), exactly as when only
    that subset is recomputed (the ``select`` MFL mode, see :func:`mfl_select`). A slice without
    positive bits has d = 0 for every subset: it adds 0 and reports subset 0.

    Args:
      full_probs: ``[B, H, W, K]`` probabilities with all components.
      subset_probs: ``[M, B, H, W, K]`` probabilities with only subset i's components.
      targets: ``[B, H, W, K]`` ordinal bits; only positive bits are compared.
      valid: optional ``[B, H, W, K]`` 0/1 mask of known bits.

    Returns:
      ``(loss, chosen)``: scalar and int32 ``[B]``, the argmin subset of each slice.

    References:
      Cao et al., IEEE TMI 2019, section II-C3, eq. (3).
    """
    full_probs = _check_floating(full_probs, "full_probs", 4, "[B, H, W, K]")
    subset_probs = _check_floating(subset_probs, "subset_probs", 5, "[M, B, H, W, K]")
    if subset_probs.shape[1:] != full_probs.shape or subset_probs.shape[0] < 1:
        raise ValueError(
            f"subset_probs: expected shape [M >= 1, *{full_probs.shape}], got {subset_probs.shape}"
        )
    for name, probs in (("full_probs", full_probs), ("subset_probs", subset_probs)):
        values = np.asarray(probs) if _is_concrete(probs) else np.zeros(0)
        if not np.all((values >= 0) & (values <= 1)):
            raise ValueError(f"{name}: expected probabilities in [0, 1] (after the sigmoid)")
    mask = _check_bits(targets, "targets", full_probs.shape, full_probs.dtype)
    if valid is not None:
        mask = mask * _check_bits(valid, "valid", full_probs.shape, full_probs.dtype)
    reference = lax.stop_gradient(full_probs)

    def distance(probs):  # one subset's [B, H, W, K] -> [B]
        return jnp.sum(jnp.square(mask * (reference - probs)), axis=(1, 2, 3))

    distances = jax.vmap(distance)(subset_probs)  # [M, B]
    chosen = jnp.argmin(distances, axis=0).astype(jnp.int32)
    best = jnp.take_along_axis(distances, chosen[None], axis=0)[0]
    height, width = full_probs.shape[1:3]
    return jnp.mean(best) / (height * width), chosen


def mfl_select(values, chosen):
    """Each slice's entry for its chosen subset: ``values[chosen[b], b]``.

    In ``select`` mode, gather the chosen subset inputs ``[M, B, H, W, C] -> [B, H, W, C]``, run
    the model on them with gradients, and call ``mutual_finding_loss(full, out[None], targets)``:
    with one subset it returns the same loss as the all-subset call.

    Args:
      values: ``[M, B, ...]``.
      chosen: integer ``[B]`` in 0..M-1.

    Returns:
      ``[B, ...]``.
    """
    values = jnp.asarray(values)
    chosen = jnp.asarray(chosen)
    if not jnp.issubdtype(chosen.dtype, jnp.integer) or chosen.shape != values.shape[1:2]:
        raise ValueError(
            f"chosen: expected int shape ({values.shape[1]},), got {chosen.dtype} {chosen.shape}"
        )
    return values[chosen, jnp.arange(values.shape[1])]


def _bit_counts_from_classes(classes, grade_known, encoding: str) -> tuple[int, int]:
    """(positive valid bits, valid bits) of a class-map chunk, by per-class bit tables."""
    values = np.arange(enc.NUM_CLASSES)
    ones = enc.encode(values, encoding)
    known_valid = np.ones_like(ones)
    unknown_valid = enc.target_validity(np.zeros_like(values), values, encoding)
    ones_table = np.concatenate([(ones * known_valid).sum(-1), (ones * unknown_valid).sum(-1)])
    valid_table = np.concatenate([known_valid.sum(-1), unknown_valid.sum(-1)])
    index = classes.astype(np.int64)
    if grade_known is not None:
        index = index + enc.NUM_CLASSES * (grade_known == 0)
    counts = np.bincount(index.ravel(), minlength=2 * enc.NUM_CLASSES)
    return int(counts @ ones_table), int(counts @ valid_table)


def positive_bit_ratio(
    labels, *, encoding="ordinal", valid=None, grade_known=None, chunk_size=64
) -> float:
    """Fraction of 1-bits among all known target bits (paper: 0.77 % of ordinal bits).

    Reads ``labels`` in chunks of ``chunk_size`` along axis 0, so a memory-mapped training set
    (e.g. ``[N, 128, 128]`` uint8) is never expanded to float bits at once.

    Args:
      labels: either an integer class map ``[N, ...]`` (values 0..5, encoded with ``encoding``;
        ``grade_known`` marks grade-unknown lesions), or floating 0/1 target bits ``[N, ..., K]``
        (with an optional ``valid`` mask of the same shape).
      encoding: encoding of a class map (:data:`focalnet_jax.encoding.ENCODINGS`).
      valid: 0/1 mask for target bits; bits with 0 are not counted.
      grade_known: for a class map, ``[N, ...]``, 0 where a lesion's grade is unknown.
      chunk_size: slices per chunk.

    Returns:
      the ratio as a Python float.
    """
    labels = labels if hasattr(labels, "dtype") else np.asarray(labels)
    is_classes = np.issubdtype(labels.dtype, np.integer)
    if not (is_classes or np.issubdtype(labels.dtype, np.floating)) or np.ndim(labels) < 1:
        raise TypeError(
            f"labels: expected an integer class map or floating target bits, got {labels.dtype}"
        )
    enc.num_outputs(encoding)  # validates the encoding name
    if (valid is not None and is_classes) or (grade_known is not None and not is_classes):
        raise ValueError("valid goes with target bits, grade_known with a class map (labels)")
    for name, mask in (("valid", valid), ("grade_known", grade_known)):
        if mask is not None and mask.shape != labels.shape:
            raise ValueError(
                f"{name}: expected the shape of labels {labels.shape}, got {mask.shape}"
            )
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}")
    ones = total = 0
    for start in range(0, labels.shape[0], chunk_size):
        part = slice(start, start + chunk_size)
        chunk = np.asarray(labels[part])
        if is_classes:
            if chunk.size and (chunk.min() < 0 or chunk.max() >= enc.NUM_CLASSES):
                raise ValueError(
                    f"labels: expected classes in 0..5, got {chunk.min()}..{chunk.max()}"
                )
            known = None if grade_known is None else np.asarray(grade_known[part])
            chunk_ones, chunk_total = _bit_counts_from_classes(chunk, known, encoding)
        else:
            mask = np.ones_like(chunk) if valid is None else np.asarray(valid[part])
            for name, bits in (("labels", chunk), ("valid", mask)):
                if np.any((bits != 0) & (bits != 1)):
                    raise ValueError(f"{name}: expected only 0/1 bits")
            chunk_ones, chunk_total = int(np.sum((chunk * mask) == 1)), int(np.sum(mask == 1))
        ones, total = ones + chunk_ones, total + chunk_total
    if total == 0:
        raise ValueError("labels: no valid target bits to count")
    return ones / total


def mfl_weight(labels, **kwargs) -> float:
    """The automatic MFL weight lambda = 1 / :func:`positive_bit_ratio` (eq. 4; paper ~130).

    Args:
      labels, kwargs: as :func:`positive_bit_ratio`.

    Returns:
      lambda as a Python float.
    """
    ratio = positive_bit_ratio(labels, **kwargs)
    if ratio == 0:
        raise ValueError(
            "labels: no positive target bits, so lambda = 1 / ratio is undefined; "
            "set loss.mfl_weight to a number"
        )
    return 1.0 / ratio
