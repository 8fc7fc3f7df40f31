"""FocalNet as in the paper (Cao et al., IEEE TMI 2019, section II-D3): ResNet-101 DeepLab-v2 at
output stride 8, ordinal encoding, focal loss + mutual finding loss over T2w and ADC, SGD momentum
0.9 with L2 1e-4, lr 1e-3 x0.7 every 2000 steps, 200 epochs, batch 16, 5-fold cross-validation.

Command (one fold; `focalnet cv` runs all five):
    focalnet train --config configs/focalnet.py:fold=0 --workdir runs/focalnet/fold0 \
        --config.data.store=STORE
ImageNet initialisation (paper): add `--config.model.pretrained=resnet101.safetensors`
(torchvision layout, read locally).
Expected runtime: the paper reports 3-4 h per fold on a Titan Xp. Here one FL+MFL step (batch 16,
float32, MFL `vmap`) takes 0.060 s on one H100 (FL only: 0.025 s; benchmarks/results/
train_step_focalnet_h100_2026-11-22.json), so a fold of ~1400 slices (200 epochs x 87 steps =
17,400 steps) needs about 17 min of steps in float32. In bfloat16 (MFL `select`) on one H200 a
fold projects to 14.5 min of steps, compilation and 2 checkpoints (its 9 validations and 16 other
checkpoints not timed; benchmarks/results/fold_time_bfloat16_NVIDIA_H200_2026-12-04.json,
from its first 1,492 steps: `python benchmarks/fold_time.py --config configs/focalnet.py
--config.model.dtype=bfloat16 --config.loss.mfl_mode=select --max-steps 2000 --cases 24`).
Expected metric: paper, 5-fold CV on 417 patients: 87.9 % sensitivity for clinically significant
lesions at 1 false positive per patient (`froc.clinically_significant.sensitivity_at_fp["1"]`);
with this code not measured yet.
"""

from __future__ import annotations

import default


def get_config(arg: str | None = None):
    args = default.parse_arg(arg, fold=0, store="")
    config = default.get_config()
    config.data.fold = args["fold"]
    config.data.store = args["store"]
    config.model.name = "deeplab"
    config.model.depth = 101
    config.model.output_stride = 8
    config.model.aspp = "v2"
    config.model.width = 1.0
    config.model.norm = "batch"
    config.loss.name = "ordinal_focal"
    config.loss.mfl = True
    config.loss.mfl_weight = "auto"
    # The paper's MFL: every subset forward and backward. `select` (the project's default) gives
    # the same gradient only under frozen normalisation; under this batch normalisation its
    # recomputed batch mixes subsets and its gradient is another (docs/mfl.md).
    config.loss.mfl_mode = "vmap"
    config.train.epochs = 200
    config.train.batch_size = 16
    return config
