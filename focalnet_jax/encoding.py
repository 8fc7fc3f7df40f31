"""Label encodings of the six FocalNet classes (Cao et al. 2019, section II-C1 and Table I).

Classes: 0 non-lesion, 1 GS 3+3, 2 GS 3+4, 3 GS 4+3, 4 GS 8, 5 GS >= 9 (= ISUP grade groups 1..5).
Three encodings of a class map ``[...]`` into target bits ``[..., K]``:

- ``'ordinal'`` (K = 5, FocalNet): bit k (1-based) is ``class >= k``, so class k has k leading ones.
- ``'onehot'`` (K = 6, softmax baselines): bit k (0-based) is ``class == k``.
- ``'binary'`` (K = 1, U-Net-Sing): the lesion bit, ``class >= 1`` (= ordinal bit 1).

Every function accepts NumPy or JAX arrays and returns the same kind: NumPy in, NumPy out (for the
data pipeline); a ``jax.Array`` (also a tracer under ``jit``) in, ``jax.Array`` out. Value checks
(classes in 0..5, probabilities in [0, 1]) run only on concrete inputs; under tracing they are
skipped, because the values are unknown then.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special

NUM_CLASSES = 6
"""Number of classes: non-lesion and five Gleason groups."""

ENCODINGS = ("ordinal", "onehot", "binary")
"""Names accepted by :func:`encode`, :func:`num_outputs` and :func:`scores_from_outputs`."""

_NUM_OUTPUTS = {"ordinal": NUM_CLASSES - 1, "onehot": NUM_CLASSES, "binary": 1}
# Ordinal bits 3..5 (0-based 2..4) carry the grade beyond "clinically significant".
_GRADE_BITS_START = 2


def _xp(x):
    """The array module matching ``x``: jax.numpy for jax arrays and tracers, else NumPy."""
    return jnp if isinstance(x, jax.Array) else np


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_encoding(encoding) -> str:
    if encoding not in _NUM_OUTPUTS:
        raise ValueError(f"encoding: expected one of {ENCODINGS}, got {encoding!r}")
    return encoding


def _check_num_classes(num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer):
        raise TypeError(f"num_classes: expected an int >= 2, got {num_classes!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes: expected an int >= 2, got {num_classes}")
    return int(num_classes)


def _as_classes(classes, num_classes: int, name: str = "classes"):
    """Validates an integer class map and returns it as an array (NumPy or JAX)."""
    xp = _xp(classes)
    classes = xp.asarray(classes)
    if not (xp.issubdtype(classes.dtype, xp.integer) or classes.dtype == xp.bool_):
        raise TypeError(f"{name}: expected an integer class map, got dtype {classes.dtype}")
    if _is_concrete(classes) and classes.size:
        # On a host copy: a concrete JAX array's own min() is staged inside a jit trace (one
        # closed over by the traced function), and int() of the tracer fails.
        values = np.asarray(classes)
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"{name}: expected classes in 0..{num_classes - 1}, got values in {low}..{high}"
            )
    return classes


def _as_probs(probs, name: str, *, check_range: bool = True):
    """Validates real-valued network outputs (probabilities when ``check_range``)."""
    xp = _xp(probs)
    probs = xp.asarray(probs)
    if not (xp.issubdtype(probs.dtype, xp.floating) or probs.dtype == xp.bool_):
        raise TypeError(f"{name}: expected a floating array, got dtype {probs.dtype}")
    if probs.ndim < 1:
        raise ValueError(f"{name}: expected shape [..., K], got a scalar")
    if check_range and _is_concrete(probs) and probs.size:
        values = np.asarray(probs)  # a host copy, as in `_as_classes`
        low, high = float(values.min()), float(values.max())
        if not (0.0 <= low and high <= 1.0):
            raise ValueError(
                f"{name}: expected probabilities in [0, 1], got values in [{low}, {high}]"
            )
    return probs


def ordinal_encode(classes, num_classes: int = NUM_CLASSES):
    """Ordinal encoding (Table I): bit k (1-based) is ``classes >= k``.

    Args:
      classes: integer class map ``[...]`` with values in ``0..num_classes-1``.
      num_classes: number of classes (6).

    Returns:
      float32 ``[..., num_classes - 1]``; class k has k leading ones (3 -> 1,1,1,0,0).
    """
    num_classes = _check_num_classes(num_classes)
    xp = _xp(classes)
    classes = _as_classes(classes, num_classes)
    thresholds = xp.arange(1, num_classes, dtype=xp.int32)
    return (classes[..., None] >= thresholds).astype(xp.float32)


def onehot_encode(classes, num_classes: int = NUM_CLASSES):
    """One-hot encoding (Table I): bit k (0-based) is ``classes == k``.

    Args:
      classes: integer class map ``[...]`` with values in ``0..num_classes-1``.
      num_classes: number of classes (6).

    Returns:
      float32 ``[..., num_classes]``.
    """
    num_classes = _check_num_classes(num_classes)
    xp = _xp(classes)
    classes = _as_classes(classes, num_classes)
    return (classes[..., None] == xp.arange(num_classes, dtype=xp.int32)).astype(xp.float32)


def ordinal_decode(probs, threshold: float = 0.5):
    """Class from ordinal bits: the number of leading bits above ``threshold``.

    .. math:: \\hat c = \\sum_{k=1}^{K} \\prod_{i=1}^{k} [p_i > t]

    (the paper's :math:`\\max_k \\prod_{i \\le k} \\hat y_i \\sum_{i \\le k} \\hat y_i`), so bits
    1,0,1,0,0 decode to class 1.

    Args:
      probs: ordinal probabilities (or 0/1 bits) ``[..., K]``.
      threshold: a bit is on where ``probs > threshold``.

    Returns:
      int32 ``[...]`` with values in ``0..K``.
    """
    xp = _xp(probs)
    probs = xp.asarray(probs)
    real = (xp.floating, xp.integer)
    if probs.dtype != xp.bool_ and not any(xp.issubdtype(probs.dtype, t) for t in real):
        raise TypeError(f"probs: expected a real-valued array, got dtype {probs.dtype}")
    if probs.ndim < 1:
        raise ValueError("probs: expected shape [..., K], got a scalar")
    bits = (probs > threshold).astype(xp.int32)
    return xp.sum(xp.cumprod(bits, axis=-1), axis=-1).astype(xp.int32)


def ordinal_scores(probs):
    """P(class >= k), k = 1..K, from ordinal sigmoid outputs: the identity (as float32).

    Args:
      probs: ordinal probabilities ``[..., K]`` (K = 5), after the sigmoid.

    Returns:
      float32 ``[..., K]``.
    """
    xp = _xp(probs)
    return _as_probs(probs, "probs").astype(xp.float32)


def onehot_scores(probs):
    """P(class >= k), k = 1..K-1, from one-hot softmax outputs: the tail sums.

    .. math:: s_k = \\sum_{j \\ge k} p_j

    Args:
      probs: class probabilities ``[..., K]`` (K = 6), after the softmax.

    Returns:
      float32 ``[..., K - 1]``, in [0, 1].
    """
    xp = _xp(probs)
    probs = _as_probs(probs, "probs").astype(xp.float32)
    if probs.shape[-1] < 2:
        raise ValueError(f"probs: expected at least 2 classes on the last axis, got {probs.shape}")
    # Summed from the highest class down: small tails keep their precision (1 - cumsum would not).
    # Where class 0 is all but impossible the float32 sum rounds above 1: capped at 1.
    tails = xp.cumsum(xp.flip(probs[..., 1:], axis=-1), axis=-1)
    return xp.minimum(xp.flip(tails, axis=-1), 1.0)


def num_outputs(encoding: str) -> int:
    """Number of network outputs K for an encoding: 5 ordinal, 6 one-hot, 1 binary."""
    return _NUM_OUTPUTS[_check_encoding(encoding)]


def encode(classes, encoding: str):
    """Target bits of a class map in ``encoding`` (one of :data:`ENCODINGS`).

    Args:
      classes: integer class map ``[...]`` with values in 0..5.
      encoding: ``'ordinal'``, ``'onehot'`` or ``'binary'`` (lesion bit = ordinal bit 1).

    Returns:
      float32 ``[..., num_outputs(encoding)]``.
    """
    _check_encoding(encoding)
    if encoding == "onehot":
        return onehot_encode(classes)
    bits = ordinal_encode(classes)
    return bits[..., :1] if encoding == "binary" else bits


def target_validity(grade_known, classes, encoding: str):
    """Which target bits are known (grade-unknown lesions, docs/data.md).

    A lesion pixel with ``grade_known == 0`` is known to be clinically significant (class >= 2)
    but not its grade. Its class map value is expected to be 2, the known lower bound, so that the
    known bits are encoded correctly. Invalid bits:

    - ordinal: bits 3-5 (bits 1-2 are known to be 1);
    - onehot: bits 2-5 (bits 0-1 are known to be 0);
    - binary: none (the lesion bit is known).

    Background pixels are always fully valid, whatever ``grade_known`` holds there.

    Args:
      grade_known: bool/integer map ``[...]``, 0 where a lesion's grade is unknown.
      classes: integer class map ``[...]``, same shape.
      encoding: one of :data:`ENCODINGS`.

    Returns:
      float32 ``[..., num_outputs(encoding)]``: 1 where the bit is known, 0 where not.
    """
    _check_encoding(encoding)
    xp = _xp(classes) if isinstance(classes, jax.Array) else _xp(grade_known)
    classes = _as_classes(classes, NUM_CLASSES)
    grade_known = xp.asarray(grade_known)
    if not (xp.issubdtype(grade_known.dtype, xp.integer) or grade_known.dtype == xp.bool_):
        raise TypeError(
            f"grade_known: expected a bool or integer map, got dtype {grade_known.dtype}"
        )
    if grade_known.shape != classes.shape:
        raise ValueError(
            f"grade_known: expected the shape of classes {classes.shape}, got {grade_known.shape}"
        )
    unknown = (grade_known == 0) & (classes >= 1)
    k = num_outputs(encoding)
    start = {"ordinal": _GRADE_BITS_START, "onehot": _GRADE_BITS_START, "binary": k}[encoding]
    grade_bit = xp.arange(k) >= start
    return (~(unknown[..., None] & grade_bit)).astype(xp.float32)


def _sigmoid(xp, x):
    # Overflow-free and exact at +-inf, with the relative precision of small probabilities (a
    # detection's P(class >= k) of 1e-9 is ranked, not rounded to 0 as 0.5 * (1 + tanh(x / 2))
    # would round it below ~6e-8).
    return jax.nn.sigmoid(x) if xp is jnp else scipy.special.expit(x)


def _softmax(xp, x):
    e = xp.exp(x - xp.max(x, axis=-1, keepdims=True))
    return e / xp.sum(e, axis=-1, keepdims=True)


def scores_from_outputs(outputs, encoding: str, *, from_logits: bool):
    """P(class >= k), k = 1..5, from network outputs of any encoding (used by evaluation).

    - ``'ordinal'``: sigmoid of the logits, then :func:`ordinal_scores` (identity).
    - ``'onehot'``: softmax of the logits, then :func:`onehot_scores` (tail sums).
    - ``'binary'``: only k = 1 is predicted; the lesion probability is repeated in all five
      columns, so every grade task ranks detections by lesion probability (the single-output
      baseline's only score).

    Args:
      outputs: logits or probabilities ``[..., num_outputs(encoding)]``.
      encoding: one of :data:`ENCODINGS`.
      from_logits: True when ``outputs`` are logits (the model's raw output), False when they are
        probabilities already (sigmoid for ordinal/binary, softmax for one-hot). Required, so that
        probabilities are never squashed twice.

    Returns:
      float32 ``[..., 5]``.
    """
    _check_encoding(encoding)
    xp = _xp(outputs)
    outputs = _as_probs(outputs, "outputs", check_range=not from_logits).astype(xp.float32)
    k = num_outputs(encoding)
    if outputs.shape[-1] != k:
        raise ValueError(
            f"outputs: expected {k} channels for encoding {encoding!r}, got shape {outputs.shape}"
        )
    if encoding == "onehot":
        return onehot_scores(_softmax(xp, outputs) if from_logits else outputs)
    probs = _sigmoid(xp, outputs) if from_logits else outputs
    if encoding == "binary":
        return xp.repeat(probs, NUM_CLASSES - 1, axis=-1)
    return ordinal_scores(probs)
