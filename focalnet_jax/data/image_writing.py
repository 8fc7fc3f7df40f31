"""Writing images with SimpleITK so that a failed write is an error, never a short file.

ITK's NIfTI writer reports a write that failed (a full disk, a quota) only on stderr (`** ERROR:
NWAD: wrote only 0 of 327680 bytes to file`) and returns: the `.nii.gz` left behind reads back
without error as other voxels (zeros). Its MetaImage writer raises a `RuntimeError` whose text
ends in the system's reason. `write_image` turns the second into an `OSError` naming the file
(`errors.is_user_error`: one line) and finds the first by reading the file back: voxels other than
those written are that `OSError` where the file system shows why (no space left, the file size
limit reached), else an `ImageWriteError` naming the file, with what was printed on stderr.
"""

from __future__ import annotations

import errno
import os
import resource
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from focalnet_jax.data import metaimage_header, native_stderr, nifti_header
from focalnet_jax.errors import DISK_ERRNOS, UserError

_REASONS = {os.strerror(code): code for code in DISK_ERRNOS}  # ITK's text -> errno


class ImageWriteError(UserError):
    """An image file that does not read back as written (the disk full or over quota?)."""


def write_image(image: sitk.Image, path: str | os.PathLike) -> Path:
    """Write `image` (compressed for `.nii.gz` / `.mha`), creating parent folders, and check that
    the file reads back with its voxels; returns `path`. A full disk (quota, read-only mount, file
    size limit) is an `OSError` naming `path`; a file that reads back otherwise (or not at all)
    an `ImageWriteError` naming it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with native_stderr.captured() as printed:
        try:
            sitk.WriteImage(image, str(path), useCompression=True)
        except RuntimeError as error:
            code = next((c for text, c in _REASONS.items() if text in str(error)), None)
            if code is None:
                raise
            raise OSError(code, os.strerror(code), str(path)) from error
        problem = _read_back_problem(image, path)
    if problem is not None:
        code = _short_write_errno(path)
        if code is not None:
            raise OSError(code, os.strerror(code), str(path))
        said = f"; printed on stderr meanwhile: {printed.summary()}" if printed.text.strip() else ""
        raise ImageWriteError(f"{path}: {problem} (the disk full or over quota?){said}")
    if printed.text:  # passed on, never dropped (`native_stderr`)
        sys.stderr.write(printed.text)
    return path


def _short_write_errno(path: Path) -> int | None:
    """Why a write to `path` stopped short, where the file system says: no space left on it
    (`ENOSPC`), or the file at this process's size limit (`EFBIG`, `ulimit -f`); else None."""
    if os.statvfs(path.parent).f_bavail == 0:
        return errno.ENOSPC
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and path.stat().st_size >= limit:
        return errno.EFBIG
    return None


def _read_back_problem(image: sitk.Image, path: Path) -> str | None:
    """Why `path` does not hold `image`'s voxels, or None. A file short of what its header
    promises is so even where ITK reads it back as written (a short `.nii.gz` of zeros: ITK
    pads it with zeros)."""
    if short := nifti_header.truncation(path) or metaimage_header.shortfall(path):
        return f"the file written is short ({short})"
    try:
        back = sitk.ReadImage(str(path))
    except RuntimeError as error:
        return f"the image written does not read back ({str(error).strip().splitlines()[-1]})"
    written = sitk.GetArrayViewFromImage(image)
    read = sitk.GetArrayViewFromImage(back)
    if written.shape != read.shape:
        return f"the image written reads back with shape {read.shape}, not {written.shape}"
    # ITK reads a NIfTI's NaN and Inf as 0 (`io.read_image` finds them): the finite ones count.
    finite = np.isfinite(written) if np.issubdtype(written.dtype, np.floating) else Ellipsis
    if not np.array_equal(written[finite], read[finite]):
        return "the image written reads back with other voxels"
    return None
