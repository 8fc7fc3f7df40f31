"""Deeplab baseline (paper section III-A): FocalNet's backbone (ResNet-101 DeepLab-v2, OS 8) with a
6-class one-hot softmax output trained by softmax cross-entropy; no MFL. Same optimiser, epochs,
batch and augmentation as `focalnet.py`.

Command:
    focalnet train --config configs/deeplab_onehot.py:fold=0 --workdir runs/deeplab/fold0 \
        --config.data.store=STORE
Expected runtime: one forward-backward per step, as FocalNet's FL-only step (0.41x a FocalNet
step on one H100, benchmarks/results/); whole runs not measured yet.
Expected metric: paper: lower sensitivity than FocalNet at every FP rate (Fig. 5, Table II);
with this code not measured yet.
"""

from __future__ import annotations

import focalnet


def get_config(arg: str | None = None):
    config = focalnet.get_config(arg)
    config.loss.name = "softmax_ce"
    config.loss.mfl = False
    return config
