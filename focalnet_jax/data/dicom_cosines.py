"""The direction cosines of ImageOrientationPatient (0020,0037) as scanners and converters write
them (to 3-4 decimals): checked, made orthonormal as ITK makes them, and what rounding them moves.

GDCM takes a series' cosines only when row . column is within 1e-3 of 0; cosines written to 3
decimals reach about 2e-3, and ITK then reads the identity direction (an oblique series read as
axial, without a word). Readers here place such a series by the cosines made orthonormal.
"""

from __future__ import annotations

import numpy as np

# |row . column| read as rounding (3 decimals give up to about 2e-3); beyond it, not cosines.
ORTHOGONALITY_TOLERANCE = 1e-2
# In-plane drift allowed per mm along the normal, on top of the spacing tolerance: the normal of
# cosines written to 3-4 decimals is off by up to about 1e-3 rad; a gantry tilt of 1 degree
# drifts 0.017 mm per mm.
SHEAR_TOLERANCE_SLOPE = 1e-3


def cosines_problem(orientation: np.ndarray) -> str | None:
    """Why an ImageOrientationPatient `[6]` holds no direction cosines ("its row and column are
    ..."), or None: lengths far from 1 (written to 1 decimal, say), or row . column beyond
    `ORTHOGONALITY_TOLERANCE`."""
    lengths = np.linalg.norm(np.reshape(orientation, (2, 3)), axis=1)
    if np.abs(lengths - 1).max() > 0.5:
        return (
            f"its row and column are no direction cosines (lengths {lengths[0]:.3g} and "
            f"{lengths[1]:.3g}, want 1)"
        )
    cosine = orientation[:3] @ orientation[3:] / (lengths[0] * lengths[1])
    if abs(cosine) > ORTHOGONALITY_TOLERANCE:
        return f"its row and column are not orthogonal (row . column = {cosine:.4g})"
    return None


def orthonormal_cosines(orientation: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) of an ImageOrientationPatient made orthonormal as ITK makes a series' (the
    column normalised, the row made orthogonal to it, then normalised)."""
    column = orientation[3:] / np.linalg.norm(orientation[3:])
    row = orientation[:3] - (orientation[:3] @ column) * column
    return row / np.linalg.norm(row), column
