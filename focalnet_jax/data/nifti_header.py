"""The NIfTI-1 header read directly, for what ITK's reader passes over without a word: a datatype or
voxel size it cannot take, NaN/Inf voxels, no placement at all, or two placements that differ.

Offsets and codes are those of nifti1.h; the header's affines are in RAS millimetres.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

# The NIfTI-1 datatype codes (nifti1.h) and the bits of a voxel of each (ITK's reader sizes the
# data so, not by the header's bitpix); with another code, ITK's reader prints "bad datatype" on
# stderr and refuses the file as "not recognized as a NIFTI file".
_VOXEL_BITS = {
    1: 1, 2: 8, 4: 16, 8: 32, 16: 32, 32: 64, 64: 64, 128: 24, 256: 8, 512: 16, 768: 32,
    1024: 64, 1280: 64, 1536: 128, 1792: 128, 2048: 256, 2304: 32,
}  # fmt: skip
_FLOATS = {16: "f4", 64: "f8"}  # the datatype codes of float32 and float64 voxels
_GZIP_MAGIC = b"\x1f\x8b"
_ORIGIN_MM = 0.1  # qform and sform origins further apart than this place the image twice
_AXIS_TOLERANCE = 1e-3  # ... as do voxel axes (mm) differing by more than this share of a voxel


def _compressed(path: Path) -> bool:
    """Whether the file `path` is a gzip stream, whatever its name says: ITK's NIfTI reader (zlib's
    gzopen) reads a `.nii.gz` that was saved uncompressed as it is."""
    with path.open("rb") as f:
        return f.read(2) == _GZIP_MAGIC


def _open(path: Path):
    """`path` opened for reading its decompressed bytes (see `_compressed`)."""
    return gzip.open(path, "rb") if _compressed(path) else path.open("rb")


def read_header(path: str | os.PathLike) -> tuple[bytes, str] | None:
    """(the 348-byte header, its struct byte order '<' or '>') of a NIfTI-1 file `path`; None
    for another format, a NIfTI-2 file or one that cannot be read (the reader's own reason for
    refusing it then stands)."""
    path = Path(path)
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return None
    try:
        with _open(path) as f:
            header = f.read(348)
    except (EOFError, OSError, zlib.error):
        return None
    for endian in "<>":
        if len(header) == 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            return header, endian
    return None


def truncation(path: str | os.PathLike) -> str | None:
    """Why a NIfTI-1 file holds fewer bytes than its header promises (its datatype's, not its
    bitpix's: ITK pads a short file with zeros, silently), or None (also for other files)."""
    return _scan(Path(path), count_non_finite=False)[0]


def data_problem(path: str | os.PathLike) -> str | None:
    """Why the voxels ITK read from a NIfTI-1 file `path` are not the file's, or None (also for
    other files): fewer bytes than its header promises (ITK pads them with zeros), or float
    voxels that are NaN or Inf (ITK reads them as 0). One pass over a compressed file."""
    short, non_finite = _scan(Path(path), count_non_finite=True)
    if short:
        return f"unreadable or truncated image ({short})"
    return "image holds NaN or Inf voxels" if non_finite else None


def _scan(path: Path, count_non_finite: bool) -> tuple[str | None, int]:
    """(why a NIfTI-1 file `path` holds fewer bytes than its header promises, or None; how many
    of its float voxels are NaN or Inf where `count_non_finite`, else 0), read in one pass."""
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        return None, 0
    compressed = _compressed(path)
    non_finite = 0
    try:
        with _open(path) as f:
            header = f.read(348)
            if len(header) < 348:
                return "header shorter than 348 bytes", 0
            endian = "<" if struct.unpack("<i", header[:4])[0] == 348 else ">"
            voxels, offset = _data_layout(header, endian)
            datatype = struct.unpack(endian + "h", header[70:72])[0]
            code = _FLOATS.get(datatype)
            if count_non_finite and code and struct.unpack(endian + "i", header[:4])[0] == 348:
                f.seek(offset)
                data = f.read(voxels * int(code[1]))
                floats = np.frombuffer(data, endian + code, len(data) // int(code[1]))
                non_finite = int(np.count_nonzero(~np.isfinite(floats)))
            if compressed:
                while f.read(1 << 22):
                    pass
                size = f.tell()
    except (EOFError, OSError, zlib.error) as err:
        if not compressed:
            raise
        return f"compressed stream ends early ({err})", 0
    if not compressed:
        size = path.stat().st_size
    bits = _VOXEL_BITS.get(datatype, struct.unpack(endian + "h", header[72:74])[0])
    expected = offset + -(-voxels * bits // 8)
    if size < expected:
        return f"{size} bytes of image data, header promises {expected}", non_finite
    return None, non_finite


def _data_layout(header: bytes, endian: str) -> tuple[int, int]:
    """(voxels, vox_offset in bytes) of a NIfTI-1 header: the product of its dims, and where its
    data begin."""
    dims = struct.unpack(endian + "8h", header[40:56])
    voxels = int(np.prod([max(d, 1) for d in dims[1 : 1 + max(dims[0], 0)]]))
    return voxels, int(struct.unpack(endian + "f", header[108:112])[0])


def header_problem(path: str | os.PathLike) -> str | None:
    """Why a NIfTI-1 header cannot be taken, or None: a datatype that is no NIfTI-1 code; a pixdim
    of 0 or less (or not finite) along a spatial axis, which readers take differently; a NaN or
    Inf in the placement its codes select; an sform whose voxel size is not pixdim's; or a qform
    and an sform (both codes > 0) that place the image differently (ITK takes one or the other
    by sform_code, nibabel and FSL the sform)."""
    if (found := read_header(path)) is None:
        return None
    header, endian = found
    datatype = struct.unpack(endian + "h", header[70:72])[0]
    if datatype not in _VOXEL_BITS:
        return f"NIfTI header gives datatype {datatype}, which is no NIfTI-1 data type"
    ndim = struct.unpack(endian + "h", header[40:42])[0]
    pixdim = struct.unpack(endian + "8f", header[76:108])[1 : 1 + min(max(ndim, 0), 3)]
    bad = [
        f"{a} {v:g}" for a, v in zip("xyz", pixdim, strict=False) if not (np.isfinite(v) and v > 0)
    ]
    if bad:
        return (
            f"NIfTI header gives voxel size {', '.join(bad)} (pixdim), which readers take "
            "differently (ITK reads 0 as 1 mm and mirrors the axis of a negative one, nifti1_io "
            "reads either as 1 mm): every distance or side could be wrong; save the image with "
            "its voxel size"
        )
    return _non_finite_placement(header, endian) or _placement_conflict(header, endian)


def _non_finite_placement(header: bytes, endian: str) -> str | None:
    """Why the placement a header's codes select holds a NaN or Inf (ITK reads it as 0: the
    image placed elsewhere), or None."""
    qform_code, sform_code = struct.unpack(endian + "2h", header[252:256])
    fields = (
        ("qform (quatern_b..d, qoffset)", qform_code, header[256:280], 6),
        ("sform (srow_x, srow_y, srow_z)", sform_code, header[280:328], 12),
    )
    for name, code, raw, count in fields:
        if code > 0 and not np.isfinite(struct.unpack(f"{endian}{count}f", raw)).all():
            return f"NIfTI header's {name} holds NaN or Inf: the image would be placed elsewhere"
    return None


def _placement_conflict(header: bytes, endian: str) -> str | None:
    """Why the sform's voxel size (its column lengths) differs from pixdim (ITK places the voxels
    by the sform but spaces them by pixdim, nibabel and FSL by the sform), or why the qform and
    sform of a header with both codes > 0 disagree; else None."""
    qform_code, sform_code = struct.unpack(endian + "2h", header[252:256])
    if sform_code > 0:
        sizes = np.linalg.norm(sform_affine(header, endian)[:, :3], axis=0)
        pixdim = np.abs(struct.unpack(endian + "8f", header[76:108])[1:4])
        if (np.abs(sizes - pixdim) > _AXIS_TOLERANCE * np.maximum(sizes, pixdim)).any():
            return (
                f"NIfTI header gives voxel size {_shown(sizes)} mm in its sform (code "
                f"{sform_code}) and {_shown(pixdim)} mm in pixdim, and readers differ in which "
                "they take; save it with one voxel size"
            )
    if qform_code <= 0 or sform_code <= 0:
        return None
    qform, sform = qform_affine(header, endian), sform_affine(header, endian)
    voxel = float(np.max(np.linalg.norm(sform[:, :3], axis=0)))
    apart = float(np.linalg.norm(qform[:, 3] - sform[:, 3]))
    if apart <= _ORIGIN_MM and np.abs(qform[:, :3] - sform[:, :3]).max() <= _AXIS_TOLERANCE * voxel:
        return None
    shift = f"origins {apart:.3g} mm apart" if apart > _ORIGIN_MM else "voxel axes differ"

    def origin(affine):
        return "(" + ", ".join(f"{v:.2f}" for v in affine[:, 3]) + ")"

    return (
        f"NIfTI header places the image twice, differently ({shift}): qform (code {qform_code}) "
        f"at RAS {origin(qform)} mm, sform (code {sform_code}) at RAS {origin(sform)} mm, and "
        "readers differ in which they take; save it with one placement (qform equal to sform)"
    )


def _shown(sizes) -> str:
    return " x ".join(f"{size:.4g}" for size in sizes)


def qform_affine(header: bytes, endian: str) -> np.ndarray:
    """The [3, 4] voxel-to-RAS affine (mm) of a header's quaternion, qoffset and pixdim."""
    b, c, d, *offset = struct.unpack(endian + "6f", header[256:280])
    pixdim = struct.unpack(endian + "8f", header[76:108])
    a = np.sqrt(max(0.0, 1.0 - (b * b + c * c + d * d)))
    rotation = np.array(
        [
            [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
            [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
            [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b],
        ]
    )
    qfac = -1.0 if pixdim[0] < 0 else 1.0
    scale = np.diag([pixdim[1], pixdim[2], qfac * pixdim[3]])
    return np.concatenate([rotation @ scale, np.array(offset)[:, None]], axis=1)


def sform_affine(header: bytes, endian: str) -> np.ndarray:
    """The [3, 4] voxel-to-RAS affine (mm) of a header's srow_x, srow_y, srow_z."""
    return np.array(struct.unpack(endian + "12f", header[280:328]), dtype=np.float64).reshape(3, 4)


def unplaced(path: str | os.PathLike) -> bool:
    """Whether `path` is a NIfTI-1 file whose header places its voxels nowhere (qform_code and
    sform_code 0, e.g. saved from an array without an affine): ITK reads it at origin 0 with
    identity direction, not where the scanner put it."""
    if (found := read_header(path)) is None:
        return False
    header, endian = found
    qform_code, sform_code = struct.unpack(endian + "2h", header[252:256])
    return qform_code <= 0 and sform_code <= 0
