"""Segmentation networks: ResNet-DeepLab (FocalNet and the Deeplab baseline) and U-Net.

Written with Flax Linen rather than NNX. Linen modules are stateless descriptions: ``init``
returns the variables as a plain pytree (``params`` and ``batch_stats``) and ``apply`` is a pure
function of them. That is what the training step needs: it runs per device under
``jax.shard_map`` in the pmap style with BatchNorm statistics reduced over a named axis
(sync-BN), applies the same variables to every component subset with one ``jax.vmap`` while
``mutable=['batch_stats']`` returns the updated statistics explicitly, and saves/restores the
variables as Orbax pytrees without any object-graph conversion. NNX's mutable objects would
have to be split into graph and state for each of these transformations.

Public API: :func:`build_model`, :func:`default_model_config`; pretrained torchvision weights
through :mod:`focalnet_jax.models.pretrained`.
"""

from focalnet_jax.models.builder import (
    build_model,
    check_input_size,
    check_model_config,
    default_model_config,
    input_multiple,
)

__all__ = [
    "build_model",
    "check_input_size",
    "check_model_config",
    "default_model_config",
    "input_multiple",
]
