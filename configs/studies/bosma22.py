"""Loss benchmark of Bosma et al. 2022 ("Performant and Reproducible Deep Learning-Based Cancer
Detection Models for Medical Imaging", abstract) on FocalNet's model and ordinal encoding:
CE, FL, CE+FL and CE+Dice, MFL off in every arm, and the ensemble of the four (mean of their
P(class >= k) maps per repeat and fold).

- `ce`: sigmoid cross-entropy on the ordinal bits;
- `fl`: plain sigmoid focal loss (alpha 0.75, gamma 2: the defaults of `losses.focal_loss`);
- `ce_fl`: 0.5 CE + 0.5 FL, weighted as picai_baseline's nnU-Net trainer (FL_and_CE, alpha 0.5);
  its FL is this study's (alpha 0.75 on lesion bits). picai_baseline's focal losses weight
  classes otherwise: unweighted inside FL_and_CE, and background 0.75 / lesion 0.25 in its
  FL-only trainer (`nnUNetTrainerV2_focalLossAlpha75`, whose alpha list is indexed by the
  target class), i.e. `loss.alpha=0.5` with `loss.weights=(0.5, 1.0)` and `loss.alpha=0.25`
  here;
- `ce_dice`: CE + soft Dice as nnU-Net's default: batch Dice, smoothing 1e-5, no background
  channel (the ordinal bits P(class >= k), k = 1..5, are all foreground channels, so nothing is
  left out; `loss.dice_background=False` does it for a softmax output), 1:1 with nnU-Net's CE,
  which averages the 5 bits where `sigmoid_ce` sums them: `loss.weights=(0.2, 1.0)`.

Inputs and slices are FocalNet's (`configs/focalnet.py`): T2w and ADC, and the slices with a
lesion ROI (`data.slices='annotated'`); Bosma et al. train on bpMRI (T2w, ADC, high-b DWI) and
whole exams: `--spec.common.data.components="('t2w','adc','hbv')"` and
`--spec.common.data.slices=all` on a store with `hbv`.

Command (STORE from `focalnet preprocess`):
    focalnet study run --spec configs/studies/bosma22.py:STORE --workdir runs/bosma22 \
        --executor slurm --gpus 1 --time 08:00:00 --throttle 16
    focalnet study status --workdir runs/bosma22
    focalnet study report --workdir runs/bosma22
Cells: 4 arms x 2 repeats x 5 folds = 40 runs, 10 per arm (Bosma et al.: 10 to 20), so two arms
have 20 runs together and their permutation test is exact; `--spec.repeats=4` gives 20 per arm.
Expected runtime: one cell is one FocalNet fold without MFL (its step takes 0.41x an FL+MFL
`vmap` step, benchmarks/results/); whole cells not timed yet.
Expected metric: Bosma et al. (nnU-Net, bpMRI): CE+FL best at case AUROC (p < 0.01), the
ensemble on par with the best arm; with this code not measured yet.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections

CONFIGS = Path(__file__).resolve().parents[1]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    spec = ml_collections.ConfigDict()
    spec.base = str(CONFIGS / "focalnet.py")
    spec.store = arg or ""  # `bosma22.py:STORE` or --spec.store=STORE
    spec.repeats = 2
    spec.folds = None  # all of num_folds
    spec.num_folds = 5
    spec.common = {}
    spec.arms = {
        "ce": {"loss": {"name": "sigmoid_ce", "mfl": False}},
        "fl": {"loss": {"name": "focal", "mfl": False}},
        "ce_fl": {"loss": {"name": "ce_focal", "mfl": False, "weights": (0.5, 0.5)}},
        "ce_dice": {
            "loss": {
                "name": "ce_dice",
                "mfl": False,
                "eps": 1e-5,
                "batch_dice": True,
                "weights": (0.2, 1.0),
            },
        },
    }
    spec.ensembles = {"ensemble": ("ce", "fl", "ce_fl", "ce_dice")}
    return spec
