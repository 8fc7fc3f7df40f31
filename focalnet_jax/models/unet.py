"""U-Net (Ronneberger et al. 2015) for the U-Net-Mult (6-class softmax) and U-Net-Sing (1 lesion
logit) baselines.

``levels`` down-sampling steps: at level ``i`` two 3x3 conv -> BatchNorm -> ReLU with
``features * 2**i`` channels, then 2x2 max-pooling; a bottom block with ``features * 2**levels``
channels; on the way up a 2x2 stride-2 transposed convolution, concatenation with the skip
connection and two conv -> BatchNorm -> ReLU; a final 1x1 convolution gives the logits. Padded
convolutions keep the input size, so H and W must be divisible by ``2**levels``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from focalnet_jax.models.deeplab import check_input
from focalnet_jax.models.normalization import batch_norm
from focalnet_jax.models.resnet import conv


class DoubleConv(nn.Module):
    """Two (3x3 conv -> BatchNorm -> ReLU): ``[B, H, W, C] -> [B, H, W, features]``."""

    features: int
    norm: str = "batch"
    axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for k in (1, 2):
            x = conv(self.features, 3, dtype=self.dtype, name=f"conv{k}")(x)
            bn = batch_norm(
                self.norm, train=train, axis_name=self.axis_name, dtype=self.dtype, name=f"bn{k}"
            )
            x = nn.relu(bn(x))
        return x


class UNet(nn.Module):
    """``__call__(x [B, H, W, num_components] float, train=False)`` -> float32 logits
    ``[B, H, W, num_outputs]``."""

    num_outputs: int
    num_components: int
    features: int = 64
    levels: int = 4
    norm: str = "batch"
    axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.features < 1:
            raise ValueError(f"unet_features: expected a positive int, got {self.features!r}")
        if self.levels < 1:
            raise ValueError(f"unet_levels: expected a positive int, got {self.levels!r}")
        check_input(x, self.num_components)
        factor = 2**self.levels
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(
                f"x: height and width must be divisible by 2**unet_levels = {factor}, "
                f"got shape {tuple(x.shape)}"
            )
        kwargs = dict(norm=self.norm, axis_name=self.axis_name, dtype=self.dtype)
        skips = []
        for level in range(self.levels):
            x = DoubleConv(self.features * 2**level, **kwargs, name=f"down{level}")(x, train)
            skips.append(x)
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = DoubleConv(self.features * 2**self.levels, **kwargs, name="bottom")(x, train)
        for level in reversed(range(self.levels)):
            features = self.features * 2**level
            x = nn.ConvTranspose(
                features,
                (2, 2),
                strides=(2, 2),
                dtype=self.dtype,
                param_dtype=jnp.float32,
                name=f"up{level}_transpose",
            )(x)
            x = jnp.concatenate([skips[level], x], axis=-1)
            x = DoubleConv(features, **kwargs, name=f"up{level}")(x, train)
        logits = nn.Conv(
            self.num_outputs, (1, 1), dtype=self.dtype, param_dtype=jnp.float32, name="classifier"
        )(x)
        return logits.astype(jnp.float32)
