"""The mutual finding loss (Cao et al. 2019, eq. 3) and its input plumbing: the component
subsets, the subset inputs, the probabilities MFL compares and the ``select`` mode's gather."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from focalnet_jax import encoding
from focalnet_jax.losses import reductions
from focalnet_jax.losses.checks import check_bits, check_floating, is_concrete

MFL_MODES = ("vmap", "select")
"""``vmap``: every subset forward with gradients (the paper); ``select``: all subsets without
gradients, then each slice's argmin subset recomputed with gradients."""


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


def mfl_encoding(output_encoding: str) -> str:
    """The bits MFL compares for a model with ``output_encoding``: P(class >= k) bits, so a
    one-hot output is compared on ordinal bits (its softmax tail sums).

    >>> mfl_encoding("onehot"), mfl_encoding("ordinal"), mfl_encoding("binary")
    ('ordinal', 'ordinal', 'binary')
    """
    encoding.num_outputs(output_encoding)  # validates the name
    return "ordinal" if output_encoding == "onehot" else output_encoding


def mfl_probs(logits, output_encoding: str):
    """P(class >= k) that MFL compares: sigmoid bits (ordinal/binary), one-hot tail sums.

    Args:
      logits: ``[..., K]`` model outputs of ``output_encoding``.

    Returns:
      ``[..., K']`` probabilities in the bits of :func:`mfl_encoding`.
    """
    if output_encoding == "onehot":
        return encoding.scores_from_outputs(logits, output_encoding, from_logits=True)
    return jax.nn.sigmoid(logits)


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

    >>> component_subsets(("t2w", "adc"))
    [('t2w',), ('adc',)]
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
    if not isinstance(subsets, list | tuple) or len(subsets) == 0:
        raise ValueError(f"subsets: expected a non-empty list of subsets, got {subsets!r}")
    result = []
    for i, subset in enumerate(subsets):
        if not isinstance(subset, list | tuple):  # a string would be read letter by letter
            got = f"the string {subset!r}" if isinstance(subset, str) else repr(subset)
            raise TypeError(f"subsets[{i}]: expected a sequence of names, got {got}")
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


def subset_masks(components: Sequence[str], subsets=None, dtype=np.float32) -> np.ndarray:
    """Which components each subset keeps: ``[M, C]`` 0/1, rows in :func:`component_subsets` order.

    >>> subset_masks(("t2w", "adc", "hbv"), [("adc",), ("t2w", "hbv")]).tolist()
    [[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]]
    """
    subsets = component_subsets(components, subsets)
    return np.array([[c in s for c in components] for s in subsets], dtype=dtype)


def subset_inputs(images, components: Sequence[str], subsets=None):
    """Inputs with only one subset's components kept (the others zeroed), stacked on a new axis.

    Args:
      images: ``[B, H, W, C]`` with channels in ``components`` order.
      components: the C component names.
      subsets: as in :func:`component_subsets` (None = every non-empty proper subset).

    Returns:
      ``[M, B, H, W, C]`` for M subsets. The train step masks the input one chunk of subsets
      at a time (:func:`subset_distances`), so with chunks smaller than M it never builds this.

    >>> subset_inputs(jnp.ones((1, 1, 1, 2)), ("t2w", "adc"))[:, 0, 0, 0].tolist()
    [[1.0, 0.0], [0.0, 1.0]]
    """
    images = check_floating(images, "images", 4, "[B, H, W, C]")
    if images.shape[-1] != len(components):
        raise ValueError(
            f"images: expected {len(components)} channels for components {tuple(components)}, "
            f"got shape {images.shape}"
        )
    mask = subset_masks(components, subsets, images.dtype)
    return images[None] * mask[:, None, None, None, :]


def subset_distances(probs_of, images, masks, full_probs, targets, *, valid=None, chunk=0):
    """MFL's ``d[i, b]`` for every subset, the model run on ``chunk`` subsets at a time.

    Subset i's input is ``images * masks[i]``, built inside the chunk (``[chunk, B, H, W, C]``;
    ``[M, B, H, W, C]`` only when one chunk holds all M); ``probs_of`` maps ``[B, H, W, C]``
    inputs to ``[B, H, W, K]`` probabilities and is ``jax.vmap``-ped over the subsets of a
    chunk; the chunks run one after another
    (``lax.map(..., batch_size=chunk)``), so the live activations are those of ``chunk``
    subsets, whatever M is. Under ``jax.grad`` wrap ``probs_of`` in ``jax.checkpoint`` to keep
    that bound for the backward pass too (otherwise every chunk's activations are saved).

    Args:
      probs_of: ``[B, H, W, C] -> [B, H, W, K]``.
      images: ``[B, H, W, C]``.
      masks: ``[M, C]`` 0/1 (:func:`subset_masks`).
      full_probs, targets, valid: as in :func:`mutual_finding_loss_map`.
      chunk: subsets per chunk; 0 (or >= M) runs all M in one vmapped application.

    Returns:
      ``[M, B]`` float: ``sum_{h,w,k} (targets * valid * (sg(full_probs) - probs_i))^2``.
    """
    distance = _distance_to(full_probs, targets, valid)

    def subset_distance(subset_mask):  # [C] -> [B]
        return distance(probs_of(images * subset_mask.astype(images.dtype)))

    masks = jnp.asarray(masks)
    chunk = probe_chunk(chunk, masks.shape[0])
    if not chunk:
        return jax.vmap(subset_distance)(masks)
    return lax.map(subset_distance, masks, batch_size=chunk)


def probe_chunk(chunk: int, count: int) -> int:
    """Subsets per chunk that :func:`subset_distances` runs ``count`` subsets in, given
    ``chunk`` (``loss.mfl_chunk``): ``chunk`` where it is below ``count``, else 0 (all ``count``
    in one vmapped application, no loop).

    A nonzero result means the probe loops (``lax.map``), and XLA's cost analysis then counts the
    loop's body once: the FLOP count of such a step is not its arithmetic.

    >>> probe_chunk(4, 14), probe_chunk(4, 4), probe_chunk(4, 2), probe_chunk(0, 14)
    (4, 0, 0, 0)
    """
    return chunk if 0 < chunk < count else 0


def _distance_to(full_probs, targets, valid):
    """``probs [B, H, W, K] -> d [B]``: squared L2 to the stopped full output on the known
    positive bits."""
    mask = check_bits(targets, "targets", full_probs.shape, full_probs.dtype)
    if valid is not None:
        mask = mask * check_bits(valid, "valid", full_probs.shape, full_probs.dtype)
    reference = lax.stop_gradient(full_probs)
    return lambda probs: jnp.sum(jnp.square(mask * (reference - probs)), axis=(1, 2, 3))


def loss_from_distances(distances, height: int, width: int):
    """``(loss [B], chosen [B] int32)`` of eq. (3) from ``d [M, B]`` on ``height x width``
    slices: ``min_i d[i, b] / (H W)`` and its argmin (the first on ties)."""
    chosen = jnp.argmin(distances, axis=0).astype(jnp.int32)
    best = jnp.take_along_axis(distances, chosen[None], axis=0)[0]
    return best / (height * width), chosen


def _check_probs(full_probs, subset_probs):
    full_probs = check_floating(full_probs, "full_probs", 4, "[B, H, W, K]")
    subset_probs = check_floating(subset_probs, "subset_probs", 5, "[M, B, H, W, K]")
    if subset_probs.shape[1:] != full_probs.shape or subset_probs.shape[0] < 1:
        raise ValueError(
            f"subset_probs: expected shape [M >= 1, *{full_probs.shape}], got {subset_probs.shape}"
        )
    for name, probs in (("full_probs", full_probs), ("subset_probs", subset_probs)):
        values = np.asarray(probs) if is_concrete(probs) else np.zeros(0)
        if not np.all((values >= 0) & (values <= 1)):
            raise ValueError(f"{name}: expected probabilities in [0, 1] (after the sigmoid)")
    return full_probs, subset_probs


def mutual_finding_loss_map(full_probs, subset_probs, targets, *, valid=None):
    """Per-slice mutual finding loss, eq. (3) of Cao et al. 2019, and each slice's chosen subset.

    .. math::

        d_{i,b} = \\lVert y_b \\odot v_b \\odot (\\mathrm{sg}(f_b) - f^{(i)}_b) \\rVert_2^2, \\qquad
        MFL_b = \\frac{1}{HW} \\min_i d_{i,b}

    with sg = stop_gradient: the full output is a reference, trained by the focal loss only. The
    gradient reaches only the chosen subset's output (the first one on ties), exactly as when only
    that subset is recomputed (the ``select`` MFL mode, see :func:`mfl_select`) where the model
    has no batch statistics (``model.norm=frozen``; docs/mfl.md for batch norm). A slice without
    positive bits has d = 0 for every subset: it adds 0 and reports subset 0.

    Args:
      full_probs: ``[B, H, W, K]`` probabilities with all components.
      subset_probs: ``[M, B, H, W, K]`` probabilities with only subset i's components.
      targets: ``[B, H, W, K]`` ordinal bits; only positive bits are compared.
      valid: optional ``[B, H, W, K]`` 0/1 mask of known bits.

    Returns:
      ``(loss [B], chosen [B])``: float and int32, the argmin subset of each slice.

    >>> full, y = jnp.full((1, 1, 2, 1), 0.9), jnp.ones((1, 1, 2, 1))
    >>> subsets = jnp.stack([jnp.full((1, 1, 2, 1), 0.5), jnp.full((1, 1, 2, 1), 0.8)])
    >>> loss, chosen = mutual_finding_loss_map(full, subsets, y)  # (2 * 0.1**2) / 2
    >>> round(float(loss[0]), 4), chosen.tolist()
    (0.01, [1])

    References:
      Cao et al., IEEE TMI 2019, section II-C3, eq. (3).
    """
    full_probs, subset_probs = _check_probs(full_probs, subset_probs)
    distances = jax.vmap(_distance_to(full_probs, targets, valid))(subset_probs)  # [M, B]
    return loss_from_distances(distances, *full_probs.shape[1:3])


def mutual_finding_loss(full_probs, subset_probs, targets, *, valid=None):
    """Mutual finding loss averaged over slices, with the per-slice chosen subset: **contract**.

    .. math:: MFL = \\frac{1}{B} \\sum_b MFL_b

    Args and shapes as :func:`mutual_finding_loss_map`.

    Returns:
      ``(loss, chosen)``: scalar and int32 ``[B]``.
    """
    per_slice, chosen = mutual_finding_loss_map(full_probs, subset_probs, targets, valid=valid)
    return reductions.mean(per_slice), chosen


def mfl_select(values, chosen):
    """Each slice's entry for its chosen subset: ``values[chosen[b], b]``.

    In ``select`` mode, gather the chosen subset inputs ``[M, B, H, W, C] -> [B, H, W, C]``, run
    the model on them with gradients, and call ``mutual_finding_loss(full, out[None], targets)``:
    with one subset it returns the same loss as the all-subset call.

    Args:
      values: ``[M, B, ...]``.
      chosen: integer ``[B]`` in 0..M-1 (refused otherwise where concrete; traced, an index
        outside reads the fill value, 0 or NaN, never another subset).

    Returns:
      ``[B, ...]``.

    >>> mfl_select(jnp.array([[10, 11], [20, 21]]), jnp.array([1, 0])).tolist()
    [20, 11]
    """
    values = jnp.asarray(values)
    chosen = jnp.asarray(chosen)
    if not jnp.issubdtype(chosen.dtype, jnp.integer) or chosen.shape != values.shape[1:2]:
        raise ValueError(
            f"chosen: expected int shape ({values.shape[1]},), got {chosen.dtype} {chosen.shape}"
        )
    if is_concrete(chosen):
        index = np.asarray(chosen)
        bad = index[(index < 0) | (index >= len(values))]
        if bad.size:
            raise ValueError(f"chosen: expected subsets in 0..{len(values) - 1}, got {bad[:3]}")
    fill = None if jnp.issubdtype(values.dtype, jnp.inexact) else 0  # NaN, or 0
    return values.at[chosen, jnp.arange(values.shape[1])].get(
        mode="fill", wrap_negative_indices=False, fill_value=fill
    )
