"""Reductions of loss maps: a loss returns its per-pixel ``[B, H, W]`` (or per-image ``[B]``) map,
and the caller says how to reduce it.

- :func:`mean` over everything: the training loss (the mean over B, H, W; soft Dice: mean over
  images).
- :func:`per_image`: one value per slice ``[B]``, e.g. for a validation loss weighted per slice.
"""

from __future__ import annotations

import jax.numpy as jnp


def mean(loss_map):
    """Mean over every axis: ``[B, H, W]`` or ``[B]`` -> scalar.

    >>> float(mean(jnp.array([[[1.0, 3.0]], [[2.0, 2.0]]])))
    2.0
    """
    return jnp.mean(loss_map)


def per_image(loss_map):
    """Mean over every axis but the first: ``[B, H, W]`` -> ``[B]`` (a ``[B]`` map unchanged).

    >>> per_image(jnp.array([[[1.0, 3.0]], [[2.0, 4.0]]])).tolist()
    [2.0, 3.0]
    """
    return jnp.mean(loss_map, axis=tuple(range(1, jnp.ndim(loss_map))))
