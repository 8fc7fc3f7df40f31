"""ResNet 18/34/50/101/152 in torchvision's v1.5 layout (NHWC), with DeepLab-style dilation.

Layout and names mirror torchvision so that its weights map one to one (see ``pretrained.py``):
``conv1`` (7x7, stride 2) -> ``bn1`` -> ReLU -> 3x3 max-pool (stride 2) -> stages 1-4, whose
blocks are named ``layer{stage}_{index}`` (torchvision ``layer{stage}.{index}``) and hold
``conv{k}``/``bn{k}`` and, where the shape changes, ``downsample_conv``/``downsample_bn``
(torchvision ``downsample.0``/``downsample.1``). Bottleneck blocks put the stride on the 3x3
convolution (v1.5). Padding is symmetric ``dilation * (k - 1) / 2`` as in PyTorch (not Flax
``'SAME'``, which pads stride-2 convolutions asymmetrically).

``output_stride`` 8/16/32 is reached as torchvision's ``replace_stride_with_dilation``: a stage
whose stride is removed multiplies the dilation by 2; its first block keeps the previous dilation,
the following blocks use the new one. Output stride 16 dilates ``layer4``; 8 dilates ``layer3``
and ``layer4``. Basic blocks (depth 18/34) dilate both 3x3 convolutions.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from focalnet_jax.models.normalization import batch_norm

# depth -> (block type, blocks per stage)
DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
OUTPUT_STRIDES = (8, 16, 32)
STAGE_PLANES = (64, 128, 256, 512)
EXPANSION = {"basic": 1, "bottleneck": 4}

# torchvision initialises convolutions with kaiming_normal_(mode='fan_out', nonlinearity='relu').
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def check_resnet_args(depth: int, output_stride: int, width: float) -> None:
    """Raises ``ValueError`` naming the argument when depth/output_stride/width is invalid."""
    if depth not in DEPTHS:
        raise ValueError(f"depth: expected one of {tuple(DEPTHS)}, got {depth!r}")
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride: expected one of {OUTPUT_STRIDES}, got {output_stride!r}")
    real = isinstance(width, int | float) and not isinstance(width, bool)
    if not (real and math.isfinite(width) and width > 0):
        raise ValueError(f"width: expected a positive multiplier, got {width!r}")


def scaled(channels: int, width: float) -> int:
    """Channel count ``channels * width`` (at least 1); exact for ``width=1.0``."""
    return max(1, int(round(channels * width)))


def stage_schedule(output_stride: int) -> list[tuple[int, int, int]]:
    """Per stage ``(stride, dilation of first block, dilation of other blocks)``.

    >>> stage_schedule(8)
    [(1, 1, 1), (2, 1, 1), (1, 1, 2), (1, 2, 4)]
    """
    dilate = {32: (False, False), 16: (False, True), 8: (True, True)}[output_stride]
    schedule = [(1, 1, 1)]
    dilation = 1
    for stage_dilated in (False, *dilate):  # layer2 keeps its stride at every output stride
        previous, stride = dilation, 2
        if stage_dilated:
            dilation, stride = dilation * 2, 1
        schedule.append((stride, previous, dilation))
    return schedule


def conv(
    features: int, kernel: int, *, stride: int = 1, dilation: int = 1, dtype: Any, name: str
) -> nn.Conv:
    """Bias-free ``kernel x kernel`` convolution with PyTorch-style symmetric padding."""
    pad = dilation * (kernel - 1) // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=stride,
        padding=((pad, pad), (pad, pad)),
        kernel_dilation=dilation,
        use_bias=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=_CONV_INIT,
        name=name,
    )


class Block(nn.Module):
    """Basic (two 3x3) or bottleneck (1x1, 3x3, 1x1) residual block.

    Input ``[B, H, W, C_in]`` -> ``[B, H / stride, W / stride, planes * expansion]``.
    """

    kind: str
    planes: int
    stride: int = 1
    dilation: int = 1
    norm: str = "batch"
    axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        def bn(name: str) -> nn.BatchNorm:
            return batch_norm(
                self.norm, train=train, axis_name=self.axis_name, dtype=self.dtype, name=name
            )

        out_features = self.planes * EXPANSION[self.kind]
        d, dt = self.dilation, self.dtype
        if self.kind == "basic":
            y = conv(self.planes, 3, stride=self.stride, dilation=d, dtype=dt, name="conv1")(x)
            y = nn.relu(bn("bn1")(y))
            y = conv(self.planes, 3, dilation=d, dtype=dt, name="conv2")(y)
            y = bn("bn2")(y)
        else:
            y = conv(self.planes, 1, dtype=dt, name="conv1")(x)
            y = nn.relu(bn("bn1")(y))
            y = conv(self.planes, 3, stride=self.stride, dilation=d, dtype=dt, name="conv2")(y)
            y = nn.relu(bn("bn2")(y))
            y = conv(out_features, 1, dtype=dt, name="conv3")(y)
            y = bn("bn3")(y)
        if self.stride != 1 or x.shape[-1] != out_features:
            x = conv(out_features, 1, stride=self.stride, dtype=dt, name="downsample_conv")(x)
            x = bn("downsample_bn")(x)
        return nn.relu(y + x)


class ResNet(nn.Module):
    """ResNet backbone (``num_classes=None``) or classifier.

    Args of ``__call__``: ``x`` ``[B, H, W, C]`` floating, ``train`` (BatchNorm mode, see
    ``normalization.py``).
    Returns: ``num_classes=None``: the ``layer4`` feature map ``[B, ceil(H / output_stride),
    ceil(W / output_stride), 512 * width * expansion]`` in the compute dtype; otherwise float32
    logits ``[B, num_classes]`` after global average pooling and ``fc`` (the ImageNet
    configuration, used to check parameter counts against torchvision).
    """

    depth: int = 50
    output_stride: int = 32
    width: float = 1.0
    norm: str = "batch"
    axis_name: str | None = None
    dtype: Any = jnp.float32
    num_classes: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_resnet_args(self.depth, self.output_stride, self.width)
        kind, blocks = DEPTHS[self.depth]
        x = conv(scaled(64, self.width), 7, stride=2, dtype=self.dtype, name="conv1")(x)
        bn1 = batch_norm(
            self.norm, train=train, axis_name=self.axis_name, dtype=self.dtype, name="bn1"
        )
        x = nn.relu(bn1(x))
        # PyTorch pads max-pooling with -inf; lax.reduce_window pads with the init value -inf too.
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        schedule = stage_schedule(self.output_stride)
        for stage, (count, planes) in enumerate(zip(blocks, STAGE_PLANES, strict=True)):
            stride, first_dilation, dilation = schedule[stage]
            for index in range(count):
                x = Block(
                    kind,
                    scaled(planes, self.width),
                    stride=stride if index == 0 else 1,
                    dilation=first_dilation if index == 0 else dilation,
                    norm=self.norm,
                    axis_name=self.axis_name,
                    dtype=self.dtype,
                    name=f"layer{stage + 1}_{index}",
                )(x, train)
        if self.num_classes is None:
            return x
        x = jnp.mean(x, axis=(1, 2))
        fc = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name="fc")
        return fc(x).astype(jnp.float32)
