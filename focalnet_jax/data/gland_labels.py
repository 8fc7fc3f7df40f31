"""Whole-gland masks given as lesion labels, judged over a run's labelled cases.

PI-CAI's label repository keeps whole-gland AI masks beside the lesion labels, both 0/1 maps: given
as `--labels`, each case would be stored with one gland-sized csPCa lesion. One case cannot tell:
a large tumour may fill most of its gland (a lesion wholly inside the gland reaches Dice 0.9 with
it at 82 % of its volume). Many cases can: where the cases' prostate masks are given, a run whose
labelled cases match their masks with a median Dice of `GLAND_DICE` is refused, and single cases
that match are named in a warning; without masks, a median lesion volume over `GLAND_SIZED_ML`
(a whole prostate is 20-80 mL) is named in a warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from focalnet_jax.errors import UserError

log = logging.getLogger(__name__)

GLAND_DICE = 0.9
GLAND_SIZED_ML = 15.0
FEW_CASES = 3  # the fewest labelled cases a run is judged on


@dataclass(frozen=True)
class LabelledCase:
    """What is judged of one stored case with lesions: their volume (mL) and their Dice with the
    case's prostate mask (None without a mask)."""

    case_id: str
    volume_ml: float
    gland_dice: float | None


def labelled_case(case) -> LabelledCase:
    """The `LabelledCase` of a `PreprocessedCase` with lesions (volume: crop pixels times T2w
    slice spacing)."""
    row, column = case.spacing
    voxels = np.count_nonzero(case.lesions)
    volume = voxels * row * column * case.geometry.t2w_spacing[2] / 1000
    return LabelledCase(case.case_id, float(volume), case.gland_dice)


def check_gland_labels(cases: list[LabelledCase], store) -> None:
    """Refuse (`UserError` naming `store`) or warn of labels that look like whole-gland masks
    (module docstring)."""
    masked = {c.case_id: c.gland_dice for c in cases if c.gland_dice is not None}
    matching = {case: dice for case, dice in masked.items() if dice >= GLAND_DICE}
    median = np.median(list(masked.values())) if masked else 0.0
    if len(masked) >= FEW_CASES and median >= GLAND_DICE:
        raise UserError(
            f"store {store}: the lesion labels of {len(matching)} of {len(masked)} labelled cases "
            f"match their prostate masks (median Dice {median:.2f}; "
            f"{_listed(matching, '{:.2f}')}): whole-gland masks given as --labels? Nothing was "
            "written"
        )
    if matching:
        log.warning(
            "the lesion labels of %d case(s) match their prostate masks (Dice >= %g: %s): lesions "
            "filling the gland, or whole-gland masks given as labels?",
            len(matching), GLAND_DICE, _listed(matching, "{:.2f}"),
        )  # fmt: skip
    unmasked = {c.case_id: c.volume_ml for c in cases if c.gland_dice is None}
    volume = np.median(list(unmasked.values())) if unmasked else 0.0
    if len(unmasked) >= FEW_CASES and volume > GLAND_SIZED_ML:
        log.warning(
            "the lesions of %d labelled cases without a prostate mask have a median volume of "
            "%.0f mL, the size of a whole prostate (20-80 mL), not of lesions (%s): are the labels "
            "whole-gland masks?",
            len(unmasked), volume, _listed(unmasked, "{:.0f} mL"),
        )  # fmt: skip


def _listed(values: dict[str, float], form: str) -> str:
    """'case: value' of the three largest values, e.g. 'c1: 0.97, c2: 0.95, ...'."""
    largest = sorted(values, key=values.get, reverse=True)
    shown = ", ".join(f"{case}: {form.format(values[case])}" for case in largest[:3])
    return shown + (", ..." if len(largest) > 3 else "")
