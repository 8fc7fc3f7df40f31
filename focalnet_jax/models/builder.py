"""One builder from an ml_collections config to a Flax Linen module."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from focalnet_jax.models.deeplab import ASPP_VERSIONS, DeepLab, check_upsample
from focalnet_jax.models.normalization import check_norm
from focalnet_jax.models.resnet import check_resnet_args
from focalnet_jax.models.unet import UNet

MODEL_NAMES = ("deeplab", "unet")
# The fields only one architecture reads: set on the other, a run would train without them.
ARCHITECTURE_FIELDS = {
    "deeplab": ("depth", "output_stride", "width", "aspp", "upsample", "pretrained"),
    "unet": ("unet_features", "unet_levels"),
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def default_model_config() -> ml_collections.ConfigDict:
    """Defaults: the paper's backbone, ResNet-101 DeepLab (v2 ASPP) at output stride 8."""
    config = ml_collections.ConfigDict()
    config.name = "deeplab"  # 'deeplab' (FocalNet, Deeplab baseline) | 'unet' (U-Net baselines)
    config.depth = 101  # ResNet depth: 18 | 34 | 50 | 101 | 152
    config.output_stride = 8  # 8 | 16 | 32; strides of layer3/layer4 become dilations
    config.width = 1.0  # channel multiplier; 1.0 = torchvision (needed for pretrained weights)
    config.aspp = "v2"  # 'v2': sum of 4 atrous 3x3 convs (paper's [46]) | 'v3'
    # logits to input size: 'aligned' (feature i on pixel output_stride * i, as TensorFlow 1's
    # resize, the paper's framework) | 'half_pixel' (PyTorch align_corners=False: 3.5 px off)
    config.upsample = "aligned"
    config.norm = "batch"  # 'batch' (synced over the data axis) | 'frozen' (running averages)
    config.dtype = "float32"  # compute dtype 'float32' | 'bfloat16'; params and logits float32
    config.pretrained = ""  # '' or a local torchvision ResNet file (.safetensors/.npz/.pth)
    config.unet_features = 64  # U-Net channels at the first level
    config.unet_levels = 4  # U-Net down-sampling steps (H, W divisible by 2**levels)
    return config


def check_model_config(model_config: ml_collections.ConfigDict) -> None:
    """Raises ``ValueError`` naming the first invalid field of ``model_config``."""
    if model_config.name not in MODEL_NAMES:
        raise ValueError(f"model.name: expected one of {MODEL_NAMES}, got {model_config.name!r}")
    if model_config.dtype not in DTYPES:
        raise ValueError(
            f"model.dtype: expected one of {tuple(DTYPES)}, got {model_config.dtype!r}"
        )
    check_norm(model_config.norm)
    if model_config.name == "deeplab":
        check_resnet_args(model_config.depth, model_config.output_stride, model_config.width)
        if model_config.aspp not in ASPP_VERSIONS:
            raise ValueError(
                f"model.aspp: expected one of {ASPP_VERSIONS}, got {model_config.aspp!r}"
            )
        check_upsample(model_config.upsample)
    else:
        for field in ("unet_features", "unet_levels"):
            value = model_config[field]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{field}: expected a positive int, got {value!r}")
    _check_other_architecture_fields(model_config)


def input_multiple(model_config: ml_collections.ConfigDict) -> int:
    """The number the model input's height and width must be multiples of: ``2**unet_levels``
    for a U-Net (it halves them that often), 1 for a DeepLab (its logits are resized to the
    input)."""
    return 2**model_config.unet_levels if model_config.name == "unet" else 1


def check_input_size(model_config: ml_collections.ConfigDict, image_size) -> None:
    """Raises ``ValueError`` where the model cannot take images of ``image_size`` (H, W) pixels
    (see :func:`input_multiple`)."""
    multiple = input_multiple(model_config)
    if any(int(side) % multiple for side in image_size):
        height, width = image_size
        levels = model_config.unet_levels
        raise ValueError(
            f"model.unet_levels={levels}: the U-Net halves its input {levels} times, so the "
            f"image height and width must be multiples of {multiple}, but the images are "
            f"{height} x {width} pixels; lower model.unet_levels or preprocess with a crop size "
            f"that is a multiple of {multiple}"
        )


def _check_other_architecture_fields(model_config: ml_collections.ConfigDict) -> None:
    """Refuses a field of the other architecture set to other than its default (e.g.
    `model.depth=50` with `model.name='unet'`): an arm meant to differ would repeat another."""
    defaults = default_model_config()
    for name, fields in ARCHITECTURE_FIELDS.items():
        if name == model_config.name:
            continue
        for field in fields:
            value = model_config.get(field, defaults[field])
            if value != defaults[field]:
                raise ValueError(
                    f"model.{field}={value!r}: model {model_config.name!r} does not use {field} "
                    f"(only {name!r} does), so it would train without it; leave it at "
                    f"{defaults[field]!r} or set model.name={name!r}"
                )


def build_model(
    model_config: ml_collections.ConfigDict,
    *,
    num_outputs: int,
    num_components: int,
    axis_name: str | None = None,
) -> nn.Module:
    """The segmentation network described by ``model_config``.

    Args:
      model_config: fields of :func:`default_model_config`.
      num_outputs: logit channels K (5 ordinal, 6 one-hot, 1 binary).
      num_components: input channels C (MRI components, e.g. T2w, ADC, DWI).
      axis_name: named mapped axis for sync-BN (e.g. ``'data'`` under ``shard_map``), or None.

    Returns:
      A module with ``init(rng, x, train=False)`` and ``apply(variables, x, train=...,
      mutable=['batch_stats'])`` mapping float ``[B, H, W, C]`` to float32 ``[B, H, W, K]``.
      Pretrained backbone weights (``model_config.pretrained``) are loaded after ``init`` with
      ``focalnet_jax.models.pretrained.load_torchvision_resnet``.
    """
    check_model_config(model_config)
    for arg, value in (("num_outputs", num_outputs), ("num_components", num_components)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg}: expected a positive int, got {value!r}")
    common = dict(
        num_outputs=num_outputs,
        num_components=num_components,
        norm=model_config.norm,
        axis_name=axis_name,
        dtype=DTYPES[model_config.dtype],
    )
    if model_config.name == "unet":
        return UNet(features=model_config.unet_features, levels=model_config.unet_levels, **common)
    return DeepLab(
        depth=model_config.depth,
        output_stride=model_config.output_stride,
        width=float(model_config.width),
        aspp=model_config.aspp,
        upsample=model_config.upsample,
        **common,
    )
