"""PI-CAI detection maps: lesion candidates of the csPCa score on the T2w grid.

A detection map is the 3D volume picai_eval and the PI-CAI Grand Challenge read: non-overlapping
blobs, each filled with one value, its confidence, and 0 elsewhere. The candidates are extracted
from P(class >= 2) with `report_guided_annotation.extract_lesion_candidates`, the function the
PI-CAI baselines use; `CandidateSettings` holds its arguments with the library's defaults
(`dynamic-fast`: one threshold per case at max / 2.5, blobs of more than 10 voxels, 26-connected).
Voxel counts refer to the grid the map is extracted on: here the T2w series.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import math

import numpy as np
import SimpleITK as sitk

from focalnet_jax.errors import UserError

THRESHOLD_MODES = (
    "dynamic-fast",
    "dynamic-fast-mean",
    "dynamic",
    "dynamic-mean",
    "dynamic-v2",
    "dynamic-v2-mean",
)


def import_picai():
    """(extract_lesion_candidates, evaluate_case, Metrics, picai_eval version): the PI-CAI
    libraries, imported on first use; they print a banner on import, kept out of the output."""
    with contextlib.redirect_stdout(io.StringIO()):
        import picai_eval
        from picai_eval.eval import evaluate_case
        from picai_eval.metrics import Metrics
        from report_guided_annotation import extract_lesion_candidates
    version = getattr(picai_eval, "__version__", None)
    if version is None:
        from importlib.metadata import version as package_version

        version = package_version("picai_eval")
    return extract_lesion_candidates, evaluate_case, Metrics, version


@dataclasses.dataclass(frozen=True)
class CandidateSettings:
    """Arguments of `extract_lesion_candidates` (library defaults).

    threshold: one of THRESHOLD_MODES, or a fixed score in (0, 1) given as a string or number.
    min_voxels: blobs of at most this many voxels are dropped.
    num_lesions: most candidates extracted by the `dynamic*` modes but the `-fast` ones.
    dynamic_threshold_factor: a candidate extends down to its peak / factor (`dynamic-fast*`:
    the map's peak, one threshold for the case).
    """

    threshold: str = "dynamic-fast"
    min_voxels: int = 10
    num_lesions: int = 5
    dynamic_threshold_factor: float = 2.5

    def __post_init__(self):
        threshold = str(self.threshold)
        if threshold not in THRESHOLD_MODES:
            try:
                value = float(threshold)
            except ValueError:
                value = float("nan")
            if not 0.0 < value < 1.0:
                raise UserError(
                    f"candidate threshold {threshold!r}: expected one of {THRESHOLD_MODES} "
                    "or a score in (0, 1)"
                )
        factor = self.dynamic_threshold_factor  # NaN, inf: no threshold, and not JSON (models.json)
        if self.min_voxels < 0 or self.num_lesions < 1 or not 1 < factor < math.inf:
            raise UserError(
                f"candidate settings {self}: expected min_voxels >= 0, num_lesions >= 1, "
                "dynamic_threshold_factor > 1 and finite"
            )

    @classmethod
    def from_flags(cls, args) -> CandidateSettings:
        """The settings of parsed `add_candidate_flags` flags."""
        return cls(*(getattr(args, f"candidate_{flag}") for flag, _, _ in FLAGS))

    def library_threshold(self) -> str | float:
        threshold = str(self.threshold)
        return threshold if threshold in THRESHOLD_MODES else float(threshold)


def lesion_candidates(
    cspca: np.ndarray, settings: CandidateSettings = CandidateSettings()
) -> np.ndarray:
    """float32 detection map of the same shape as the csPCa score volume `cspca` (`[z, y, x]`,
    values in [0, 1]): each candidate blob holds its confidence (its peak score with the default
    `dynamic-fast`, its mean score with a `-mean` mode)."""
    extract_lesion_candidates = import_picai()[0]
    blobs = extract_lesion_candidates(
        np.asarray(cspca, np.float32),
        threshold=settings.library_threshold(),
        min_voxels_detection=settings.min_voxels,
        num_lesions_to_extract=settings.num_lesions,
        dynamic_threshold_factor=settings.dynamic_threshold_factor,
    )[0]
    return blobs.astype(np.float32)


def detection_map_image(
    cspca: sitk.Image, settings: CandidateSettings = CandidateSettings()
) -> sitk.Image:
    """The detection map of a csPCa score image, on the same grid (size, spacing, origin,
    direction)."""
    image = sitk.GetImageFromArray(lesion_candidates(sitk.GetArrayFromImage(cspca), settings))
    image.CopyInformation(cspca)
    return image


# `focalnet predict` flags, in `CandidateSettings` field order: (flag suffix, type, help).
FLAGS = (
    ("threshold", str, f"one of {', '.join(THRESHOLD_MODES)}, or a fixed score in (0, 1)"),
    ("min_voxels", int, "blobs of at most this many T2w voxels are dropped"),
    ("num_lesions", int, "dynamic(-v2)(-mean) modes, not -fast: most blobs extracted"),
    (
        "factor",
        float,
        "dynamic modes: blobs extend down to peak / factor (-fast: the map's peak; "
        "else each blob's)",
    ),
)


def add_candidate_flags(parser: argparse.ArgumentParser) -> None:
    """`--candidate-threshold`, `--candidate-min-voxels`, `--candidate-num-lesions` and
    `--candidate-factor`, defaulting to `CandidateSettings()` (the library's defaults)."""
    group = parser.add_argument_group("detection map (report_guided_annotation defaults)")
    defaults = dataclasses.astuple(CandidateSettings())
    for (flag, kind, text), default in zip(FLAGS, defaults, strict=True):
        group.add_argument(f"--candidate-{flag.replace('_', '-')}", type=kind, default=default,
                           help=f"{text} (default: {default})")  # fmt: skip
