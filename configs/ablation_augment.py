"""Augmentation ablation (paper section III-E, Fig. 9): FocalNet trained with `none`, `basic`
(shift, scale, left-right flip) or `advanced` (basic + T2w upper-threshold intensity variation,
= FocalNet's setting).

Command (one variant, one fold):
    focalnet train --config configs/ablation_augment.py:augment=basic,fold=0 \
        --workdir runs/ablation_augment/basic/fold0 --config.data.store=STORE
Expected runtime: as FocalNet; not measured yet.
Expected metric: paper: advanced is 9.8 % more sensitive than basic at 1 FP per patient;
with this code not measured yet.
"""

from __future__ import annotations

import default
import focalnet

_GROUPS = {
    "none": dict(shift=False, scale=False, flip=False, intensity=False),
    "basic": dict(shift=True, scale=True, flip=True, intensity=False),
    "advanced": dict(shift=True, scale=True, flip=True, intensity=True),
}


def get_config(arg: str | None = None):
    args = default.parse_arg(arg, augment="advanced", fold=0, store="")
    if args["augment"] not in _GROUPS:
        raise ValueError(
            f"ablation_augment: augment={args['augment']!r}; expected one of {list(_GROUPS)}"
        )
    config = focalnet.get_config(f"fold={args['fold']},store={args['store']}")
    config.augment.update(_GROUPS[args["augment"]])
    return config
