"""Label statistics of a training split: the positive-bit ratio and the automatic MFL weight
lambda = 1 / ratio (Cao et al. 2019, eq. 4; the paper's ratio is 0.77 %, lambda ~ 130)."""

from __future__ import annotations

import math

import numpy as np

from focalnet_jax import encoding as enc


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


def _check_labels(labels, encoding, valid, grade_known, chunk_size, rows) -> bool:
    """Validates the arguments of :func:`positive_bit_ratio`; True for a class map."""
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
    if rows is not None and (np.ndim(rows) != 1 or not np.issubdtype(rows.dtype, np.integer)):
        raise ValueError(f"rows: expected a 1-D integer index, got {rows.dtype} {np.shape(rows)}")
    return is_classes


def positive_bit_ratio(
    labels, *, encoding="ordinal", valid=None, grade_known=None, rows=None, chunk_size=64
) -> float:
    """Fraction of 1-bits among all known target bits (paper: 0.77 % of ordinal bits).

    Reads ``labels`` in chunks of ``chunk_size`` along axis 0, so a memory-mapped training set
    (e.g. ``[N, 128, 128]`` uint8) is never expanded to float bits, nor its ``rows`` copied, at
    once.

    Args:
      labels: either an integer class map ``[N, ...]`` (values 0..5, encoded with ``encoding``;
        ``grade_known`` marks grade-unknown lesions), or floating 0/1 target bits ``[N, ..., K]``
        (with an optional ``valid`` mask of the same shape).
      encoding: encoding of a class map (:data:`focalnet_jax.encoding.ENCODINGS`).
      valid: 0/1 mask for target bits; bits with 0 are not counted.
      grade_known: for a class map, ``[N, ...]``, 0 where a lesion's grade is unknown.
      rows: optional 1-D integer index of the slices (along axis 0) to count, e.g. a fold's
        training rows; all slices when None.
      chunk_size: slices per chunk.

    Returns:
      the ratio as a Python float.

    >>> positive_bit_ratio(np.array([[0, 2]]))  # class 2: 2 of its 5 ordinal bits are 1
    0.2
    """
    labels = labels if hasattr(labels, "dtype") else np.asarray(labels)
    rows = None if rows is None else np.asarray(rows)
    is_classes = _check_labels(labels, encoding, valid, grade_known, chunk_size, rows)
    ones = total = 0
    count = labels.shape[0] if rows is None else len(rows)
    for start in range(0, count, chunk_size):
        part = slice(start, start + chunk_size)
        part = part if rows is None else rows[part]
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

    >>> mfl_weight(np.array([[0, 2]]))
    5.0
    """
    ratio = positive_bit_ratio(labels, **kwargs)
    if ratio == 0:
        raise ValueError(
            "labels: no positive target bits, so lambda = 1 / ratio is undefined; "
            "set loss.mfl_weight to a number"
        )
    return 1.0 / ratio


def parse_mfl_weight(value) -> float | None:
    """``loss.mfl_weight`` read once: None for ``'auto'`` (lambda from the training split by
    :func:`mfl_weight`), else the number given.

    >>> parse_mfl_weight("auto"), parse_mfl_weight("130.5")
    (None, 130.5)
    """
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    try:
        if isinstance(value, bool):
            raise TypeError
        weight = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"loss.mfl_weight: expected 'auto' or a number, got {value!r}") from None
    if not (math.isfinite(weight) and weight >= 0):  # a negative lambda would ascend MFL
        raise ValueError(f"loss.mfl_weight: expected a finite number >= 0, got {value!r}")
    return weight
