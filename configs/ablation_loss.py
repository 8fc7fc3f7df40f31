"""Loss ablation (paper section III-D, Fig. 8): FocalNet's model and ordinal encoding trained with
`ce` (sigmoid cross-entropy on the ordinal bits), `fl` (ordinal focal loss) or `fl_mfl`
(focal loss + mutual finding loss, = FocalNet).

Command (one variant, one fold):
    focalnet train --config configs/ablation_loss.py:loss=fl,fold=0 \
        --workdir runs/ablation_loss/fl/fold0 --config.data.store=STORE
Expected runtime: a ce or fl step takes 0.41x an fl_mfl step (MFL `vmap`, as here) on one H100
(benchmarks/results/); whole runs not measured yet.
Expected metric: paper, sensitivity at 1 FP per patient: FL+MFL 25.0 % above CE and 8.1 % above
FL; with this code not measured yet.
"""

from __future__ import annotations

import default
import focalnet

_LOSSES = {
    "ce": ("sigmoid_ce", False),
    "fl": ("ordinal_focal", False),
    "fl_mfl": ("ordinal_focal", True),
}


def get_config(arg: str | None = None):
    args = default.parse_arg(arg, loss="fl_mfl", fold=0, store="")
    if args["loss"] not in _LOSSES:
        raise ValueError(f"ablation_loss: loss={args['loss']!r}; expected one of {list(_LOSSES)}")
    config = focalnet.get_config(f"fold={args['fold']},store={args['store']}")
    config.loss.name, config.loss.mfl = _LOSSES[args["loss"]]
    return config
