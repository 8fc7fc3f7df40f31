"""Flat maxima of upsampled score maps: FROC with every window-maximum pixel a detection (the rule
before flat maxima were grouped) against one detection per flat maximum (`local_maxima` today).

    python benchmarks/flat_maxima.py [--patients 100] [--seed 0] [--upsample aligned]
    python benchmarks/flat_maxima.py --predictions demo_run/run/eval/predictions   # a real run

Score maps are made like a DeepLab output: per patient a 16 x 16 logit map (background -8, i.e.
s1 = 3e-4 < min_score) with `--peaks` single-cell peaks, half of them on the border, upsampled x8
to 128 x 128 as `models/deeplab.py` upsamples its logits in `--upsample` mode (`aligned`, the
model's default: feature i on pixel 8 i, the border extended down the slope; `half_pixel`: feature
i on pixel 8 i + 3.5, `jax.image.resize(..., 'bilinear')`, edges clamped into flat runs) and
passed through a sigmoid; 0.625 mm pixels (window radius 8 pixels). One peak per patient sits on a
csPCa lesion (24 x 24 pixels centred on its feature's pixel); lesion peaks have logits N(1, 1.5),
the other peaks N(-1, 1.5). Both rules share the window, the hit rule
and the FROC code; only the grouping of touching window maxima differs. Prints one JSON line:
detections per patient and FP per patient at 60/70/80/90 % sensitivity and sensitivity at
1 FP/patient for each rule. `--predictions DIR` compares the rules on a folder of contract
predictions files instead (e.g. a trained model's validation fold).
"""

from __future__ import annotations

import argparse
import json

import jax.numpy as jnp
import numpy as np
import result_line  # benchmarks/result_line.py (the script directory)
from benchmark_flags import count, run_main
from scipy import ndimage

from focalnet_jax.errors import UserError
from focalnet_jax.evaluation import matching
from focalnet_jax.evaluation.froc import froc_analysis
from focalnet_jax.evaluation.localization import Detections, local_maxima, window_radius
from focalnet_jax.evaluation.predictions import CasePredictions, list_cases, read_case
from focalnet_jax.models.deeplab import UPSAMPLE_MODES, upsample_logits

GRID, FACTOR, SPACING = 16, 8, (0.625, 0.625)
THRESHOLDS = ("0.1", "0.3", "0.5")  # detections counted at or above each s1
MAX_DRAWS = 10_000  # draws in a row that place no peak before a patient is given up


def every_window_max_pixel(scores, spacing, *, radius_mm, min_score):
    """The former rule, for comparison only: every window-maximum pixel is a detection."""
    s1 = scores[..., 0]
    r_row, r_col = window_radius(spacing, radius_mm)
    size = (1, 2 * r_row + 1, 2 * r_col + 1)
    window_max = ndimage.maximum_filter(s1, size=size, mode="constant", cval=0.0)
    z, y, x = np.nonzero((s1 == window_max) & (s1 > min_score))
    point_scores = scores[z, y, x]
    order = np.lexsort((x, y, z, -point_scores[:, 0]))
    return Detections(z[order], y[order], x[order], point_scores[order])


def synthetic_case(
    rng: np.random.Generator, index: int, peaks: int, upsample: str = "aligned"
) -> CasePredictions:
    """One patient: a 16 x 16 logit map with `peaks` peaks (half on the border), upsampled x8
    (`upsample`: a `model.upsample` mode).
    Peaks are drawn at random until they fit; a `UserError` where `MAX_DRAWS` draws in a row do
    not (too many peaks for the grid, at most 36, or drawn into a jam)."""
    cells: set[tuple[int, int]] = set()
    draws = 0
    while len(cells) < peaks:
        draws += 1
        if draws > MAX_DRAWS:
            raise UserError(
                f"--peaks {peaks}: patient {index} got {len(cells)} peaks 3 cells apart, then "
                f"{MAX_DRAWS} draws in a row found no room for another on the {GRID} x {GRID} "
                "grid; use fewer"
            )
        if len(cells) < peaks // 2:  # a border cell: one of the four sides, anywhere along it
            t = int(rng.integers(GRID))
            cell = [(0, t), (GRID - 1, t), (t, 0), (t, GRID - 1)][rng.integers(4)]
        else:
            cell = tuple(int(v) for v in rng.integers(1, GRID - 1, 2))
        # At least 3 cells apart: every peak is its own maximum.
        if all(max(abs(cell[0] - a), abs(cell[1] - b)) > 2 for a, b in cells):
            cells.add(cell)
            draws = 0
    cells = sorted(cells)
    lesion_cell = cells[rng.integers(len(cells))]
    logits = np.full((GRID, GRID), -8.0, np.float32)
    for cell in cells:
        logits[cell] = rng.normal(1.0, 1.5) if cell == lesion_cell else rng.normal(-1.0, 1.5)
    size = (GRID * FACTOR,) * 2
    up = upsample_logits(jnp.asarray(logits)[None, ..., None], size, FACTOR, upsample)
    s1 = (1.0 / (1.0 + np.exp(-np.asarray(up[0, ..., 0], np.float64)))).astype(np.float32)
    lesions = np.zeros((1, *size), np.int32)
    shift = (FACTOR - 1) / 2 if upsample == "half_pixel" else 0.0  # the feature's pixel
    r0, c0 = (round(v * FACTOR + shift - 1.5 * FACTOR) for v in lesion_cell)  # may be < 0
    lesions[0, max(r0, 0) : r0 + 3 * FACTOR, max(c0, 0) : c0 + 3 * FACTOR] = 1
    return CasePredictions(
        case_id=f"case{index:03d}",
        patient_id=f"p{index:03d}",
        scores=np.repeat(s1[None, ..., None], 5, axis=-1),
        lesions=lesions,
        lesion_classes=np.array([2], np.int32),
        spacing=np.asarray(SPACING, np.float64),
    )


def froc_numbers(cases, localize) -> dict:
    """Detection counts and FROC operating points of `cases` under the rule `localize`."""
    summaries = [matching.summarize_case(case, localize=localize) for case in cases]
    froc = froc_analysis(summaries)["all"]
    scores = np.concatenate([s.detection_scores for s in summaries])
    patients = len({case.patient_id for case in cases})
    return {
        "detections": int(scores.size),
        "detections_s1_at_least": {t: int((scores >= float(t)).sum()) for t in THRESHOLDS},
        "detections_per_patient": scores.size / patients,
        "fp_at_sensitivity": froc["fp_at_sensitivity"],
        "sensitivity_at_1fp": froc["sensitivity_at_fp"]["1"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=count(1), default=100)
    parser.add_argument("--peaks", type=count(1), default=4)
    parser.add_argument("--seed", type=count(0), default=0)
    parser.add_argument("--upsample", choices=UPSAMPLE_MODES, default="aligned")
    parser.add_argument("--predictions", help="folder of <case_id>.npz files instead of synthetic")
    args = parser.parse_args()
    if args.predictions:
        cases = [read_case(path) for path in list_cases(args.predictions)]
    else:
        rng = np.random.default_rng(args.seed)
        cases = [synthetic_case(rng, i, args.peaks, args.upsample) for i in range(args.patients)]
    grouped = froc_numbers(cases, local_maxima)
    every_pixel = froc_numbers(cases, every_window_max_pixel)
    if args.predictions:
        patients = len({case.patient_id for case in cases})
        result = {"predictions": args.predictions, "cases": len(cases), "patients": patients}
    else:
        result = {"patients": args.patients, "peaks": args.peaks, "seed": args.seed}
        result["upsample"] = args.upsample
    result |= {"one_per_flat_maximum": grouped, "every_window_max_pixel": every_pixel}
    result |= result_line.provenance()
    print(json.dumps(result))


if __name__ == "__main__":
    run_main(main)
