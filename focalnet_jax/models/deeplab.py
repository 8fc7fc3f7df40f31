"""DeepLab: dilated ResNet backbone, ASPP head, bilinear upsampling of the logits to the input size.

- ASPP v2 (DeepLab v2, Chen et al. 2018; the paper's reference [46]; default): the sum of four 3x3
  atrous convolutions with bias, each producing the ``num_outputs`` logits directly, initialised
  N(0, 0.01) as DeepLab v2's classifier. Rates 6/12/18/24 at output stride 8, scaled by
  ``8 / output_stride`` (3/6/9/12 at 16; floored, at least 1: 1/3/4/6 at 32).
- ASPP v3 (DeepLab v3): a 1x1 branch, three 3x3 atrous branches (rates 12/24/36 at output stride 8,
  6/12/18 at 16, 3/6/9 at 32) and image pooling, each conv -> BatchNorm -> ReLU with
  ``256 * width`` channels, concatenated, projected by 1x1 conv -> BatchNorm -> ReLU, then a 1x1
  classifier with bias. (torchvision's dropout is left out so that training stays deterministic.)

The logits are computed in the compute dtype, cast to float32 and upsampled bilinearly to the
input size (`upsample_logits`). The backbone centres feature pixel i on input pixel
``output_stride * i`` (its stride-2 steps pad symmetrically), so the default ``'aligned'`` places
it there, as TensorFlow 1's default ``resize_bilinear`` does (the paper implemented FocalNet in
TensorFlow); past the last feature (the bottom and right border pixels), where TensorFlow holds
the last one, it goes one step down the slope (`_extended`), so that a peak there stays one pixel
and a map that falls towards the border has no flat run there, a maximum of its own.
``'half_pixel'`` (PyTorch ``align_corners=False``, ``jax.image.resize``) places it at
``(i + 0.5) * H / h - 0.5`` for an input side H of h features, which is ``output_stride * i +
(output_stride - 1) / 2`` where H is a multiple of the output stride (the 128-pixel crop): every
score (output_stride - 1) / 2 pixels down and right of the features it comes from (3.5 pixels at
output stride 8); on another side the offset shrinks towards the bottom and right border.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from focalnet_jax.models.normalization import batch_norm
from focalnet_jax.models.resnet import ResNet, check_resnet_args, scaled

ASPP_VERSIONS = ("v2", "v3")
UPSAMPLE_MODES = ("aligned", "half_pixel")
ASPP_V2_RATES = (6, 12, 18, 24)  # at output stride 8
ASPP_V3_RATES = (12, 24, 36)  # at output stride 8


def aspp_rates(rates: tuple[int, ...], output_stride: int) -> tuple[int, ...]:
    """Atrous rates given at output stride 8, rescaled to ``output_stride`` (floored, >= 1).

    >>> aspp_rates(ASPP_V2_RATES, 16)
    (3, 6, 9, 12)
    """
    return tuple(max(1, rate * 8 // output_stride) for rate in rates)


def check_input(x: jax.Array, num_components: int) -> None:
    """Raises ``ValueError`` unless ``x`` is a floating ``[B, H, W, num_components]`` array."""
    if x.ndim != 4 or x.shape[-1] != num_components or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            f"x: expected a floating array [B, H, W, {num_components}] (NHWC, one channel per "
            f"component), got shape {tuple(x.shape)} dtype {x.dtype}"
        )


class ASPPv2(nn.Module):
    """Sum of 3x3 atrous convolutions: ``[B, h, w, C] -> [B, h, w, num_outputs]``."""

    num_outputs: int
    rates: tuple[int, ...]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        branches = [
            nn.Conv(
                self.num_outputs,
                (3, 3),
                padding=((rate, rate), (rate, rate)),
                kernel_dilation=rate,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                kernel_init=nn.initializers.normal(0.01),
                name=f"branch{i}",
            )(x)
            for i, rate in enumerate(self.rates)
        ]
        return sum(branches[1:], branches[0])


class ASPPv3(nn.Module):
    """DeepLab v3 ASPP with image pooling and classifier: ``[B, h, w, C] -> [B, h, w, K]``."""

    num_outputs: int
    rates: tuple[int, ...]
    features: int = 256
    norm: str = "batch"
    axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        def conv_bn_relu(y: jax.Array, kernel: int, rate: int, name: str) -> jax.Array:
            pad = rate * (kernel - 1) // 2
            y = nn.Conv(
                self.features,
                (kernel, kernel),
                padding=((pad, pad), (pad, pad)),
                kernel_dilation=rate,
                use_bias=False,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                name=f"{name}_conv",
            )(y)
            bn = batch_norm(
                self.norm,
                train=train,
                axis_name=self.axis_name,
                dtype=self.dtype,
                name=f"{name}_bn",
            )
            return nn.relu(bn(y))

        branches = [conv_bn_relu(x, 1, 1, "branch0")]
        branches += [
            conv_bn_relu(x, 3, rate, f"branch{i + 1}") for i, rate in enumerate(self.rates)
        ]
        pooled = conv_bn_relu(jnp.mean(x, axis=(1, 2), keepdims=True), 1, 1, "pool")
        branches.append(jnp.broadcast_to(pooled, (*x.shape[:3], self.features)))
        y = conv_bn_relu(jnp.concatenate(branches, axis=-1), 1, 1, "project")
        classifier = nn.Conv(
            self.num_outputs, (1, 1), dtype=self.dtype, param_dtype=jnp.float32, name="classifier"
        )
        return classifier(y)


class DeepLab(nn.Module):
    """ResNet-DeepLab segmentation network.

    ``__call__(x [B, H, W, num_components] float, train=False)`` -> float32 logits
    ``[B, H, W, num_outputs]`` at input resolution. Parameters live under ``backbone`` (torchvision
    layout, see ``resnet.py``) and ``aspp``.
    """

    num_outputs: int
    num_components: int
    depth: int = 101
    output_stride: int = 8
    width: float = 1.0
    aspp: str = "v2"
    norm: str = "batch"
    axis_name: str | None = None
    dtype: Any = jnp.float32
    upsample: str = "aligned"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_resnet_args(self.depth, self.output_stride, self.width)
        if self.aspp not in ASPP_VERSIONS:
            raise ValueError(f"aspp: expected one of {ASPP_VERSIONS}, got {self.aspp!r}")
        check_upsample(self.upsample)
        check_input(x, self.num_components)
        features = ResNet(
            depth=self.depth,
            output_stride=self.output_stride,
            width=self.width,
            norm=self.norm,
            axis_name=self.axis_name,
            dtype=self.dtype,
            name="backbone",
        )(x, train)
        if self.aspp == "v2":
            rates = aspp_rates(ASPP_V2_RATES, self.output_stride)
            logits = ASPPv2(self.num_outputs, rates, dtype=self.dtype, name="aspp")(features)
        else:
            logits = ASPPv3(
                self.num_outputs,
                aspp_rates(ASPP_V3_RATES, self.output_stride),
                features=scaled(256, self.width),
                norm=self.norm,
                axis_name=self.axis_name,
                dtype=self.dtype,
                name="aspp",
            )(features, train)
        logits = logits.astype(jnp.float32)
        return upsample_logits(logits, x.shape[1:3], self.output_stride, self.upsample)


def check_upsample(mode: str) -> None:
    """Raises ``ValueError`` for a `mode` not in `UPSAMPLE_MODES`."""
    if mode not in UPSAMPLE_MODES:
        raise ValueError(f"model.upsample: expected one of {UPSAMPLE_MODES}, got {mode!r}")


def upsample_logits(logits: jax.Array, size, output_stride: int, mode: str) -> jax.Array:
    """float32 `[B, h, w, K]` logits of a backbone of `output_stride` -> `[B, H, W, K]` at the
    input size `size` (H, W), bilinearly, in `mode` (module docstring)."""
    batch, height, width, channels = logits.shape
    if mode == "half_pixel":
        return jax.image.resize(logits, (batch, *size, channels), "bilinear")
    # One virtual feature row and column past the last: the pixels past the last feature lie
    # between two, so no value is held flat there (a flat run on the border is a maximum of its
    # own, or moves the one detection of a peak on the last feature past it).
    rows_first = _extended(_extended(logits, 1), 2)
    columns_first = _extended(_extended(logits, 2), 1)
    # Equal but in the corner, where their mean keeps the map symmetric under a transposition
    # and its gradient continuous (a min splits it by float rounding where they tie).
    padded = 0.5 * (rows_first + columns_first)
    rows = jnp.asarray(_aligned_weights(size[0], height + 1, output_stride))
    cols = jnp.asarray(_aligned_weights(size[1], width + 1, output_stride))
    highest = jax.lax.Precision.HIGHEST  # no TF32 or bfloat16 passes on GPUs: exact weights
    return jnp.einsum("yi,bijk,xj->byxk", rows, padded, cols, precision=highest)


_SMOOTH = 1e-3  # logits: |d| as sqrt(d^2 + s^2) - s, whose gradient has no jump at d = 0


def _extended(x: jax.Array, axis: int) -> jax.Array:
    """`x` with one more feature along `axis`, one step down the slope from the last:
    `last - |last - before|` (the one before the last mirrored where the last is a peak, the
    line through the two extended where the map falls towards the border; the last itself where
    there is one feature). |.| is smoothed within `_SMOOTH` logits of 0: equal features (a blank
    background) otherwise split their gradient by the sign of their float rounding, which
    differs between device layouts."""
    n = x.shape[axis]
    last = jax.lax.slice_in_dim(x, n - 1, n, axis=axis)
    before = jax.lax.slice_in_dim(x, max(n - 2, 0), max(n - 2, 0) + 1, axis=axis)
    step = jnp.sqrt(jnp.square(last - before) + _SMOOTH**2) - _SMOOTH
    return jnp.concatenate([x, last - step], axis=axis)


def _aligned_weights(size: int, features: int, stride: int) -> np.ndarray:
    """float32 `[size, features]`: output pixel y as the linear interpolation of the features
    either side of y / stride (feature i on pixel stride * i; `features` reach past the last
    pixel, so every pixel lies between two)."""
    position = np.arange(size) / stride
    low = np.floor(position).astype(int)
    frac = position - low
    weights = np.zeros((size, features), np.float32)
    np.add.at(weights, (np.arange(size), low), 1.0 - frac)
    np.add.at(weights, (np.arange(size), np.minimum(low + 1, features - 1)), frac)
    return weights
