"""MFL over four components: FocalNet (ordinal FL + MFL) on synthetic T2w, ADC, HBV and DCE with
all 14 non-empty proper component subsets (`loss.subsets=None`), demo-sized for a CPU.

T2w, ADC/HBV and DCE each have lesions that only they show (`focalnet synth --t2w-only-share,
--adc-only-share, --dce-only-share`, 15 % each; HBV shows ADC's), the situation MFL is for.
Data and command:
    focalnet synth --out data/synth4 --cases 60 --seed 0 --small --components t2w,adc,hbv,dce
    focalnet preprocess --layout picai --images data/synth4/images --labels data/synth4/labels \
        --masks data/synth4/masks --out data/synth4_store --components t2w,adc,hbv,dce
    focalnet train --config configs/mfl4.py --workdir runs/mfl4 \
        --config.data.store=data/synth4_store
Model: ResNet-18 DeepLab-v2 at width 0.25, output stride 16 (as configs/demo.py); batch 8, fold 0.
MFL runs in the project's default mode (`loss.mfl_mode='select'`, subsets probed
`loss.mfl_chunk=4` at a time); its cost against the number of subsets is in docs/mfl.md
(`benchmarks/mfl_scaling.py`). Expected runtime: a whole run not measured yet.
Expected metric: not measured yet (FROC sensitivity at 1 false positive per patient from
`focalnet evaluate --workdir runs/mfl4`).
"""

from __future__ import annotations

import default


def get_config(arg: str | None = None):
    args = default.parse_arg(arg, fold=0, store="")
    config = default.get_config()
    config.data.store = args["store"]
    config.data.fold = args["fold"]
    config.data.components = ("t2w", "adc", "hbv", "dce")
    config.loss.subsets = None  # all 14 non-empty proper subsets of the four components
    config.model.depth = 18
    config.model.width = 0.25
    config.model.output_stride = 16
    config.train.steps = 600
    config.train.batch_size = 8
    config.train.log_every = 20
    config.train.checkpoint_every = 200
    config.train.eval_every = 200
    config.optim.lr = 1e-2  # as configs/demo.py: a faster start and decay for the small model
    config.optim.decay_steps = 150
    return config
