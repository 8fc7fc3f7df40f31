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


def _marked(height=9, width=11):
    """An image and labels zero but for two marks: (1, 2) value 1.0, class 4, grade unknown;
    (5, 6) value 0.5, class 2 (grade known)."""
    image = np.zeros((height, width, 1), np.float32)
    classes = np.zeros((height, width), np.int32)
    grade_known = np.ones((height, width), np.uint8)
    image[1, 2, 0], classes[1, 2], grade_known[1, 2] = 1.0, 4, 0
    image[5, 6, 0], classes[5, 6] = 0.5, 2
    return image, classes, grade_known


def _warp_marked(shift, zoom, flip):
    image, classes, grade_known = _marked()
    coords = augment.source_coordinates(image.shape[:2], jnp.array(shift), zoom, flip)
    out = np.asarray(augment._warp(jnp.asarray(image), coords, order=1))[..., 0]
    labels = np.stack([classes, 1 - grade_known], -1).astype(np.float32)
    labels = np.asarray(augment._warp(jnp.asarray(labels), coords, order=0))
    return out, labels[..., 0], labels[..., 1]


def test_marks_move_to_the_hand_computed_pixels_in_image_and_labels():
    # 9 x 11, centre (4, 5). Flip first (col -> 10 - col), then shift (2, 3):
    # (5, 6) -> (5, 4) -> (7, 7); (1, 2) -> (1, 8) -> (3, 11): outside, gone.
    out, classes, unknown = _warp_marked((2.0, 3.0), 1.0, True)
    expected = np.zeros((9, 11), np.float32)
    expected[7, 7] = 0.5
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(classes, 4 * expected)  # class 2 where the image is 0.5
    np.testing.assert_array_equal(unknown, 0)
    # Zoom 2 about the centre, shift (1, -1): (1, 2) -> (4 + 2 * -3 + 1, 5 + 2 * -3 - 1)
    # = (-1, -2), gone; (5, 6) -> (4 + 2 + 1, 5 + 2 - 1) = (7, 6), where the image peaks. Nearest
    # neighbour (half away from zero) gives the label the 2 x 2 block reading within half a pixel.
    out, classes, unknown = _warp_marked((1.0, -1.0), 2.0, False)
    assert out[7, 6] == 0.5 and out.max() == 0.5
    block = np.zeros((9, 11), np.float32)
    block[6:8, 5:7] = 2
    np.testing.assert_array_equal(classes, block)
    np.testing.assert_array_equal(unknown, 0)
    # No zoom, shift (-1, 2), no flip: (1, 2) -> (0, 4) keeps class 4 and its unknown grade.
    out, classes, unknown = _warp_marked((-1.0, 2.0), 1.0, False)
    assert out[0, 4] == 1.0 and classes[0, 4] == 4 and unknown[0, 4] == 1
    assert out[4, 8] == 0.5 and classes[4, 8] == 2 and unknown.sum() == 1


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
