"""Reading images with SimpleITK, and the one place where (z, y, x) meets SimpleITK's (x, y, z).

Every array in this package is indexed (z, y, x) = (slice, row, column), the order of
`sitk.GetArrayFromImage`. SimpleITK's sizes, spacings, origins and indices are (x, y, z); convert
only with `xyz` / `zyx` below.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from focalnet_jax.data import dicom, dicom_seg, metaimage_header, nifti_header, nrrd_header
from focalnet_jax.errors import UserError

# The ITK reader of each image suffix, named: ITK finds one by a lower-case suffix only (it reads
# a `.MHA` file with none).
_IMAGE_IO = {
    ".mha": "MetaImageIO",
    ".mhd": "MetaImageIO",
    ".nii": "NiftiImageIO",
    ".nii.gz": "NiftiImageIO",
    ".nrrd": "NrrdImageIO",
}
IMAGE_SUFFIXES = tuple(_IMAGE_IO)


class CaseError(UserError):
    """A case that cannot be preprocessed: names the case, the file and the reason."""

    def __init__(self, case: str, file: str | os.PathLike | None, reason: str):
        self.case, self.file, self.reason = str(case), str(file or ""), reason
        super().__init__(f"case {self.case!r}, file {self.file!r}: {reason}")


def xyz(zyx_values: Sequence) -> tuple:
    """(z, y, x) -> SimpleITK (x, y, z) order (or back: the reversal is its own inverse)."""
    return tuple(reversed(tuple(zyx_values)))


zyx = xyz


def _why(path: Path, err: RuntimeError) -> str:
    """The reason in an ITK read error, or how much of a MetaImage is missing. (ITK reports a
    truncated `.mha` as 'No such file or directory', a stale errno.)"""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    short = metaimage_header.shortfall(path)
    if short:
        return short
    useful = [line for line in lines if "No such file or directory" not in line]
    return useful[-1] if useful else "read error"


def _direction_problem(direction: Sequence[float]) -> str | None:
    """Why a 3 x 3 direction matrix (row-major) is no rotation or reflection, or None: its
    columns (the voxel axes in LPS) must be unit vectors at right angles, their Gram matrix the
    identity to 1e-2. DICOM cosines written to 3 decimals are off by up to ~2e-3 there; a scaled
    or sheared matrix (e.g. a MetaImage TransformMatrix holding the voxel size), which makes
    every size and the crop in mm wrong, is off by far more."""
    columns = np.reshape(np.asarray(direction, np.float64), (3, 3))
    gram = columns.T @ columns
    if np.abs(gram - np.eye(3)).max() <= 1e-2:
        return None
    length = np.sqrt(np.diag(gram))
    cosine = np.abs(gram / np.outer(length, length) - np.eye(3)).max()
    lengths = ", ".join(f"{v:.3g}" for v in length)
    return (
        f"direction matrix is no rotation: its axes have lengths {lengths} and cosines up to "
        f"{cosine:.3g} between them (want 1 and 0); every size and the crop in mm would be wrong"
    )


def _nearest_rotation(direction: Sequence[float]) -> tuple[float, ...]:
    """The rotation (or reflection) nearest a 3 x 3 direction matrix (row-major) that is one to
    rounding (`_direction_problem`): its polar factor, the matrix itself where it is one to 1e-6
    (NIfTI stores a rotation in float32: 2e-8 off; such a matrix, and the store built from it, stay
    as they were).
    A series' DICOM cosines are made orthonormal so too (`dicom_cosines`); NIfTI, in which the maps
    are written, holds no other direction (ITK's writer would put one of its own), so the maps
    and detections.csv place each voxel where the grid read placed it."""
    columns = np.reshape(np.asarray(direction, np.float64), (3, 3))
    if np.abs(columns.T @ columns - np.eye(3)).max() <= 1e-6:
        return tuple(direction)
    u, _, vt = np.linalg.svd(columns)
    return tuple((u @ vt).ravel().tolist())


def read_image(
    path: str | os.PathLike,
    *,
    case: str = "?",
    series: str | None = None,
    component: str | None = None,
) -> sitk.Image:
    """One 3D image from a DICOM series folder, `.mha`, `.nii(.gz)` or `.nrrd`, as float32.

    `series` chooses a series of a DICOM folder by SeriesInstanceUID or exact SeriesDescription
    (required when the folder holds several; see `dicom.read_series`); `component` ('t2w',
    'adc', ...) refuses a DICOM series whose ImageType says it is another component. Raises
    `CaseError` naming the case and file when the file is missing, unreadable or truncated, not
    3D, has a direction matrix that is no rotation (one that is to rounding is read as the nearest
    rotation), holds NaN/Inf voxels, is a NIfTI file of voxel size 0, or is an ambiguous or
    irregular DICOM series.
    """
    if path is None or not str(path):
        raise CaseError(case, path, f"no {component + ' ' if component else ''}path given")
    path = Path(path)
    if not path.exists():
        raise CaseError(case, path, "file not found")
    try:
        if path.is_dir():
            try:
                image = dicom.read_series(path, series, component)
            except dicom.SeriesError as err:
                raise CaseError(case, err.file, err.reason) from err
        else:
            if series is not None:
                raise CaseError(case, path, f"series {series!r} chosen, but this is not a folder")
            if not path.name.lower().endswith(IMAGE_SUFFIXES):
                seg = False
                with contextlib.suppress(dicom_seg.SegError):  # damaged: no format either
                    seg = dicom_seg.is_seg(path)
                unknown = f"unknown image format (expected a DICOM folder or {IMAGE_SUFFIXES})"
                raise CaseError(case, path, dicom_seg.NOT_AN_IMAGE if seg else unknown)
            try:  # ITK words an unreadable NIfTI file "is not recognized as a NIFTI file"
                path.open("rb").close()
            except OSError as err:
                raise CaseError(case, path, f"cannot be read ({err.strerror})") from None
            # Sized first: ITK would print its own complaint about a short MetaImage to stderr.
            short = metaimage_header.shortfall(path)
            if short:
                raise CaseError(case, path, f"unreadable or truncated image ({short})")
            problem = (
                metaimage_header.geometry_problem(path)
                or nifti_header.header_problem(path)
                or nrrd_header.geometry_problem(path)
            )
            if problem:  # before ITK reads it (as 1 mm, or at origin 0)
                raise CaseError(case, path, problem)
            image = sitk.ReadImage(str(path), imageIO=_image_io(path, case))
            if problem := nifti_header.data_problem(path):
                raise CaseError(case, path, problem)
    except RuntimeError as err:
        raise CaseError(case, path, f"unreadable or truncated image ({_why(path, err)})") from err
    if image.GetDimension() != 3 or image.GetSize()[2] < 1:
        raise CaseError(case, path, f"expected a 3D image, got size {image.GetSize()}")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise CaseError(
            case,
            path,
            f"expected a scalar image, got {image.GetNumberOfComponentsPerPixel()} channels",
        )
    if problem := _direction_problem(image.GetDirection()):
        raise CaseError(case, path, problem)
    image.SetDirection(_nearest_rotation(image.GetDirection()))
    if not np.isfinite([*image.GetOrigin(), *image.GetSpacing()]).all():  # an NRRD's NaN axis min
        shown = lambda values: "(" + ", ".join(f"{v:g}" for v in values) + ")"
        raise CaseError(
            case, path, f"placement holds NaN or Inf (origin {shown(image.GetOrigin())}, "
            f"spacing {shown(image.GetSpacing())})",
        )  # fmt: skip
    if image.GetPixelID() in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        raise CaseError(case, path, f"expected real voxels, got {image.GetPixelIDTypeAsString()}")
    image = sitk.Cast(image, sitk.sitkFloat32)
    if not np.isfinite(sitk.GetArrayViewFromImage(image)).all():
        raise CaseError(case, path, "image holds NaN or Inf voxels")
    return image


def image_suffix(name: str) -> str:
    """The one of `IMAGE_SUFFIXES` that the file name `name` ends with, in any letter case (the
    longest: `.nii.gz`, not `.nii`); '' for none."""
    return max((s for s in IMAGE_SUFFIXES if name.lower().endswith(s)), key=len, default="")


def _image_io(path: Path, case: str) -> str:
    """The ITK reader of an image file of one of `IMAGE_SUFFIXES`, in any letter case, but a
    NIfTI suffix in lower or upper case only (ITK's NIfTI reader refuses `.Nii.gz`)."""
    suffix = image_suffix(path.name)
    written = path.name[-len(suffix) :]
    if _IMAGE_IO[suffix] == "NiftiImageIO" and written not in (suffix, suffix.upper()):
        raise CaseError(
            case,
            path,
            f"NIfTI suffix {written!r} in mixed letter case is not read: rename it to {suffix}",
        )
    return _IMAGE_IO[suffix]


def _seg_file(path, case: str) -> Path | None:
    """The DICOM SEG that `path` gives (`dicom_seg.find_seg`), or None."""
    if path is None or not str(path):
        return None
    try:
        return dicom_seg.find_seg(path)
    except dicom_seg.SegError as err:
        raise CaseError(case, err.file, err.reason) from None


def _seg_or_image(path, seg: Path | None, case: str, read_seg) -> sitk.Image:
    """`read_seg(seg)` where `path` gives the DICOM SEG `seg` (`_seg_file`), else `read_image`'s
    image; a `SegError` becomes a `CaseError` naming the case."""
    if seg is None:
        sop_class = dicom_seg.sop_class(path) if path and Path(path).is_file() else None
        if sop_class is not None:  # a DICOM file, but no SEG (e.g. one slice of a series)
            raise CaseError(
                case,
                path,
                f"DICOM file of SOP class {sop_class or '(none)'} is no DICOM SEG: give a "
                "DICOM SEG, or an image file or DICOM series folder",
            )
        return read_image(path, case=case)
    try:
        return read_seg(seg)
    except dicom_seg.SegError as err:
        raise CaseError(case, err.file, err.reason) from None


def read_label(
    path: str | os.PathLike, *, case: str = "?", label_values: str, mask=None
) -> sitk.Image:
    """A lesion label: a DICOM SEG (file, or a folder holding one) as a label map under
    `label_values` ('picai' or 'isup', `dicom_seg.read_lesions`; a SEG of the gland alone only
    where it is the case's `mask` too), else `read_image`'s image. Raises `CaseError` naming the
    case, the file and the reason."""
    seg, gland = _seg_file(path, case), _seg_file(mask, case)  # a folder names its one SEG
    also_gland = seg is not None and gland is not None and seg.resolve() == gland.resolve()

    def read(file: Path) -> sitk.Image:
        return dicom_seg.read_lesions(file, label_values, also_gland=also_gland)

    return _seg_or_image(path, seg, case, read)


def read_mask(path: str | os.PathLike, *, case: str = "?") -> sitk.Image:
    """A whole-gland mask: a DICOM SEG's gland segment (`dicom_seg.read_gland`), else
    `read_image`'s image. Raises `CaseError` naming the case, the file and the reason."""
    return _seg_or_image(path, _seg_file(path, case), case, dicom_seg.read_gland)


def check_distinct(files: Mapping, series: Mapping, case: str, images: Mapping | None = None):
    """Raises `CaseError` where two of `files` (name -> path or None, e.g. components; `series`
    chosen in a DICOM folder) are the same file, or the same series of a folder: e.g. a manifest
    column pasted twice, whose T2w would pass as an ADC map; with `images` (name -> the image
    read), also where two are one image in other files (`check_distinct_images`)."""
    seen: dict = {}  # (real path, series) -> name
    for name, path in files.items():
        if path is None or not str(path):
            continue
        key = (os.path.realpath(os.fspath(path)), series.get(name))
        if key in seen and _seg_file(path, case) is None:  # a SEG may hold label and gland
            what = "series" if series.get(name) else "folder" if os.path.isdir(path) else "file"
            raise CaseError(case, path, f"{seen[key]} and {name} are the same {what}")
        seen[key] = name
    if images is not None:
        check_distinct_images(images, files, case)


def check_distinct_images(images: Mapping[str, sitk.Image], paths: Mapping, case: str) -> None:
    """Raises `CaseError` where two components read (`images`, name -> image; `paths`, name ->
    file) are one image: the same grid and voxels (a copied file or DICOM folder, one series
    chosen by UID and by description). Images derived from one series (an ADC map and a high-b
    image of one DWI) differ in their voxels and pass."""
    names = list(images)
    for k, name in enumerate(names):
        for other in names[:k]:
            a, b = images[other], images[name]
            if _same_grid(a, b) and np.array_equal(
                sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b)
            ):
                reason = f"{other} and {name} are the same image (same grid and voxels)"
                raise CaseError(case, paths[name], reason)


GRID_ATOL = 1e-4
"""Origins and spacings (mm) and direction cosines within this of each other are one grid."""


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return a.GetSize() == b.GetSize() and all(
        np.allclose(getattr(a, f)(), getattr(b, f)(), atol=GRID_ATOL)
        for f in ("GetSpacing", "GetOrigin", "GetDirection")
    )


def unplaced(path) -> str | None:
    """How the file `path` fails to place its voxels in scanner coordinates, or None: ITK reads
    such a file with its first voxel at origin 0 and identity direction."""
    if nifti_header.unplaced(path):
        return "a NIfTI without orientation (qform_code and sform_code 0)"
    if nrrd_header.unplaced(path):
        return "an NRRD without position (no finite `space origin`, or `axis mins` and `spacings`)"
    if metaimage_header.unplaced(path):
        return "a MetaImage without position (no Offset, Origin or Position field)"
    return None


def check_placed(images: Mapping[str, sitk.Image], paths: Mapping, case: str) -> None:
    """Refuses (`CaseError` naming the file) a component read from an unplaced file (`unplaced`)
    unless every component lies on its very grid: components are aligned by scanner
    coordinates, and such a file's first voxel sits at the origin whatever its field of view (an
    ADC of 256 mm beside a T2w of 180 mm would be shifted 38 mm).
    `images`, `paths`: component name -> image, file."""
    unplaced_ = {name: how for name in images if (how := unplaced(paths[name]))}
    if not unplaced_:
        return
    name, how = next(iter(unplaced_.items()))
    other = next((n for n, image in images.items() if not _same_grid(image, images[name])), None)
    if other is not None:
        raise CaseError(case, paths[name], _unplaced_reason(name, how, other))


def check_placed_on_t2w(image: sitk.Image, path, t2w: sitk.Image, case: str, what: str) -> None:
    """`check_placed` for a label or mask (`what`) read from `path`: an unplaced file is refused
    unless it lies on the T2w's very grid (a label of the T2w's voxel counts and spacing
    would otherwise be taken at origin 0: its lesions lost, or moved without a word)."""
    if (how := unplaced(path)) and not _same_grid(image, t2w):
        raise CaseError(case, path, _unplaced_reason(what, how, "the T2w"))


def _unplaced_reason(name: str, how: str, other: str) -> str:
    return (
        f"{name} is {how}: read at origin 0, not where the scanner put it, and {other} lies on "
        "another grid, so the two cannot be aligned by scanner coordinates; convert the series "
        "with their geometry (e.g. dcm2niix)"
    )
