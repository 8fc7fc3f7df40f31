"""U-Net-Mult baseline (paper section III-A): U-Net with a 6-class one-hot softmax output (lesion
detection and Gleason score), softmax cross-entropy, no MFL; same schedule and augmentation. The
U-Net is the paper's reference [45] (Ronneberger et al. 2015): 64 features, 4 down-sampling steps,
31.0 M parameters.

Command:
    focalnet train --config configs/unet_mult.py:fold=0 --workdir runs/unet_mult/fold0 \
        --config.data.store=STORE
Expected runtime: not measured yet.
Expected metric: paper: below FocalNet (Fig. 5); with this code not measured yet.
"""

from __future__ import annotations

import focalnet


def get_config(arg: str | None = None):
    config = focalnet.get_config(arg)
    config.model.name = "unet"
    config.model.unet_features = 64
    config.model.unet_levels = 4
    config.loss.name = "softmax_ce"
    config.loss.mfl = False
    return config
