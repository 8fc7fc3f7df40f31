"""Hand-built cases of the localisation, FROC and report tests: rectangular lesions and
single-pixel score peaks on a zero background (`make_case`), and the 3-patient FROC example
counted by hand (`three_patients`)."""

from __future__ import annotations

import numpy as np

from focalnet_jax.evaluation.matching import summarize_case
from focalnet_jax.evaluation.predictions import CasePredictions


def make_case(case_id, patient_id, shape, boxes=(), peaks=(), spacing=(1.0, 1.0)):
    """A case with rectangular lesions and single-pixel score peaks on a zero background.

    boxes: (slice, row0, row1, col0, col1, class), inclusive bounds, lesion ids in order.
    peaks: (slice, row, col, s1) or (slice, row, col, [s1..s5]).
    """
    scores = np.zeros((*shape, 5), np.float32)
    lesions = np.zeros(shape, np.int32)
    for lesion_id, (z, r0, r1, c0, c1, _) in enumerate(boxes, 1):
        lesions[z, r0 : r1 + 1, c0 : c1 + 1] = lesion_id
    for z, r, c, s in peaks:
        scores[z, r, c] = np.broadcast_to(np.asarray(s, np.float32), (5,))
    return CasePredictions(
        case_id=case_id,
        patient_id=patient_id,
        scores=scores,
        lesions=lesions,
        lesion_classes=np.asarray([b[-1] for b in boxes], np.int32),
        spacing=np.asarray(spacing, np.float64),
    )


def three_patients():
    """Patient A: a GS 4+3 lesion hit at 0.9, a GS 3+3 lesion hit at 0.3, a FP at 0.6.
    Patient B: a GS 3+4 lesion hit at 0.5 (exactly 5 mm away), FPs at 0.8 and 0.2.
    Patient C: no lesion, FPs at 0.7 and 0.4."""
    a = make_case(
        "A",
        "A",
        (1, 64, 64),
        boxes=[(0, 10, 14, 10, 14, 3), (0, 40, 44, 40, 44, 1)],
        peaks=[(0, 12, 12, 0.9), (0, 12, 30, 0.6), (0, 42, 42, 0.3)],
    )
    b = make_case(
        "B",
        "B",
        (1, 64, 64),
        boxes=[(0, 20, 24, 20, 24, 2)],
        peaks=[(0, 50, 50, 0.8), (0, 22, 29, 0.5), (0, 5, 5, 0.2)],
    )
    c = make_case("C", "C", (1, 64, 64), peaks=[(0, 30, 30, 0.7), (0, 10, 50, 0.4)])
    return [summarize_case(x) for x in (a, b, c)]
