"""`focalnet predict`: a trained model on a new exam (DICOM, MHA or NIfTI components).

The exam goes through the run's own preprocessing (the settings recorded with the run, else those
of its training store), the model (or the ensemble of models, with optional flip TTA:
evaluation/ensemble.py) gives P(class >= k) on every slice of the 80 mm crop, and the outputs are:
- `lesion_score.nii.gz` (P(class >= 1)) and `cspca_score.nii.gz` (P(class >= 2)): the crop maps
  resampled (linear) back onto the T2w grid, so they open on top of the T2w series in 3D Slicer or
  ITK-SNAP (0 outside the crop, and on T2w slices that a component does not cover: those are not
  predicted, `coverage.covered_slices`);
- `detection_map.nii.gz`: the PI-CAI detection map of `cspca_score` (evaluation/detection_map.py);
- `detections.csv`: the 2D local maxima (docs/evaluation.md) with s1 >= threshold: LPS world
  coordinates, the T2w voxel holding the point, the crop slice/row/column, the lesion score and
  P(GS >= 3+4), P(GS >= 4+3), P(GS >= 8), P(GS >= 9);
- `overlay.png`: the T2w crop slices of the highest detections with the score map and crosses;
- `models.json`: the runs (and checkpoint steps) that made the prediction, and the TTA;
- with `dicom` (a DICOM T2w): `detections_seg.dcm`, the detection map's candidates as a DICOM
  Segmentation, and `score_map.dcm`, the csPCa score as a DICOM Parametric Map, on the T2w
  source frames (evaluation/dicom_output.py).
The files are written to a temporary folder beside the output folder, which then replaces it whole
(`atomic_files.replaced_folder`), so a reader finds every old file or every new one, never a mix.
An output folder holding anything else than these files is refused (`check_exam_out`): replacing it
would delete that.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from focalnet_jax.data import preprocess_case
from focalnet_jax.data.atomic_files import (
    check_output_folder,
    foreign_entries,
    replaced_folder,
    write_json_atomic,
)
from focalnet_jax.data.image_writing import write_image
from focalnet_jax.errors import UserError
from focalnet_jax.evaluation import figures
from focalnet_jax.evaluation.detection_map import CandidateSettings, detection_map_image
from focalnet_jax.evaluation.dicom_output import (
    SCORE_MAP_FILE,
    SEG_FILE,
    dicom_sources,
    write_dicom_outputs,
)
from focalnet_jax.evaluation.ensemble import Ensemble, load_ensemble
from focalnet_jax.evaluation.inference import check_scores
from focalnet_jax.evaluation.localization import MIN_SCORE, RADIUS_MM, local_maxima
from focalnet_jax.evaluation.partial_output import recorded_settings
from focalnet_jax.evaluation.predictions import MODELS_FILE

log = logging.getLogger(__name__)

CSV_COLUMNS = (
    "detection",
    "x_lps_mm",
    "y_lps_mm",
    "z_lps_mm",
    "t2w_i",
    "t2w_j",
    "t2w_k",
    "crop_slice",
    "crop_row",
    "crop_col",
    "lesion_score",
    "p_gs_ge_3+4",
    "p_gs_ge_4+3",
    "p_gs_ge_8",
    "p_gs_ge_9",
)
OVERLAY_SLICES = 4
OUTPUT_FILES = (
    "lesion_score.nii.gz",
    "cspca_score.nii.gz",
    "detection_map.nii.gz",
    "detections.csv",
    "overlay.png",
    MODELS_FILE,
)
DICOM_FILES = (SEG_FILE, SCORE_MAP_FILE)  # with `dicom`


def check_exam_out(out_dir: str | Path) -> None:
    """Refuses (one-line `UserError`) an output folder holding anything but `OUTPUT_FILES` and
    `DICOM_FILES`: one exam's outputs replace that folder whole, which would delete the rest."""
    out_dir = Path(out_dir)
    check_output_folder(out_dir)
    if strays := foreign_entries(out_dir, lambda name: name in OUTPUT_FILES + DICOM_FILES):
        more = f" (and {len(strays) - 1} more)" if len(strays) > 1 else ""
        raise UserError(
            f"--out {out_dir} holds {strays[0]}{more}, which focalnet predict does not write: one "
            "exam's outputs replace that folder whole; choose a folder of their own"
        )


def _exam_name(t2w_path: str) -> str:
    """'exam_t2w' for a DICOM folder `exam/t2w`, else the file name without extensions."""
    path = Path(t2w_path)
    if path.is_dir():
        return f"{path.resolve().parent.name}_{path.name}"
    return path.name.split(".")[0]


def crop_to_t2w(volume: np.ndarray, geometry, t2w: sitk.Image) -> sitk.Image:
    """A crop-grid volume `[S, H, W]` (every T2w slice) resampled linearly onto the T2w grid `t2w`
    (`geometry.t2w_reference_image()`); T2w slices outside `geometry.slice_index` hold 0."""
    image = sitk.GetImageFromArray(np.asarray(volume, np.float32))
    image.CopyInformation(geometry.reference_image(volume.shape[0]))
    resampled = sitk.Resample(image, t2w, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    # Crop slices lie on the T2w slices, but a T2w voxel's continuous slice index is off by
    # rounding (~1e-15 on an oblique grid), which leaks ~1e-16 of a predicted slice into its
    # neighbours: slices that were not predicted are set to exactly 0.
    values = sitk.GetArrayFromImage(resampled)
    values[np.setdiff1d(np.arange(len(values)), geometry.slice_index)] = 0.0
    out = sitk.GetImageFromArray(values)
    out.CopyInformation(resampled)
    return out


def predict_exam(
    workdir: str | Path | Sequence[str | Path] | Ensemble,
    components: Mapping[str, str | Path],
    out_dir: str | Path,
    *,
    step: int | None = None,
    center=None,
    mask: str | Path | None = None,
    series: Mapping[str, str] | None = None,
    threshold: float = 0.5,
    batch_size: int = 16,
    radius_mm: float = RADIUS_MM,
    min_score: float = MIN_SCORE,
    tta: str = "none",
    candidates: CandidateSettings | None = None,
    dicom: bool = False,
) -> list[Path]:
    """Runs the model of `workdir` (runs or cross-validation folders: their ensemble, or an
    `Ensemble` already loaded) on one exam; `out_dir` becomes a folder of the files listed in the
    module docstring (replacing a folder of earlier ones whole, refusing one that holds anything
    else: `check_exam_out`); returns their paths. `components` maps names ('t2w', 'adc', 'hbv',
    'dce', ...) to paths; T2w (the grid of the outputs) and the model's components must all be
    present, in any order. `series` maps names to the SeriesInstanceUID or SeriesDescription to
    read from a DICOM folder holding several. `dicom`: also the DICOM outputs (a T2w image
    file is a `CaseError`, raised before the model runs)."""
    models = workdir
    check_exam_out(out_dir)
    if not isinstance(models, Ensemble):
        models = load_ensemble(workdir, step=step, batch_size=batch_size, tta=tta)
    missing = [c for c in models.components if c not in components]
    if missing:
        raise UserError(
            f"exam lacks component(s) {missing} that the model(s) "
            f"{', '.join(map(str, models.runs))} need "
            f"(they read {list(models.components)}, T2w as the reference grid; given "
            f"{list(components)})"
        )
    if unused := [c for c in components if c not in models.components]:
        log.warning(
            "component(s) %s of the exam not used: the model(s) were trained on %s",
            unused,
            list(models.components),
        )
    ordered = {name: str(components[name]) for name in models.components}
    case_id = _exam_name(ordered[models.components[0]])
    case = preprocess_case(
        ordered,
        center=center,
        mask=None if mask is None else str(mask),
        slices="covered",
        series=series,
        config=models.preprocess,
        case_id=case_id,
    )
    sources = None
    if dicom:
        grid = case.geometry.t2w_reference_image()
        sources = dicom_sources(case_id, ordered["t2w"], (series or {}).get("t2w"), grid)
    scores = models(case.images)
    check_scores(models, case_id, case.images, scores)
    grades = grade_outputs(models)
    # Written beside out_dir, which it then replaces whole: a failure changes nothing there.
    with replaced_folder(out_dir, "focalnet predict") as tmp:
        written = write_exam_outputs(
            case,
            scores,
            tmp,
            grades=grades,
            threshold=threshold,
            radius_mm=radius_mm,
            min_score=min_score,
            candidates=candidates,
            dicom_sources=sources,
        )
        settings = recorded_settings(
            models.describe(),
            threshold,
            candidates or CandidateSettings(),
            dicom=dicom,
            preprocess=models.input_preprocess,
            configs=models.inference_configs,
        )
        written.append(write_json_atomic(settings, tmp / MODELS_FILE))
        check_exam_out(out_dir)  # again: a file put there meanwhile is refused, never deleted
    return [Path(out_dir) / path.name for path in written]


def grade_outputs(models: Ensemble) -> bool:
    """Whether `models` predict grades; a model of lesion against no lesion (output encoding
    'binary', e.g. configs/unet_sing.py) does not, which a warning says: its csPCa score, the
    detection map and score_map.dcm repeat the lesion score, and detections.csv leaves its GS
    columns empty."""
    if models.output_encoding != "binary":
        return True
    log.warning(
        "the model(s) %s predict lesion against no lesion only (output encoding 'binary'): "
        "cspca_score, the detection map and score_map.dcm hold the lesion score, not a grade's, "
        "and the GS columns of detections.csv are left empty",
        ", ".join(map(str, models.runs)),
    )
    return False


def write_exam_outputs(
    case,
    scores: np.ndarray,
    out_dir: str | Path,
    *,
    grades: bool = True,
    threshold: float = 0.5,
    radius_mm: float = RADIUS_MM,
    min_score: float = MIN_SCORE,
    candidates: CandidateSettings | None = None,
    dicom_sources: list | None = None,
) -> list[Path]:
    """The files of the module docstring for a `PreprocessedCase` (T2w slices `case.slice_index`;
    the maps hold 0 on the others) and its scores float32 `[S, H, W, 5]`, written to `out_dir`;
    returns their paths. `grades`: False for a model without grades (`grade_outputs`), whose GS
    columns of detections.csv are left empty. `dicom_sources`: the T2w series' datasets
    (`dicom_output.dicom_sources`), given for `score_map.dcm` and `detections_seg.dcm` (where the
    map holds a candidate)."""
    t2w = case.geometry.t2w_reference_image()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    every_slice = np.zeros((t2w.GetSize()[2], *scores.shape[1:3]), np.float32)
    maps = {}
    for name, channel in (("lesion_score", 0), ("cspca_score", 1)):
        every_slice[case.slice_index] = scores[..., channel]
        maps[name] = crop_to_t2w(every_slice, case.geometry, t2w)
    maps["detection_map"] = detection_map_image(
        maps["cspca_score"], candidates or CandidateSettings()
    )
    written = []
    for name, image in maps.items():
        written.append(write_image(image, out_dir / f"{name}.nii.gz"))

    detections = local_maxima(scores, case.spacing, radius_mm=radius_mm, min_score=min_score)
    shown = detections.scores[:, 0] >= threshold
    detections_csv = out_dir / "detections.csv"
    written.append(write_detections(detections_csv, case, detections, shown, t2w, grades))
    written.append(overlay(out_dir / "overlay.png", case, scores, detections, shown))
    if dicom_sources is not None:
        written += write_dicom_outputs(out_dir, maps, dicom_sources, case.case_id, grades)
    log.info("%d detections with score >= %g", int(shown.sum()), threshold)
    return written


def write_detections(
    path: Path, case, detections, shown: np.ndarray, t2w: sitk.Image, grades: bool = True
) -> Path:
    """`detections.csv` (`CSV_COLUMNS`) of the detections where `shown`, numbered from 1; without
    `grades` the GS columns are empty."""
    rows = []
    for n, i in enumerate(np.flatnonzero(shown), 1):
        s, r, c = int(detections.slice[i]), int(detections.row[i]), int(detections.col[i])
        world = case.pixel_to_world(s, r, c)
        voxel = _nearest_t2w_voxel(t2w, world)
        p = [f"{v:.4f}" for v in detections.scores[i]]
        p = p if grades else [p[0], *[""] * (len(p) - 1)]
        rows.append([n, *(f"{v:.4f}" for v in world), *voxel, s, r, c, *p])
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        writer.writerows(rows)
    return path


def _nearest_t2w_voxel(t2w: sitk.Image, world) -> list[int]:
    """(i, j, k): the T2w voxel nearest the LPS point `world` (mm), which coverage puts within half
    a voxel (and 1e-4 of rounding) past the T2w's outermost voxel centres: a point on a voxel's
    outer face is held by that voxel, not by the index past it that ITK's rounding gives."""
    index = np.floor(np.asarray(t2w.TransformPhysicalPointToContinuousIndex(world)) + 0.5)
    return np.clip(index, 0, np.asarray(t2w.GetSize()) - 1).astype(int).tolist()


def overlay(path: Path, case, scores: np.ndarray, detections, shown: np.ndarray) -> Path:
    """`overlay.png`: the T2w crop slices of the highest shown detections (else the slice with the
    highest lesion score), with the score map and the detections."""
    t2w_crop = np.clip(case.images[..., 0], 0.0, 1.0)
    if shown.any():
        order = detections.slice[shown]
        slices = list(dict.fromkeys(order.tolist()))[:OVERLAY_SLICES]
    else:
        slices = [int(np.argmax(scores[..., 0].max(axis=(1, 2))))]
    panels = []
    centre = (case.images.shape[1] - 1) / 2
    for z in slices:
        on = shown & (detections.slice == z)
        # DICOM viewers number images by InstanceNumber, which may run opposite to the T2w index
        # k: the title gives k (0-based, as `t2w_k`) and the head-foot position of the slice.
        z_mm = case.pixel_to_world(z, centre, centre)[2]
        panels.append(
            figures.OverlayPanel(
                title=f"{case.case_id}\nT2w k={int(case.slice_index[z])} (0-based), "
                f"centre z={z_mm:.1f} mm",
                t2w=t2w_crop[z],
                score=scores[z, ..., 0],
                points=np.stack([detections.row[on], detections.col[on]], axis=1),
                point_scores=detections.scores[on, 0],
            )
        )
    return figures.overlay_figure(path, panels)
