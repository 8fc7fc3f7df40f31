"""FocalNet losses (Cao et al. 2019, section II-C) and the baseline losses, as pure functions.

Split by concept:

- :mod:`.pixel`: the ordinal focal loss and the baseline pixel losses, each as a per-pixel (or,
  with soft Dice, per-image) map and as the contract scalar (``reductions.mean`` of the map);
- :mod:`.reductions`: how maps are reduced (``mean``, ``per_image``);
- :mod:`.mfl`: the mutual finding loss and its input plumbing (component subsets, subset
  inputs, the probabilities it compares, the ``select`` gather);
- :mod:`.label_stats`: the positive-bit ratio of a training split and lambda = 1 / ratio;
- :mod:`.registry`: losses by name (``config.loss.name``) with their output encoding;
- :mod:`.checks`: input validation shared by all of them.

Every name below is importable as ``focalnet_jax.losses.X`` (the names outside checks call
included).
"""

from focalnet_jax.losses.label_stats import mfl_weight, parse_mfl_weight, positive_bit_ratio
from focalnet_jax.losses.mfl import (
    MFL_LOSSES,
    MFL_MODES,
    check_mfl,
    component_subsets,
    loss_from_distances,
    mfl_encoding,
    mfl_probs,
    mfl_select,
    mutual_finding_loss,
    mutual_finding_loss_map,
    probe_chunk,
    subset_distances,
    subset_inputs,
    subset_masks,
)
from focalnet_jax.losses.pixel import (
    ce_dice_loss,
    ce_dice_loss_map,
    ce_focal_loss,
    ce_focal_loss_map,
    dice_loss_from_sums,
    dice_sums,
    focal_loss,
    focal_loss_map,
    ordinal_focal_loss,
    ordinal_focal_loss_map,
    sigmoid_cross_entropy,
    sigmoid_cross_entropy_map,
    soft_dice_loss,
    soft_dice_loss_map,
    softmax_cross_entropy,
    softmax_cross_entropy_map,
)
from focalnet_jax.losses.registry import (
    LOSS_NAMES,
    LossSpec,
    batch_dice_options,
    check_loss_options,
    get_loss,
)

__all__ = [
    "LOSS_NAMES",
    "MFL_LOSSES",
    "MFL_MODES",
    "LossSpec",
    "batch_dice_options",
    "ce_dice_loss",
    "ce_dice_loss_map",
    "ce_focal_loss",
    "ce_focal_loss_map",
    "check_loss_options",
    "check_mfl",
    "component_subsets",
    "dice_loss_from_sums",
    "dice_sums",
    "loss_from_distances",
    "focal_loss",
    "focal_loss_map",
    "get_loss",
    "mfl_encoding",
    "mfl_probs",
    "mfl_select",
    "mfl_weight",
    "mutual_finding_loss",
    "mutual_finding_loss_map",
    "ordinal_focal_loss",
    "ordinal_focal_loss_map",
    "parse_mfl_weight",
    "positive_bit_ratio",
    "probe_chunk",
    "sigmoid_cross_entropy",
    "sigmoid_cross_entropy_map",
    "soft_dice_loss",
    "soft_dice_loss_map",
    "softmax_cross_entropy",
    "softmax_cross_entropy_map",
    "subset_distances",
    "subset_inputs",
    "subset_masks",
]
