"""On-device augmentation (paper section II-D2/3), applied to each training batch with a transform
of its own drawn for every slice of it (the paper's "for each batch" read as new draws for each
batch; a slice's key is the step's folded with its position in the global batch).

Geometric: a random shift, an isotropic scale about the image centre and a left-right flip (no
rotation: it blurs through interpolation). Images are resampled bilinearly, the class and
grade-known maps with nearest neighbour through the same transform, so labels stay aligned;
pixels from outside the slice are 0 (air / background).

Intensity (T2w only): the upper normalisation threshold (bladder) moves by u ~ U(-15 %, +20 %).
With T2w stored as (x - lower) / (upper - lower), moving the upper threshold to (1 + u) * upper
gives `clip(x / s, 0, 1)` with `s = ((1 + u) * upper - lower) / (upper - lower)`, which depends on
the thresholds only through `lower_ratio = lower / upper` (air / bladder of the case, the one
T2w-scale representation the store hands on: `data.store.t2w_lower_ratios`; 0 gives
`s = 1 + u`).

Every input is clipped to [0, 1] before the model, at training and at evaluation
(`run.clip_inputs`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.ndimage import map_coordinates

from focalnet_jax.run import clip_inputs


def t2w_divisor(u: jax.Array, lower_ratio: float = 0.0) -> jax.Array:
    """Divisor s for an upper-threshold change u: ((1 + u) * upper - lower) / (upper - lower)."""
    return ((1.0 + u) - lower_ratio) / (1.0 - lower_ratio)


def source_coordinates(shape, shift, zoom, flip):
    """Input (row, col) read by every output pixel, for out = centre + zoom * (in - centre) + shift
    with `in` mirrored left-right first when `flip` (col -> W - 1 - col); arrays `[H, W]` each."""
    height, width = shape
    rows, cols = jnp.meshgrid(
        jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32), indexing="ij"
    )
    centre_r, centre_c = (height - 1) / 2.0, (width - 1) / 2.0
    src_r = centre_r + (rows - shift[0] - centre_r) / zoom
    src_c = centre_c + (cols - shift[1] - centre_c) / zoom
    src_c = jnp.where(flip, (width - 1) - src_c, src_c)
    return src_r, src_c


def _warp(channels: jax.Array, coords, order: int) -> jax.Array:
    """Resample `[H, W, C]` at `coords` (order 1 = bilinear, 0 = nearest), zeros outside."""
    warp_one = lambda plane: map_coordinates(plane, coords, order=order, mode="constant", cval=0)
    return jax.vmap(warp_one, in_axes=-1, out_axes=-1)(channels)


def augment_example(
    key: jax.Array,
    image: jax.Array,
    classes: jax.Array,
    grade_known: jax.Array,
    config,
    *,
    t2w_channel: int | None = 0,
    lower_ratio: jax.Array | float = 0.0,
):
    """Augment one slice: image `[H, W, C]` float32, classes and grade_known `[H, W]`.

    `config` is the `augment` ConfigDict (shift/scale/flip/intensity flags and ranges), read at
    trace time. Returns the three arrays with the same shapes and dtypes, the image clipped.
    """
    height, width = image.shape[:2]
    k_shift, k_scale, k_flip, k_int = jax.random.split(key, 4)
    geometric = config.shift or config.scale or config.flip
    if geometric:
        shift = jnp.zeros(2)
        if config.shift:
            limit = config.max_shift * jnp.array([height, width], jnp.float32)
            shift = jax.random.uniform(k_shift, (2,), minval=-limit, maxval=limit)
        zoom = jnp.float32(1.0)
        if config.scale:
            low, high = config.scale_range
            zoom = jax.random.uniform(k_scale, (), minval=low, maxval=high)
        flip = jax.random.bernoulli(k_flip) if config.flip else jnp.bool_(False)
        coords = source_coordinates((height, width), shift, zoom, flip)
        image = _warp(image, coords, order=1)
        # The grade-unknown flag is warped (not grade_known) so that pixels from outside are known.
        unknown = (grade_known == 0).astype(jnp.float32)
        labels = jnp.stack([classes.astype(jnp.float32), unknown], axis=-1)
        labels = _warp(labels, coords, order=0)
        classes = labels[..., 0].astype(classes.dtype)
        grade_known = (labels[..., 1] < 0.5).astype(grade_known.dtype)
    if config.intensity and t2w_channel is not None:
        low, high = config.intensity_range
        u = jax.random.uniform(k_int, (), minval=low, maxval=high)
        t2w = jnp.clip(image[..., t2w_channel] / t2w_divisor(u, lower_ratio), 0.0, 1.0)
        image = image.at[..., t2w_channel].set(t2w)
    return clip_inputs(image), classes, grade_known


def augment_batch(
    keys: jax.Array,
    images: jax.Array,
    classes: jax.Array,
    grade_known: jax.Array,
    config,
    *,
    t2w_channel: int | None = 0,
    lower_ratio: jax.Array | float = 0.0,
):
    """`augment_example` over a batch with one key per slice (`keys [B]`, images `[B,H,W,C]`,
    `lower_ratio` a scalar or `[B]`)."""
    ratios = jnp.broadcast_to(jnp.asarray(lower_ratio, jnp.float32), keys.shape)
    fn = lambda k, x, c, g, r: augment_example(
        k, x, c, g, config, t2w_channel=t2w_channel, lower_ratio=r
    )
    return jax.vmap(fn)(keys, images, classes, grade_known, ratios)
