"""Tests of focalnet_jax/models: shapes, parameter counts, dilation, BatchNorm modes, sync-BN.

Large networks are only traced (``jax.eval_shape``); real forward passes use a tiny ResNet-18
(width 1/8) or U-Net on 64x64 inputs, with variables drawn by NumPy from the traced shapes so
that no random-initialisation program has to be compiled.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from focalnet_jax.models import build_model, default_model_config
from focalnet_jax.models.deeplab import ASPP_V2_RATES, ASPPv2, aspp_rates
from focalnet_jax.models.resnet import ResNet, conv, stage_schedule


def config(**overrides):
    cfg = default_model_config()
    cfg.update(overrides)
    return cfg


def tiny_config(**overrides):
    return config(**{"depth": 18, "width": 0.125, "output_stride": 8, **overrides})


def shapes(model, x, **kwargs):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x, **kwargs))


def random_variables(model, x, seed=0):
    """Variables of the model's shapes: N(0, 0.1) weights, BN scale ~1, running var 0.5-1.5."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path[-1:])
        if "var" in name:
            return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), jnp.float32)
        if "scale" in name:
            return jnp.asarray(1.0 + 0.1 * rng.standard_normal(leaf.shape), jnp.float32)
        return jnp.asarray(0.1 * rng.standard_normal(leaf.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes(model, x))


def jitted(model, train=False):
    """``model.apply`` compiled once; with ``train`` it also returns the updated batch_stats."""
    if train:
        return jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    return jax.jit(lambda v, x: model.apply(v, x))


def param_count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def tiny_deeplab():
    """(variables, input, compiled eval apply, compiled train apply) of a tiny ResNet-18 DeepLab
    with 3 components and 5 outputs."""
    model = build_model(tiny_config(), num_outputs=5, num_components=3)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 64, 64, 3)), jnp.float32)
    return random_variables(model, x), x, jitted(model), jitted(model, train=True)


@pytest.mark.parametrize("depth, expected", [(50, 25_557_032), (101, 44_549_160)])
def test_resnet_parameter_count_equals_torchvision(depth, expected):
    variables = shapes(ResNet(depth=depth, num_classes=1000), jnp.zeros((1, 224, 224, 3)))
    assert param_count(variables["params"]) == expected


@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("components", [2, 4])
@pytest.mark.parametrize("aspp", ["v2", "v3"])
def test_resnet101_deeplab_output_shape(output_stride, components, aspp):
    model = build_model(
        config(output_stride=output_stride, aspp=aspp), num_outputs=5, num_components=components
    )
    x = jnp.zeros((2, 128, 128, components))
    variables = shapes(model, x)
    out = jax.eval_shape(lambda v: model.apply(v, x), variables)
    assert out.shape == (2, 128, 128, 5) and out.dtype == jnp.float32
    assert variables["params"]["backbone"]["conv1"]["kernel"].shape == (7, 7, components, 64)


@pytest.mark.parametrize("components, outputs", [(2, 6), (4, 1)])
def test_unet_output_shape(components, outputs):
    model = build_model(config(name="unet"), num_outputs=outputs, num_components=components)
    x = jnp.zeros((2, 128, 128, components))
    out = jax.eval_shape(lambda v: model.apply(v, x), shapes(model, x))
    assert out.shape == (2, 128, 128, outputs) and out.dtype == jnp.float32


@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_output_stride_sets_feature_map_size(output_stride):
    x = jnp.zeros((1, 128, 128, 3))
    model = ResNet(depth=50, output_stride=output_stride)
    features = jax.eval_shape(lambda v: model.apply(v, x), shapes(model, x))
    assert features.shape == (1, 128 // output_stride, 128 // output_stride, 2048)


def test_stage_schedule_matches_torchvision_replace_stride_with_dilation():
    # torchvision resnet(replace_stride_with_dilation=[False, True, True]): layer3 blocks use
    # dilation 1 (first) then 2, layer4 blocks 2 (first) then 4.
    assert stage_schedule(8) == [(1, 1, 1), (2, 1, 1), (1, 1, 2), (1, 2, 4)]
    assert stage_schedule(16) == [(1, 1, 1), (2, 1, 1), (2, 1, 1), (1, 1, 2)]
    assert stage_schedule(32) == [(1, 1, 1), (2, 1, 1), (2, 1, 1), (2, 1, 1)]


def test_aspp_rates():
    assert aspp_rates(ASPP_V2_RATES, 8) == (6, 12, 18, 24)
    assert aspp_rates(ASPP_V2_RATES, 16) == (3, 6, 9, 12)
    assert aspp_rates(ASPP_V2_RATES, 32) == (1, 3, 4, 6)


def _numpy_conv(x, w, stride, dilation):
    """Cross-correlation with PyTorch padding dilation*(k-1)/2; x [H, W, I], w [k, k, I, O]."""
    k = w.shape[0]
    pad = dilation * (k - 1) // 2
    xp = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
    windows = sliding_window_view(xp, (dilation * (k - 1) + 1,) * 2, axis=(0, 1))
    windows = windows[::stride, ::stride, :, ::dilation, ::dilation]  # [h, w, I, k, k]
    return np.einsum("hwiyx,yxio->hwo", windows, w)


@pytest.mark.parametrize("kernel, stride, dilation, size", [(7, 2, 1, 16), (3, 1, 2, 9)])
def test_conv_padding_matches_pytorch_reference(kernel, stride, dilation, size):
    layer = conv(3, kernel, stride=stride, dilation=dilation, dtype=jnp.float32, name="c")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, size, size, 2)).astype(np.float32)
    w = rng.standard_normal((kernel, kernel, 2, 3)).astype(np.float32)
    out = layer.apply({"params": {"kernel": w}}, x)
    np.testing.assert_allclose(out[0], _numpy_conv(x[0], w, stride, dilation), atol=1e-4)


def test_aspp_v2_is_sum_of_atrous_convolutions():
    rng = np.random.default_rng(0)
    features = rng.standard_normal((1, 12, 12, 4)).astype(np.float32)
    head = ASPPv2(2, (1, 2, 3, 4))
    params = random_variables(head, features)["params"]
    expected = sum(
        _numpy_conv(features[0], params[f"branch{i}"]["kernel"], 1, rate)
        + np.asarray(params[f"branch{i}"]["bias"])
        for i, rate in enumerate((1, 2, 3, 4))
    )
    np.testing.assert_allclose(head.apply({"params": params}, features)[0], expected, atol=1e-4)


def test_tiny_deeplab_forward(tiny_deeplab):
    variables, x, apply, _ = tiny_deeplab
    out = apply(variables, x)
    assert out.shape == (4, 64, 64, 5) and out.dtype == jnp.float32
    assert np.isfinite(out).all() and float(jnp.std(out)) > 0


@pytest.mark.parametrize(
    "cfg, components",
    [
        (tiny_config(output_stride=16), 4),
        (config(name="unet", unet_features=4, unet_levels=3), 2),
    ],
)
def test_tiny_forward_other_configs(cfg, components):
    model = build_model(cfg, num_outputs=6, num_components=components)
    x = jnp.ones((2, 64, 64, components))
    out = jitted(model)(random_variables(model, x), x)
    assert out.shape == (2, 64, 64, 6) and np.isfinite(out).all()


def test_bfloat16_compute_keeps_float32_params_and_logits(tiny_deeplab):
    variables, x, apply, _ = tiny_deeplab
    model = build_model(tiny_config(dtype="bfloat16"), num_outputs=5, num_components=3)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes(model, x)))
    out = jitted(model)(variables, x)
    reference = apply(variables, x)
    assert out.dtype == jnp.float32
    scale = float(jnp.abs(reference).max())
    assert float(jnp.abs(out - reference).max()) < 0.05 * scale


def test_frozen_bn_keeps_running_averages_under_train(tiny_deeplab):
    variables, x, apply, _ = tiny_deeplab
    model = build_model(tiny_config(norm="frozen"), num_outputs=5, num_components=3)
    out, updates = jitted(model, train=True)(variables, x)
    for new, old in zip(
        jax.tree.leaves(updates["batch_stats"]),
        jax.tree.leaves(variables["batch_stats"]),
        strict=True,
    ):
        np.testing.assert_array_equal(new, old)
    np.testing.assert_allclose(out, apply(variables, x), atol=1e-5)


def test_batch_bn_updates_running_mean_with_batch_statistics(tiny_deeplab):
    variables, x, _, train_apply = tiny_deeplab
    _, updates = train_apply(variables, x)
    kernel = variables["params"]["backbone"]["conv1"]["kernel"]
    stem = jax.lax.conv_general_dilated(
        x, kernel, (2, 2), ((3, 3), (3, 3)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    old = variables["batch_stats"]["backbone"]["bn1"]
    new = updates["batch_stats"]["backbone"]["bn1"]
    np.testing.assert_allclose(
        new["mean"], 0.9 * old["mean"] + 0.1 * stem.mean((0, 1, 2)), atol=1e-5
    )
    np.testing.assert_allclose(new["var"], 0.9 * old["var"] + 0.1 * stem.var((0, 1, 2)), rtol=1e-4)


@jax.default_matmul_precision("highest")  # full float32 convolutions also on GPUs (no TF32)
def test_sync_bn_over_named_axis_equals_concatenated_batch(tiny_deeplab):
    variables, x, _, train_apply = tiny_deeplab
    synced = build_model(tiny_config(), num_outputs=5, num_components=3, axis_name="data")
    synced_apply = jitted(synced, train=True)
    shards = x.reshape(2, 2, *x.shape[1:])  # two devices with two slices each
    out, stats = jax.vmap(lambda images: synced_apply(variables, images), axis_name="data")(shards)
    reference_out, reference_stats = train_apply(variables, x)
    np.testing.assert_allclose(out.reshape(reference_out.shape), reference_out, atol=1e-4)
    for shard_stat, stat in zip(
        jax.tree.leaves(stats), jax.tree.leaves(reference_stats), strict=True
    ):
        np.testing.assert_allclose(shard_stat[0], stat, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(shard_stat[1], stat, rtol=1e-4, atol=1e-5)
    # Without the named axis each shard normalises with its own statistics, which differ.
    unsynced, _ = jax.vmap(lambda images: train_apply(variables, images))(shards)
    assert float(jnp.abs(unsynced.reshape(reference_out.shape) - reference_out).max()) > 1e-3


def test_unet_batch_and_frozen_modes():
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 32, 32, 2)), jnp.float32)
    cfg = config(name="unet", unet_features=4, unet_levels=2)
    model = build_model(cfg, num_outputs=1, num_components=2)
    variables = random_variables(model, x)
    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    old_mean = variables["batch_stats"]["down0"]["bn1"]["mean"]
    assert float(jnp.abs(updates["batch_stats"]["down0"]["bn1"]["mean"] - old_mean).max()) > 1e-4
    cfg.norm = "frozen"
    frozen = build_model(cfg, num_outputs=1, num_components=2)
    _, updates = frozen.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_array_equal(updates["batch_stats"]["down0"]["bn1"]["mean"], old_mean)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"depth": 42}, "depth"),
        ({"output_stride": 4}, "output_stride"),
        ({"aspp": "v4"}, "aspp"),
        ({"norm": "group"}, "norm"),
        ({"name": "fcn"}, "name"),
        ({"dtype": "float16"}, "dtype"),
        ({"width": 0.0}, "width"),
        ({"width": float("inf")}, "width"),  # an OverflowError traceback at the first init
        ({"name": "unet", "unet_levels": 0}, "unet_levels"),
    ],
)
def test_bad_config_raises_naming_field(overrides, match):
    with pytest.raises(ValueError, match=match):
        build_model(config(**overrides), num_outputs=5, num_components=3)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"name": "unet", "depth": 50}, "model.depth=50: model 'unet' does not use depth"),
        ({"name": "unet", "width": 0.25}, "model.width=0.25: model 'unet' does not use width"),
        ({"name": "unet", "output_stride": 16}, "model.output_stride=16: model 'unet'"),
        ({"name": "unet", "aspp": "v3"}, "model.aspp='v3': model 'unet' does not use aspp"),
        ({"name": "unet", "pretrained": "r.npz"}, "model.pretrained='r.npz': model 'unet'"),
        ({"unet_levels": 5}, "model.unet_levels=5: model 'deeplab' does not use unet_levels"),
        ({"unet_features": 32}, "model.unet_features=32: model 'deeplab' does not use"),
    ],
)
def test_a_field_of_the_other_architecture_is_refused(overrides, message):
    """A field only the other architecture reads, set to other than its default, would be
    trained without: `model.depth=50` on a U-Net arm gave the same U-Net as the arm without it."""
    with pytest.raises(ValueError, match=re.escape(message)) as raised:
        build_model(config(**overrides), num_outputs=6, num_components=2)
    assert "so it would train without it; leave it at" in str(raised.value)
    # At their defaults they are accepted (every config sets them), as are 1 for 1.0.
    build_model(config(name="unet", width=1, depth=101), num_outputs=6, num_components=2)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="num_outputs"):
        build_model(config(), num_outputs=0, num_components=3)
    model = build_model(tiny_config(), num_outputs=5, num_components=3)
    with pytest.raises(ValueError, match=r"x: expected a floating array \[B, H, W, 3\]"):
        shapes(model, jnp.zeros((1, 64, 64, 2)))
    with pytest.raises(ValueError, match="x: expected a floating"):
        shapes(model, jnp.zeros((1, 64, 64, 3), jnp.int32))
    unet = build_model(config(name="unet", unet_levels=3), num_outputs=6, num_components=3)
    with pytest.raises(ValueError, match="unet_levels"):
        shapes(unet, jnp.zeros((1, 60, 60, 3)))


def test_build_model_returns_linen_module():
    assert isinstance(build_model(config(), num_outputs=5, num_components=3), nn.Module)
