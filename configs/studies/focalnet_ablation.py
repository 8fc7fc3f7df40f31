"""The paper's ablations as one study (Cao et al. 2019): Fig. 8 losses, Fig. 9 augmentation and
the Table II baselines, each arm a variant of `configs/focalnet.py` (= the `fl_mfl` arm).

- Fig. 8: `ce` (sigmoid CE on the ordinal bits), `fl` (ordinal focal loss), `fl_mfl` (FocalNet);
- Fig. 9: `aug_none`, `aug_basic` (shift, scale, flip); `advanced` (+ T2w intensity) = `fl_mfl`;
- Table II: `deeplab` (6-class softmax CE), `unet_mult` (U-Net, 6-class softmax CE), `unet_sing`
  (U-Net, lesion vs background sigmoid CE); none with MFL, as `configs/deeplab_onehot.py`,
  `configs/unet_mult.py` and `configs/unet_sing.py`.

Command:
    focalnet study run --spec configs/studies/focalnet_ablation.py:STORE \
        --workdir runs/focalnet_ablation --executor slurm --gpus 1 --time 08:00:00
    focalnet study report --workdir runs/focalnet_ablation
Cells: 8 arms x 2 repeats x 5 folds = 80 runs (the paper: one 5-fold CV per variant; repeats show
how much of a difference identical configurations also produce).
Expected runtime: FocalNet's fold (configs/focalnet.py) per `fl_mfl` cell; not timed yet.
Expected metric: paper: FL+MFL 25.0 % above CE and 8.1 % above FL in sensitivity at 1 FP per
patient, advanced augmentation 9.8 % above basic; with this code not measured yet.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections

CONFIGS = Path(__file__).resolve().parents[1]
NO_MFL = {"mfl": False}
UNET = {"name": "unet", "unet_features": 64, "unet_levels": 4}  # as configs/unet_mult.py


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    spec = ml_collections.ConfigDict()
    spec.base = str(CONFIGS / "focalnet.py")
    spec.store = arg or ""
    spec.repeats = 2
    spec.folds = None
    spec.num_folds = 5
    spec.common = {}
    spec.arms = {
        "ce": {"loss": {"name": "sigmoid_ce", **NO_MFL}},
        "fl": {"loss": {"name": "ordinal_focal", **NO_MFL}},
        "fl_mfl": {},
        "aug_none": {
            "augment": {"shift": False, "scale": False, "flip": False, "intensity": False}
        },
        "aug_basic": {"augment": {"intensity": False}},
        "deeplab": {"loss": {"name": "softmax_ce", **NO_MFL}},
        "unet_mult": {"model": UNET, "loss": {"name": "softmax_ce", **NO_MFL}},
        "unet_sing": {"model": UNET, "loss": {"name": "binary_ce", **NO_MFL}},
    }
    spec.ensembles = {}
    return spec
