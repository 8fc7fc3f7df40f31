"""FocalNet on the PI-CAI layout: T2w, ADC and high-b DWI (hbv), MFL over PI-RADS-like subsets.

PI-RADS assesses transition-zone findings mainly on T2w and peripheral-zone findings mainly on
diffusion (ADC with the high-b image), so the MFL subsets are `(t2w,)` and `(adc, hbv)`: each slice
trains the subset that alone best reproduces the full prediction on its lesions. Add subsets with
`--config.loss.subsets="[('t2w',), ('adc',), ('hbv',), ('adc', 'hbv')]"`, or `None` for all six
non-empty proper subsets. PI-CAI labels 1 ("csPCa, grade unknown") train bits 1-2 only.

Command (store from `focalnet preprocess --layout picai ...`):
    focalnet train --config configs/picai.py:fold=0,store=STORE --workdir runs/picai/fold0
Smoke run on a laptop: `configs/picai.py:fold=0,store=STORE,runlocal` (ResNet-18, width 0.25,
100 steps).
Expected runtime: not measured yet. Expected metric: not measured yet (PI-CAI ranking score from
`picai_eval` by `focalnet evaluate`).
"""

from __future__ import annotations

import default
import focalnet


def get_config(arg: str | None = None):
    args = default.parse_arg(arg, fold=0, store="", runlocal=False)
    config = focalnet.get_config(f"fold={args['fold']},store={args['store']}")
    config.data.components = ("t2w", "adc", "hbv")
    config.loss.subsets = [("t2w",), ("adc", "hbv")]
    if args["runlocal"]:
        config.model.depth = 18
        config.model.width = 0.25
        config.model.output_stride = 16
        config.train.steps = 100
        config.train.batch_size = 8
        config.train.log_every = 10
        config.train.checkpoint_every = 50
        config.train.eval_every = 50
    return config
