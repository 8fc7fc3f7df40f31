"""U-Net-Sing baseline (paper section III-A): U-Net with one sigmoid output, lesion vs non-lesion
regardless of Gleason score, binary cross-entropy, no MFL; same schedule and augmentation. Its
only score is P(class >= 1): it stands in for every P(class >= k), so in the GS ROC its detections
are ranked by lesion probability alone.

Command:
    focalnet train --config configs/unet_sing.py:fold=0 --workdir runs/unet_sing/fold0 \
        --config.data.store=STORE
Expected runtime: not measured yet.
Expected metric: paper: below FocalNet (Fig. 5); with this code not measured yet.
"""

from __future__ import annotations

import unet_mult


def get_config(arg: str | None = None):
    config = unet_mult.get_config(arg)
    config.loss.name = "binary_ce"
    return config
