"""What the `focalnet evaluate` / `focalnet summarize` tests share: predictions files of score
blobs (`write_blob_case`), a five-case cohort of them (`write_cohort`), and the `evaluate` command
line (`_evaluate_argv`) and call (`_evaluate_fold`, with `cli_calls.run_cli`)."""

from __future__ import annotations

import json

import numpy as np
from cli_calls import run_cli

from focalnet_jax.evaluation.predictions import write_case

SHAPE = (8, 48, 48)


def blob(center, sigma=3.0, peak=1.0):
    """A 2D Gaussian on the centre slice only (one local maximum, one 3D candidate)."""
    z, y, x = center
    rows, cols = np.indices(SHAPE[1:], dtype=np.float64)
    volume = np.zeros(SHAPE)
    volume[z] = peak * np.exp(-0.5 * ((rows - y) ** 2 + (cols - x) ** 2) / sigma**2)
    return volume


def write_blob_case(out_dir, case_id, *, lesion=None, blobs=(), with_images=True, patient=None):
    """lesion: (class, (z, y, x)) a 3 x 7 x 7 lesion; blobs: ((z, y, x), peak) score blobs with
    P(class >= k) = peak * 0.8^(k-1) at the centre; patient: its patient id (patient-<case>)."""
    lesions = np.zeros(SHAPE, np.int32)
    classes = []
    if lesion is not None:
        cls, (z, y, x) = lesion
        lesions[z - 1 : z + 2, y - 3 : y + 4, x - 3 : x + 4] = 1
        classes = [cls]
    s = np.zeros(SHAPE)
    for center, peak in blobs:
        s = np.maximum(s, blob(center, peak=peak))
    scores = np.stack([s * 0.8**k for k in range(5)], axis=-1)
    images = {}
    if with_images:
        images = {"t2w": 0.3 + 0.4 * s, "adc": 0.6 - 0.4 * s}
    return write_case(
        out_dir,
        case_id,
        scores=scores,
        lesions=lesions,
        lesion_classes=classes,
        spacing=(0.625, 0.625),
        patient_id=patient or f"patient-{case_id}",
        slice_index=np.arange(SHAPE[0]) + 3,
        **images,
    )


def write_cohort(out_dir, shift=0.0):
    """Five cases: a hit csPCa, a missed csPCa (and a FP), two negatives with FPs, one GS 3+3."""
    write_blob_case(out_dir, "c1", lesion=(3, (4, 20, 20)), blobs=[((4, 20, 20), 0.9 - shift)])
    write_blob_case(out_dir, "c2", lesion=(2, (3, 12, 30)), blobs=[((5, 35, 10), 0.6 + shift)])
    write_blob_case(out_dir, "c3", blobs=[((4, 24, 24), 0.3 + shift)])
    write_blob_case(out_dir, "c4", blobs=[((2, 30, 30), 0.7 - shift)], with_images=False)
    write_blob_case(out_dir, "c5", lesion=(1, (4, 24, 24)), blobs=[((4, 24, 24), 0.5)])


def _evaluate_argv(predictions, out, *extra):
    return ["evaluate", "--predictions", str(predictions), "--out", str(out), "--no-picai",
            "--no-figures", *extra]  # fmt: skip


def _evaluate_fold(predictions_dir, out, runs, shift=0.0, tta="none"):
    """evaluate of a cohort whose predictions say (models.json) they were made by `runs`."""
    write_cohort(predictions_dir, shift)
    models = {"models": [{"run": r, "step": 2} for r in runs], "tta": tta}
    (predictions_dir / "models.json").write_text(json.dumps(models))
    run_cli(["evaluate", "--predictions", str(predictions_dir), "--out", str(out), "--no-picai",
             "--no-figures"])  # fmt: skip
