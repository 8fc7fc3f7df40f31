"""torchvision's ResNet feature extractor (`nn.Sequential(*children[:-2])`, eval mode) in NumPy
float64, from a `state_dict`: an independent reference for converted weights where torch is absent.

Written from torchvision's definitions, not from this project's model: convolutions pad
`dilation * (k - 1) / 2` on both sides; max-pooling pads with -inf; Bottleneck puts the stride
on its 3x3 convolution (v1.5); `replace_stride_with_dilation` gives a dilated stage's first block
the previous dilation and its other blocks the new one (torchvision `ResNet._make_layer`);
BatchNorm uses running statistics with eps 1e-5. Arrays are NCHW, as in torch.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

EPS = 1e-5
STAGE_BLOCKS = {18: (2, 2, 2, 2), 50: (3, 4, 6, 3)}


def conv2d(x: np.ndarray, w: np.ndarray, stride: int = 1, dilation: int = 1) -> np.ndarray:
    """torch `Conv2d(padding=dilation * (k - 1) // 2, bias=False)`: x [N, C, H, W], w [O, C, k, k]
    -> [N, O, H', W']."""
    k = w.shape[-1]
    pad = dilation * (k - 1) // 2
    span = dilation * (k - 1) + 1
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    windows = sliding_window_view(padded, (span, span), axis=(2, 3))[..., ::dilation, ::dilation]
    windows = windows[:, :, ::stride, ::stride]  # [N, C, H', W', k, k]
    return np.einsum("nchwij,ocij->nohw", windows, w, optimize=True)


def batch_norm(x: np.ndarray, state: dict, prefix: str) -> np.ndarray:
    """torch `BatchNorm2d` in eval mode, its tensors `<prefix>.weight/bias/running_mean/var`."""

    def get(name):
        return state[f"{prefix}.{name}"].astype(np.float64)[None, :, None, None]

    scale = get("weight") / np.sqrt(get("running_var") + EPS)
    return (x - get("running_mean")) * scale + get("bias")


def max_pool_3x3_stride_2(x: np.ndarray) -> np.ndarray:
    """torch `MaxPool2d(kernel_size=3, stride=2, padding=1)` (padding never wins: -inf)."""
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    return sliding_window_view(padded, (3, 3), axis=(2, 3))[:, :, ::2, ::2].max(axis=(-2, -1))


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


def block(x: np.ndarray, state: dict, prefix: str, stride: int, dilation: int) -> np.ndarray:
    """torchvision BasicBlock (no `conv3`) or Bottleneck, with its `downsample` where present."""

    def conv(name, s=1, d=1):
        return conv2d(y, state[f"{prefix}.{name}.weight"].astype(np.float64), s, d)

    y = x
    if f"{prefix}.conv3.weight" in state:
        y = relu(batch_norm(conv("conv1"), state, f"{prefix}.bn1"))
        y = relu(batch_norm(conv("conv2", stride, dilation), state, f"{prefix}.bn2"))
        y = batch_norm(conv("conv3"), state, f"{prefix}.bn3")
    else:
        y = relu(batch_norm(conv("conv1", stride, dilation), state, f"{prefix}.bn1"))
        y = batch_norm(conv("conv2", 1, dilation), state, f"{prefix}.bn2")
    identity = x
    if f"{prefix}.downsample.0.weight" in state:
        weight = state[f"{prefix}.downsample.0.weight"].astype(np.float64)
        identity = batch_norm(conv2d(x, weight, stride), state, f"{prefix}.downsample.1")
    return relu(y + identity)


def features(
    state: dict, x: np.ndarray, depth: int, replace_stride_with_dilation=(False, False, False)
) -> np.ndarray:
    """layer4's output [N, C4, H / OS, W / OS] for input x [N, C, H, W] (C: conv1's inputs)."""
    y = conv2d(x.astype(np.float64), state["conv1.weight"].astype(np.float64), stride=2)
    y = max_pool_3x3_stride_2(relu(batch_norm(y, state, "bn1")))
    dilation = 1
    for stage, count in enumerate(STAGE_BLOCKS[depth]):
        stride, previous = (1 if stage == 0 else 2), dilation
        if stage > 0 and replace_stride_with_dilation[stage - 1]:
            dilation, stride = dilation * stride, 1
        for index in range(count):
            y = block(
                y,
                state,
                f"layer{stage + 1}.{index}",
                stride if index == 0 else 1,
                previous if index == 0 else dilation,
            )
    return y
