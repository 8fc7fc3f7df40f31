"""One case from image files to training-ready crop slices (paper section II-D1/D2; docs/data.md).

Every component and the label are resampled once, straight from their own grid onto the crop grid
(80 x 80 mm in the T2w slice plane, 128 x 128 pixels, the T2w slices) through physical coordinates
with the identity transform: the paper's rigid registration by scanner coordinates, without a second
interpolation through the full T2w grid.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import SimpleITK as sitk

from focalnet_jax.data import coverage, intensity, io
from focalnet_jax.data.frame_of_reference import check_one_frame_of_reference
from focalnet_jax.data.geometry import CropGeometry, display_axes, not_axial
from focalnet_jax.data.io import CaseError, check_distinct, check_placed, read_image, zyx
from focalnet_jax.data.lesions import gland_dice, index_lesion, instance_classes, label_instances
from focalnet_jax.data.preprocess_config import INTERPOLATORS, PreprocessConfig

SLICE_MODES = ("all", "annotated", "covered")


@dataclass
class PreprocessedCase:
    """Crop slices of one case. Arrays are (slice, row, column); S slices, C components.

    images float32 [S,128,128,C] (component order as given; T2w unclipped),
    classes int32 [S,128,128], grade_known uint8 [S,128,128] (0 on lesions of unknown grade),
    lesions int32 [S,128,128] (instance ids, 0 background), lesion_classes int32 [L] (class of
    instance i + 1), lesion_grade_known bool [L], index_lesion (instance id of the index lesion,
    0 without lesions), slice_index int32 [S] (T2w slice of each crop slice), annotated bool [S]
    (slice holds a lesion), spacing (row, col) mm.
    """

    case_id: str
    components: tuple[str, ...]
    images: np.ndarray
    classes: np.ndarray
    grade_known: np.ndarray
    lesions: np.ndarray
    lesion_classes: np.ndarray
    lesion_grade_known: np.ndarray
    index_lesion: int
    slice_index: np.ndarray
    annotated: np.ndarray
    spacing: tuple[float, float]
    geometry: CropGeometry
    center: tuple[float, float, float]
    center_source: str
    t2w_reference: dict = field(default_factory=dict)
    gland_dice: float | None = None  # lesions vs prostate mask (`lesions.gland_dice`)

    def pixel_to_world(self, s, row, col):
        """Crop pixel (s, row, col) -> LPS world (x, y, z) mm; `s` indexes the returned slices."""
        return self.geometry.pixel_to_world(s, row, col)

    def world_to_pixel(self, x, y, z):
        """LPS world (x, y, z) mm -> crop (s, row, col), floats."""
        return self.geometry.world_to_pixel(x, y, z)


def _corners_world(image: sitk.Image) -> np.ndarray:
    size = np.asarray(image.GetSize(), dtype=float)
    corners = (
        np.array(np.meshgrid(*[[-0.5, s - 0.5] for s in size], indexing="ij")).reshape(3, -1).T
    )
    return np.array([image.TransformContinuousIndexToPhysicalPoint(tuple(c)) for c in corners])


def _overlaps(image: sitk.Image, t2w: sitk.Image) -> bool:
    """Whether the physical extents intersect (tested in the T2w index frame)."""
    index = np.array(
        [t2w.TransformPhysicalPointToContinuousIndex(tuple(p)) for p in _corners_world(image)]
    )
    lo, hi = index.min(0), index.max(0)
    size = np.asarray(t2w.GetSize(), dtype=float)
    return bool(np.all(hi > -0.5) and np.all(lo < size - 0.5))


def _resample(
    image: sitk.Image, reference: sitk.Image, interpolator, pixel=sitk.sitkFloat32, extend=False
):
    """`extend`: crop pixels just outside the image (within `coverage.MARGIN_VOXELS`) take the
    nearest voxel instead of 0."""
    out = sitk.Resample(image, reference, sitk.Transform(), interpolator, 0.0, pixel, extend)
    return sitk.GetArrayFromImage(out)


# What ITK gives an image whose header lacks a field: (value, as the error words it)
_DEFAULT_GEOMETRY = {
    "GetOrigin": ((0.0, 0.0, 0.0), "origin (0, 0, 0)"),
    "GetSpacing": ((1.0, 1.0, 1.0), "spacing (1 mm voxels)"),
    "GetDirection": (tuple(np.eye(3).ravel()), "direction (identity)"),
}


def _check_has_geometry(image: sitk.Image, t2w: sitk.Image, case: str, path, what: str) -> None:
    """Refuses a label or mask with the T2w's voxel counts whose origin, spacing or direction is
    the default one where the T2w's is not: what an array saved without its image's header, or
    with only part of it copied, gets; or a NIfTI without orientation off the T2w grid. It would
    be resampled through that wrong geometry (lesions lost, or moved to other slices without a
    word)."""
    io.check_placed_on_t2w(image, path, t2w, case, what)
    if image.GetSize() != t2w.GetSize():
        return
    lost = [  # within the tolerance of one grid (`io.GRID_ATOL`): float noise passes
        words
        for get, (default, words) in _DEFAULT_GEOMETRY.items()
        if np.allclose(getattr(image, get)(), default, atol=io.GRID_ATOL)
        and not np.allclose(getattr(image, get)(), getattr(t2w, get)(), atol=io.GRID_ATOL)
    ]
    if lost:
        raise CaseError(
            case,
            path,
            f"{what} has the T2w's {' x '.join(map(str, t2w.GetSize()))} voxels but the default "
            f"{' and '.join(lost)} where the T2w's differs: saved without (all of) the image "
            "header? Copy the T2w's origin, spacing and direction into it (SimpleITK "
            "CopyInformation)",
        )


def _check_slices(image: sitk.Image, t2w: sitk.Image, case: str, path, what: str) -> None:
    """Refuses a label or mask of a single slice (the T2w holds two or more): a partial export,
    whose other T2w slices would read as empty (their lesions stored as background)."""
    if image.GetSize()[2] < 2:
        size = " x ".join(map(str, image.GetSize()))
        raise CaseError(
            case,
            path,
            f"{what} has a single slice ({size} voxels) where the T2w has "
            f"{t2w.GetSize()[2]}: a broken or partial export (the other T2w slices would read as "
            f"empty); save the {what} over the whole T2w volume",
        )


# Distinct values of a mask: 0/1 gland, or small zonal label maps (0, 1, 2, ...).
MAX_MASK_LABELS = 8


def _check_label_map(mask: sitk.Image, case: str, path, what: str) -> None:
    """Refuses a mask that is not a label map of at most `MAX_MASK_LABELS` integers in 0..255 (an
    image given as the mask, e.g. the T2w, would centre the crop on all its voxels above 0)."""
    values = np.unique(sitk.GetArrayViewFromImage(mask))
    lo, hi = float(values[0]), float(values[-1])
    integers = bool(np.all(values == np.round(values)))
    if integers and lo >= 0 and hi <= 255 and len(values) <= MAX_MASK_LABELS:
        return
    found = f"{len(values)} distinct values (min {lo}, max {hi})"
    if not integers:
        found += ", not all integers"
    raise CaseError(
        case,
        path,
        f"{what} holds {found}: an image, not a label map (at most {MAX_MASK_LABELS} integer "
        "labels in 0..255, 0 the background)",
    )


def _center_of(mask: sitk.Image, mask_path, case, t2w: sitk.Image) -> tuple | None:
    """LPS centroid (mm) of the nonzero voxels of `mask` (read from `mask_path`), None when it
    has none."""
    _check_slices(mask, t2w, case, mask_path, "prostate mask")
    _check_has_geometry(mask, t2w, case, mask_path, "prostate mask")
    _check_label_map(mask, case, mask_path, "prostate mask")
    voxels = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)
    if len(voxels) == 0:
        return None
    return mask.TransformContinuousIndexToPhysicalPoint(
        tuple(float(v) for v in zyx(voxels.mean(0)))
    )


def _crop_centre(
    t2w: sitk.Image, gland: sitk.Image | None, mask, center, case: str, t2w_path
) -> tuple[tuple, str]:
    """LPS crop centre (mm) and its source: centroid of the gland mask `gland` (read from the file
    `mask`), given centre, or T2w centre. A mask centroid or given centre outside the T2w volume
    is refused (a wrong mask or centre, e.g. RAS for LPS), naming the mask or the T2w file."""
    if gland is not None:
        centre = _center_of(gland, mask, case, t2w)
        if centre is None:
            raise CaseError(case, mask, "prostate mask is empty")
        _check_inside(t2w, centre, case, mask, "prostate mask centroid")
        return centre, "mask"
    if center is not None:
        centre = tuple(float(c) for c in center)
        _check_inside(t2w, centre, case, t2w_path, "given crop centre")
        return centre, "given"
    middle = tuple((s - 1) / 2.0 for s in t2w.GetSize())
    return t2w.TransformContinuousIndexToPhysicalPoint(middle), "t2w_centre"


def _check_inside(t2w: sitk.Image, point, case: str, file, what: str) -> None:
    """Refuses an LPS `point` (mm) outside the T2w volume (its voxels' outer faces)."""
    index = np.asarray(t2w.TransformPhysicalPointToContinuousIndex(tuple(point)))
    size = np.asarray(t2w.GetSize(), np.float64)
    if np.all(index >= -0.5) and np.all(index <= size - 0.5):
        return
    corners = _corners_world(t2w)
    lo, hi = corners.min(0), corners.max(0)
    extent = ", ".join(f"{a:.1f}..{b:.1f}" for a, b in zip(lo, hi, strict=True))
    raise CaseError(
        case,
        file,
        f"{what} ({', '.join(f'{v:.1f}' for v in point)}) mm LPS lies outside the T2w volume "
        f"(x, y, z extent {extent} mm; T2w voxel index {', '.join(f'{v:.1f}' for v in index)})",
    )


def _t2w_reference(images, components, cfg, case, centre, bladder_mask) -> intensity.T2wReference:
    """Air and bladder intensities of the T2w (the first component), raw scanner units. A given
    bladder mask is taken onto the T2w grid by nearest neighbour (through physical coordinates,
    as the label). The bladder search runs with rows along the T2w axis nearest
    anterior-posterior (a T2w stored transposed is transposed back)."""
    name = next(iter(components))
    t2w = images[name]
    raw = sitk.GetArrayViewFromImage(t2w)
    bladder = None
    if bladder_mask is not None:
        bladder_image = read_image(bladder_mask, case=case)
        _check_slices(bladder_image, t2w, case, bladder_mask, "bladder mask")
        _check_label_map(bladder_image, case, bladder_mask, "bladder mask")
        _check_has_geometry(bladder_image, t2w, case, bladder_mask, "bladder mask")
        if not _overlaps(bladder_image, t2w):  # resampled, it would be "empty"
            raise CaseError(
                case, bladder_mask, "bladder mask does not overlap the T2w field of view"
            )
        bladder = _resample(bladder_image, t2w, sitk.sitkNearestNeighbor) > 0
        if not bladder.any():  # else the bladder would be searched for, the mask ignored
            raise CaseError(case, bladder_mask, "bladder mask is empty")
    ci, cj, _ = t2w.TransformPhysicalPointToContinuousIndex(tuple(centre))
    spacing, center_yx = zyx(t2w.GetSpacing()), (cj, ci)
    axes = display_axes(t2w.GetDirection())
    row_sign = axes[3]
    if axes[0] == 0:  # crop columns run along T2w j: rows (array axis 1) run left-right
        raw = raw.transpose(0, 2, 1)
        bladder = None if bladder is None else bladder.transpose(0, 2, 1)
        spacing, center_yx, row_sign = (spacing[0], spacing[2], spacing[1]), (ci, cj), axes[1]
    try:
        return intensity.t2w_reference(
            raw,
            spacing,
            air_percentile=cfg.t2w_air_percentile,
            fallback_percentile=cfg.t2w_fallback_percentile,
            bladder_mask=bladder,
            case=case,
            center_yx=center_yx,
            anterior_sign=float(row_sign),
            max_cv=cfg.bladder_max_cv,
            min_volume_ml=cfg.bladder_min_volume_ml,
        )
    except intensity.BladderMaskError as err:
        raise CaseError(case, bladder_mask, str(err)) from err
    except ValueError as err:
        raise CaseError(case, components[name], str(err)) from err


def _normalised_channels(images, components, reference, cfg, case, centre, bladder_mask):
    """Each component resampled once onto the crop grid and normalised: float32 `[Z, H, W]` per
    component, and the T2w reference as a dict (air, bladder, source)."""
    interpolator = INTERPOLATORS[cfg.interpolator]
    names = list(components)
    channels, t2w_reference = [], {}
    for name in names:
        crop = _resample(images[name], reference, interpolator, extend=True)
        if name == names[0]:
            t2 = _t2w_reference(images, components, cfg, case, centre, bladder_mask)
            t2w_reference = {"air": t2.air, "bladder": t2.bladder, "source": t2.source}
            channels.append(intensity.normalise_t2w(crop, t2))
            continue
        raw = sitk.GetArrayViewFromImage(images[name])
        if name == "adc":
            problem = intensity.adc_unit_problem(raw)
            if problem:
                raise CaseError(case, components[name], problem)
            channels.append(intensity.normalise_adc(crop, *cfg.adc_range))
        else:
            lo, hi = intensity.percentile_range(raw, *cfg.percentiles)
            if hi <= lo + 1e-6:  # blank: would be stored as 0 everywhere, the normal-tissue value
                low, high = cfg.percentiles
                raise CaseError(
                    case,
                    components[name],
                    f"{name} is constant between its percentiles {low:g} and {high:g} "
                    f"({lo:g}): a blank series?",
                )
            channels.append(intensity.normalise_percentiles(crop, lo, hi))
    return channels, t2w_reference


def _crop_label(label, mask, t2w: sitk.Image, reference: sitk.Image, shape, cfg, case: str):
    """The label (`mask`: the case's gland mask file, or None) on the crop grid: (classes int32,
    grade_known uint8, lesions int32) `[Z, H, W]` and per lesion instance (lesion_classes int32
    `[L]`, lesion_grade_known bool `[L]`)."""
    if label is None:
        zeros = np.zeros(shape, np.int32)
        empty = np.zeros(0, np.int32)
        return zeros, np.ones(shape, np.uint8), zeros.copy(), empty, empty.astype(bool)
    label_image = io.read_label(label, case=case, label_values=cfg.label_values, mask=mask)
    _check_slices(label_image, t2w, case, label, "label")
    _check_has_geometry(label_image, t2w, case, label, "label")
    if not _overlaps(label_image, t2w):
        raise CaseError(case, label, "label does not overlap the T2w field of view")
    raw_label = sitk.GetArrayFromImage(label_image)
    if not np.array_equal(raw_label, np.round(raw_label)):
        raise CaseError(case, label, "label holds non-integer values")
    instances, values = label_instances(raw_label.astype(np.int64), case, label)
    inst_image = sitk.GetImageFromArray(instances)
    inst_image.CopyInformation(label_image)
    lesions = _resample(inst_image, reference, sitk.sitkNearestNeighbor, sitk.sitkInt32)
    lost = sorted(set(range(1, len(values) + 1)) - set(np.unique(lesions).tolist()))
    if lost:
        where = "; ".join(
            _lost_lesion(instances, k, values[k - 1], label_image, reference, cfg) for k in lost[:3]
        )
        raise CaseError(
            case, label, f"{len(lost)} of {len(values)} lesions lost by resampling onto the crop "
            f"({where}{'; ...' if len(lost) > 3 else ''})",
        )  # fmt: skip
    lesion_classes, lesion_grade_known = instance_classes(values, cfg.label_values)
    lut_class = np.concatenate([[0], lesion_classes]).astype(np.int32)
    lut_known = np.concatenate([[True], lesion_grade_known]).astype(np.uint8)
    return lut_class[lesions], lut_known[lesions], lesions, lesion_classes, lesion_grade_known


def _lost_lesion(instances, k: int, value: int, label: sitk.Image, reference: sitk.Image, cfg):
    """Where lesion `k` of the instance map `instances` [z, y, x] (of label value `value`, on the
    grid of `label`) lies against the crop grid `reference` that lost it, and why it was lost:
    beyond the T2w's slices, outside the square crop, or missed between the crop's sample
    points (between two T2w slices, or thinner than a crop pixel)."""
    centre = np.argwhere(instances == k).mean(axis=0)[::-1]  # its voxels' centre, x, y, z
    world = label.TransformContinuousIndexToPhysicalPoint(centre.tolist())
    index = reference.TransformPhysicalPointToContinuousIndex(world)
    inside = [-0.5 <= i <= n - 0.5 for i, n in zip(index, reference.GetSize(), strict=True)]
    why = "between the crop's sample points: between two T2w slices or thinner than a crop pixel"
    if not inside[2]:
        why = "beyond the T2w's slices"
    elif not all(inside[:2]):
        why = f"outside the {cfg.crop_mm:g} mm crop"
    at = ", ".join(f"{v:.1f}" for v in world)
    return f"label value {value} centred at ({at}) mm: {why}"


def _read_components(
    components: Mapping[str, str | os.PathLike], case: str, series: Mapping[str, str]
) -> dict[str, sitk.Image]:
    """Every component's image (the chosen series of a DICOM folder); each must be its own file
    or series, hold two slices or more and be placed in scanner coordinates (`io.check_placed`),
    the first (T2w) must be an axial series and each other must overlap its field of view."""
    images = {
        name: read_image(path, case=case, series=series.get(name), component=name)
        for name, path in components.items()
    }
    check_distinct(components, series, case, images)  # after ImageType has said what is wrong
    for name, image in images.items():
        # One slice: a header thickness, no bladder reference (docs/data.md, "What is refused")
        if image.GetSize()[2] < 2:
            size = " x ".join(map(str, image.GetSize()))
            reason = f"{name} has a single slice ({size} voxels): a broken or partial export "
            reason += "(prostate MRI series hold about 20-30 slices); export the whole series"
            raise CaseError(case, components[name], reason)
    check_placed(images, components, case)
    t2w_name, t2w = next(iter(images.items()))
    if problem := not_axial(t2w.GetDirection()):
        raise CaseError(case, components[t2w_name], problem)
    for name, image in images.items():
        if name != t2w_name and not _overlaps(image, t2w):
            raise CaseError(
                case, components[name], f"{name} does not overlap the T2w field of view"
            )
    return images


def _case_name(components: Mapping, case_id: str | None, slices: str) -> str:
    """`case_id`, else the T2w (first component) file name without extension; refuses no
    components, components not led by `t2w` (the reference grid, normalised as T2w: another
    first component would take its place without a word) and an unknown `slices`."""
    if not components:
        raise CaseError(case_id or "?", None, "no components given")
    first = next(iter(components))
    t2w_path = components[first]
    case = case_id or os.path.basename(os.fspath(t2w_path)).split(".")[0]
    if first != "t2w":
        order = f"components {','.join(components)!r}: expected t2w first (the reference grid)"
        raise CaseError(case, t2w_path, order + ", e.g. {'t2w': ..., 'adc': ...}")
    if slices not in SLICE_MODES:
        raise CaseError(case, None, f"slices={slices!r}: expected one of {SLICE_MODES}")
    return case


def _crop_every_slice(
    images, components, label, mask, centre, source, bladder_mask, cfg: PreprocessConfig, case
) -> PreprocessedCase:
    """The case on the crop centred at `centre` (LPS mm; found from `source`) over every T2w
    slice: each component resampled once onto the crop grid and normalised, the label's lesion
    instances resampled by nearest neighbour with none lost."""
    t2w = images[next(iter(components))]
    geometry = CropGeometry.centred(t2w, centre, crop_mm=cfg.crop_mm, size=cfg.crop_size)
    reference = geometry.reference_image(t2w.GetSize()[2])
    channels, t2w_reference = _normalised_channels(
        images, components, reference, cfg, case, centre, bladder_mask
    )
    volume = np.stack(channels, axis=-1)
    labels = _crop_label(label, mask, t2w, reference, volume.shape[:3], cfg, case)
    classes, grade_known, lesions, lesion_classes, lesion_grade_known = labels
    return PreprocessedCase(
        case_id=case,
        components=tuple(components),
        images=volume,
        classes=classes,
        grade_known=grade_known,
        lesions=lesions,
        lesion_classes=lesion_classes,
        lesion_grade_known=lesion_grade_known,
        index_lesion=index_lesion(lesions, lesion_classes, geometry.spacing),
        slice_index=np.arange(len(volume), dtype=np.int32),
        annotated=(lesions > 0).any(axis=(1, 2)),
        spacing=(geometry.spacing, geometry.spacing),
        geometry=geometry,
        center=tuple(float(c) for c in centre),
        center_source=source,
        t2w_reference=t2w_reference,
    )


def _select_slices(case: PreprocessedCase, keep: np.ndarray) -> PreprocessedCase:
    """`case` (every T2w slice) restricted to the T2w slices `keep` [S]. `keep` must hold every
    slice with a lesion, so that `index_lesion` stays valid."""
    return replace(
        case,
        images=np.ascontiguousarray(case.images[keep], dtype=np.float32),
        classes=case.classes[keep],
        grade_known=case.grade_known[keep],
        lesions=case.lesions[keep],
        slice_index=keep.astype(np.int32),
        annotated=case.annotated[keep],
        geometry=case.geometry.with_slices(keep),
    )


def preprocess_case(
    components: Mapping[str, str | os.PathLike],
    label: str | os.PathLike | None = None,
    *,
    center=None,
    mask: str | os.PathLike | None = None,
    slices: str = "all",
    config=None,
    case_id: str | None = None,
    bladder_mask: str | os.PathLike | None = None,
    series: Mapping[str, str] | None = None,
) -> PreprocessedCase:
    """Preprocess one case (the steps of docs/data.md).

    Args:
      components: component name -> DICOM folder or image file, T2w first (the reference grid).
      label: class / ISUP map (0 background; `PreprocessConfig.label_values`), DICOM SEG, or None.
      center: LPS point (mm) to centre the crop on, used when `mask` is None.
      mask: whole-gland mask (image or DICOM SEG) whose centroid centres the crop.
      slices: 'all' (every T2w slice), 'annotated' (slices holding lesion labels) or 'covered'
        (the T2w slices every component covers: the others named in a warning).
      config: None, a `PreprocessConfig`, or a mapping of its fields.
      case_id: name used in errors and the store (default: the T2w file name).
      bladder_mask: optional bladder mask for the T2w upper reference.
      series: component name -> SeriesInstanceUID or exact SeriesDescription, choosing a series
        of a DICOM folder that holds several.
    Returns a `PreprocessedCase`; raises `CaseError` naming the case, the file and the reason.
    """
    cfg = PreprocessConfig.from_any(config)
    case = _case_name(components, case_id, slices)
    masks = {"label": label, "prostate mask": mask}
    check_distinct(masks, {}, case)  # e.g. --masks of labels
    # 1. Read; the T2w grid is the reference frame.
    images = _read_components(components, case, series or {})
    # Components among themselves were compared as read: this finds a label path pasted into a
    # component's column.
    check_distinct({**components, **masks}, series or {}, case)
    masks["bladder mask"] = bladder_mask
    check_one_frame_of_reference({**components, **masks}, series or {}, case)
    # 2. Crop centre: gland-mask centroid, else the given centre, else the T2w volume centre.
    t2w_name = next(iter(components))
    gland = io.read_mask(mask, case=case) if mask is not None else None
    centre, source = _crop_centre(images[t2w_name], gland, mask, center, case, components[t2w_name])
    # 3. Each component and the label resampled once onto the crop grid (every T2w slice).
    full = _crop_every_slice(
        images, components, label, mask, centre, source, bladder_mask, cfg, case
    )
    if gland is not None:  # a label that is the gland (judged per run); lesions outside it
        full = replace(full, gland_dice=gland_dice(full, gland, label, mask, case))
    # 4. The slices to store, each covered by every component.
    reference = full.geometry.reference_image(len(full.annotated))
    keep = coverage.kept_slices(images, components, reference, full.annotated, slices, case)
    return _select_slices(full, keep)
