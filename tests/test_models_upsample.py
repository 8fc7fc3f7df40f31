"""DeepLab's logit upsampling (`deeplab.upsample_logits`): the backbone centres feature pixel i on
input pixel output_stride * i, and the default 'aligned' mode puts it back there. The
'half_pixel' mode (PyTorch align_corners=False), which every run used before the mode existed,
put each score (output_stride - 1) / 2 pixels down and right of its features."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from focalnet_jax.models import build_model, default_model_config
from focalnet_jax.models.deeplab import upsample_logits


def test_aligned_upsampling_puts_feature_i_on_pixel_stride_i():
    features = np.zeros((1, 5, 4, 1), np.float32)
    features[0, 2, 1, 0] = 1.0
    out = np.asarray(upsample_logits(jnp.asarray(features), (20, 16), 4, "aligned"))[0, :, :, 0]
    assert out.max() == 1.0 and np.argwhere(out == 1.0).tolist() == [[8, 4]]
    # Linear in between: a quarter of the stride away, 3/4 of the value; past the next centre, 0.
    assert out[9, 4] == pytest.approx(0.75) and out[8, 6] == pytest.approx(0.5)
    assert out[12, 4] == 0.0 and out[8, 8] == 0.0
    # Past the last feature centre (row 16 of 20), the features mirrored: a peak there stays one
    # pixel (held, rows 16..19 were one flat run, its one detection at row 17.5 -> 18).
    features[0] = 0.0
    features[0, 4, :, 0] = 2.0
    out = np.asarray(upsample_logits(jnp.asarray(features), (20, 16), 4, "aligned"))[0, :, :, 0]
    # (|.| of the step down is smoothed within 1e-3 logits of 0: values within 1e-3)
    np.testing.assert_allclose(out[14:, 3], [1.0, 1.5, 2.0, 1.5, 1.0, 0.5], atol=1e-3)
    assert np.argwhere(out == 2.0)[:, 0].tolist() == [16] * 16
    # A peak on the feature before the last is no second maximum on the border (mirrored, row
    # 19 took 3/4 of it), and the map falling towards the border goes on falling (held flat,
    # the run is a maximum of its own where the window sees no higher pixel: stride 16 and 32).
    features[0] = 0.0
    features[0, 3, :, 0] = 2.0
    out = np.asarray(upsample_logits(jnp.asarray(features), (20, 16), 4, "aligned"))[0, :, :, 0]
    expected = [2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5]
    np.testing.assert_allclose(out[12:, 3], expected, atol=1e-3)


def test_aligned_upsampling_of_a_transposed_map_is_the_transposed_upsampling():
    logits = jax.random.normal(jax.random.PRNGKey(2), (1, 8, 7, 1))
    out = upsample_logits(logits, (61, 55), 8, "aligned")
    transposed = upsample_logits(jnp.swapaxes(logits, 1, 2), (55, 61), 8, "aligned")
    np.testing.assert_allclose(jnp.swapaxes(transposed, 1, 2), out, atol=1e-6)


@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_random_maps_have_their_detections_on_feature_centres(output_stride):
    """Bilinear between feature centres, a map's local maxima lie on them: a detection on the
    border strip past the last feature (stride - 1 pixels) is one the upsampling made."""
    from focalnet_jax.evaluation.localization import local_maxima

    features = 128 // output_stride
    logits = 2.0 * jax.random.normal(jax.random.PRNGKey(3), (20, features, features, 1))
    scores = jax.nn.sigmoid(upsample_logits(logits, (128, 128), output_stride, "aligned"))
    detections = local_maxima(np.repeat(np.asarray(scores), 5, axis=-1), (0.625, 0.625))
    points = np.stack([detections.row, detections.col], axis=-1)
    assert len(points) > 20 and not (points % output_stride).any()


def test_half_pixel_mode_is_jax_image_resize():
    logits = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 5, 4))
    out = upsample_logits(logits, (24, 40), 8, "half_pixel")
    np.testing.assert_array_equal(out, jax.image.resize(logits, (2, 24, 40, 4), "bilinear"))


def _point_network(output_stride: int, upsample: str):
    """A ResNet-18 DeepLab whose every convolution passes channel 0's centre tap, every BN the
    identity, and ASPP v2's first branch alone: its logits are its input's channel 0 sampled at
    the feature centres and upsampled."""
    config = default_model_config()
    config.depth, config.width, config.output_stride = 18, 0.125, output_stride
    config.upsample = upsample
    model = build_model(config, num_outputs=1, num_components=1)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 1)))

    def point(path, x):
        key, x = jax.tree_util.keystr(path), np.zeros(x.shape, np.float32)
        if key.endswith("['kernel']") and ("aspp" not in key or "branch0" in key):
            x[x.shape[0] // 2, x.shape[1] // 2, 0, 0] = 1.0
        elif key.endswith("['scale']"):
            x[:] = 1.0
        elif key.endswith("['var']"):
            x[:] = 1.0 - 1e-5  # BatchNorm's eps: the identity
        return x

    return model, jax.tree_util.tree_map_with_path(point, variables)


@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("where", ["inner", "first", "last"])
def test_a_bright_input_pixel_peaks_at_that_pixel(output_stride, where):
    """One bright pixel at a feature centre (a multiple of the stride) comes out as the logits'
    single peak at the same pixel, also on the first and on the last feature (whose value held
    to the border made a flat run, its one detection 3 pixels past the peak at stride 8);
    half-pixel moved an inner one 3.5 (7.5) pixels."""
    last = 64 - output_stride  # of 64 pixels
    row, col = {"inner": (32, 16), "first": (0, 0), "last": (last, last)}[where]
    shift = (output_stride - 1) / 2
    for upsample, expected in (("aligned", 0.0), ("half_pixel", shift)):
        model, variables = _point_network(output_stride, upsample)
        image = np.zeros((1, 64, 64, 1), np.float32)
        image[0, row, col, 0] = 1.0
        logits = np.asarray(model.apply(variables, jnp.asarray(image)))[0, :, :, 0]
        rows, cols = np.nonzero(logits == logits.max())
        if upsample == "aligned":
            assert (rows.tolist(), cols.tolist()) == ([row], [col])
        elif where == "inner":
            assert rows.mean() == row + expected and cols.mean() == col + expected


def test_aligned_upsampling_gradients():
    from jax.test_util import check_grads

    logits = jax.random.normal(jax.random.PRNGKey(1), (1, 3, 2, 2))  # distinct: no min() tie
    check_grads(lambda x: upsample_logits(x, (20, 11), 8, "aligned"), (logits,), order=2)
