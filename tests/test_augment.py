"""On-device augmentation (focalnet_jax/training/augment.py): geometry, label alignment, T2w
intensity."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from focalnet_jax.training import augment


def _config(**groups):
    config = ml_collections.ConfigDict(
        dict(
            shift=False,
            max_shift=0.1,
            scale=False,
            scale_range=(0.9, 1.1),
            flip=False,
            intensity=False,
            intensity_range=(-0.15, 0.20),
        )
    )
    config.update(groups)
    return config


def _example(size=32, seed=0):
    rng = np.random.default_rng(seed)
    classes = np.zeros((size, size), np.int32)
    classes[8:16, 10:20] = 3
    classes[20:26, 4:9] = 5
    grade_known = np.ones((size, size), np.uint8)
    grade_known[20:26, 4:9] = 0
    image = rng.uniform(0.2, 1.3, (size, size, 2)).astype(np.float32)
    image[..., 1] = (classes > 0).astype(np.float32)  # channel 1 draws the lesions
    return image, classes, grade_known


def test_source_coordinates_of_shift_zoom_and_flip():
    rows, cols = augment.source_coordinates((5, 7), jnp.array([1.0, -2.0]), 1.0, False)
    np.testing.assert_allclose(rows[2, 3], 1.0)  # out (2, 3) reads in (2 - 1, 3 + 2)
    np.testing.assert_allclose(cols[2, 3], 5.0)
    rows, cols = augment.source_coordinates((5, 7), jnp.zeros(2), 2.0, False)
    np.testing.assert_allclose([rows[2, 3], cols[2, 3]], [2.0, 3.0])  # centre is fixed
    np.testing.assert_allclose([rows[4, 6], cols[4, 6]], [3.0, 4.5])  # centre + (2, 3) / 2
    _, cols = augment.source_coordinates((5, 7), jnp.zeros(2), 1.0, True)
    np.testing.assert_allclose(cols[0], np.arange(7)[::-1])


def test_no_augmentation_only_clips():
    image, classes, grade_known = _example()
    out, c, g = augment.augment_example(jax.random.key(0), image, classes, grade_known, _config())
    np.testing.assert_array_equal(out, np.clip(image, 0, 1))
    np.testing.assert_array_equal(c, classes)
    np.testing.assert_array_equal(g, grade_known)


def test_flip_mirrors_images_and_labels_together():
    image, classes, grade_known = _example()
    keys = jax.random.split(jax.random.key(1), 16)
    batch = augment.augment_batch(
        keys,
        *(jnp.broadcast_to(a, (16, *a.shape)) for a in (image, classes, grade_known)),
        _config(flip=True),
    )
    flipped = 0
    for out, c, g in zip(*(np.asarray(a) for a in batch), strict=True):
        if np.array_equal(c, classes[:, ::-1]):
            flipped += 1
            np.testing.assert_allclose(out, np.clip(image[:, ::-1], 0, 1), atol=1e-6)
            np.testing.assert_array_equal(g, grade_known[:, ::-1])
        else:
            np.testing.assert_array_equal(c, classes)
            np.testing.assert_allclose(out, np.clip(image, 0, 1), atol=1e-6)
    assert 0 < flipped < 16  # probability 1/2 each


def test_geometric_warp_keeps_labels_aligned_with_images():
    image, classes, grade_known = _example()
    config = _config(shift=True, scale=True, flip=True, max_shift=0.15, scale_range=(0.8, 1.25))
    keys = jax.random.split(jax.random.key(2), 8)
    out, c, g = augment.augment_batch(
        keys,
        *(jnp.broadcast_to(a, (8, *a.shape)) for a in (image, classes, grade_known)),
        config,
    )
    out, c, g = np.asarray(out), np.asarray(c), np.asarray(g)
    assert c.dtype == np.int32 and g.dtype == np.uint8
    assert set(np.unique(c)) <= {0, 3, 5}  # nearest neighbour: no interpolated classes
    assert not np.array_equal(c, np.broadcast_to(classes, c.shape))
    lesion = c > 0
    # Bilinear image vs nearest labels differ only on boundary pixels.
    assert np.mean(np.abs(out[..., 1][lesion] - 1.0) < 0.5) > 0.9
    assert np.mean(out[..., 1][~lesion] < 0.5) > 0.97
    # grade_known moves with the classes: unknown exactly on the class-5 lesion.
    np.testing.assert_array_equal(g == 0, c == 5)


@pytest.mark.parametrize(
    "u, ratio, expected", [(0.2, 0.0, 1.2), (-0.15, 0.0, 0.85), (0.2, 0.1, 1.1 / 0.9)]
)
def test_t2w_scale_formula(u, ratio, expected):
    # s = ((1 + u) * upper - lower) / (upper - lower), with lower = ratio * upper.
    upper = 800.0
    lower = ratio * upper
    assert float(augment.t2w_divisor(u, ratio)) == pytest.approx(
        ((1 + u) * upper - lower) / (upper - lower)
    )
    assert float(augment.t2w_divisor(u, ratio)) == pytest.approx(expected)


def test_intensity_variation_rescales_t2w_only_within_range():
    image, classes, grade_known = _example()
    image[..., 0] = np.linspace(0.05, 0.8, image[..., 0].size).reshape(image.shape[:2])
    keys = jax.random.split(jax.random.key(3), 64)
    out, _, _ = augment.augment_batch(
        keys,
        *(jnp.broadcast_to(a, (64, *a.shape)) for a in (image, classes, grade_known)),
        _config(intensity=True),
        lower_ratio=jnp.full(64, 0.1),
    )
    out = np.asarray(out)
    np.testing.assert_array_equal(out[..., 1], np.broadcast_to(image[..., 1], out[..., 1].shape))
    s = image[None, ..., 0] / out[..., 0]  # per-slice constant divisor
    np.testing.assert_allclose(s, s[:, :1, :1] * np.ones_like(s), rtol=1e-5)
    s = s[:, 0, 0]
    low, high = augment.t2w_divisor(-0.15, 0.1), augment.t2w_divisor(0.20, 0.1)
    assert np.all((s >= low - 1e-6) & (s <= high + 1e-6))
    assert s.min() < 0.95 and s.max() > 1.1  # the range is actually explored
