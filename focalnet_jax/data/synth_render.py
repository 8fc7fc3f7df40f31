"""Rendering of a synthetic scene (see `synth`) onto one image grid, one modality at a time.

A scene is a dict of soft-edged ellipsoids in LPS world coordinates (mm); `render` paints them in
order (body and pelvis, gland, tissue texture, lesions, then the fluid-filled bladder and rectum)
with the signal of each tissue in the modality (`_TISSUE`). `bias_field` and `add_rician_noise`
complete the T2w image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from focalnet_jax.data.io import xyz

# class -> (conspicuity in T2w/HBV/DCE, ADC 1e-6 mm^2/s)
_LESION = {1: (0.25, 1050.0), 2: (0.4, 930.0), 3: (0.55, 830.0), 4: (0.7, 740.0), 5: (0.85, 650.0)}
COMPONENTS = ("t2w", "adc", "hbv", "dce")  # the components the generator can write
_SHOWN_IN = {"t2w": "t2w", "adc": "adc", "hbv": "adc", "dce": "dce"}  # visible_in of one-only


@dataclass
class Lesion:
    """One synthetic lesion: an ellipsoid in world coordinates."""

    center: tuple[float, float, float]  # LPS mm
    radii: tuple[float, float, float]  # x, y, z semi-axes before rotation (mm)
    angle: float  # in-plane rotation (radians)
    cls: int
    visible_in: str  # 'both' (every component) | 't2w' | 'adc' (ADC and HBV) | 'dce': only there
    zone: str


class Grid:
    """World coordinates (mm) of an axis-aligned grid, kept separable as 1D axes for speed."""

    def __init__(self, size_zyx, spacing_zyx, origin_xyz):
        self.size, self.spacing, self.origin = (
            tuple(size_zyx),
            tuple(spacing_zyx),
            tuple(origin_xyz),
        )
        self.axes = [  # x, y, z world coordinates of the voxel centres
            origin_xyz[a] + spacing_zyx[2 - a] * np.arange(size_zyx[2 - a], dtype=np.float32)
            for a in range(3)
        ]

    def box(self, center, extent):
        """Index slices (z, y, x) of the voxels within `extent` mm of `center` (per axis)."""
        out = []
        for a in (2, 1, 0):
            lo = int(np.floor((center[a] - extent[a] - self.origin[a]) / self.spacing[2 - a]))
            hi = int(np.ceil((center[a] + extent[a] - self.origin[a]) / self.spacing[2 - a])) + 1
            out.append(slice(min(max(lo, 0), self.size[2 - a]), min(max(hi, 0), self.size[2 - a])))
        return tuple(out)

    def image(self, array: np.ndarray) -> sitk.Image:
        """`array` [Z, Y, X] as a SimpleITK image on this grid (identity direction)."""
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(xyz(self.spacing))
        image.SetOrigin(self.origin)
        return image


class _Shape:
    """Soft membership in [0, 1] of an ellipsoid (rotated in-plane), stored on its bounding box."""

    def __init__(self, grid: Grid, center, radii, angle=0.0, edge_mm=1.0):
        reach = max(radii[0], radii[1]) + edge_mm
        self.box = grid.box(center, (reach, reach, radii[2] + edge_mm))
        bz, by, bx = self.box
        dx = (grid.axes[0][bx] - center[0])[None, None, :]
        dy = (grid.axes[1][by] - center[1])[None, :, None]
        dz = (grid.axes[2][bz] - center[2])[:, None, None]
        c, s = np.cos(angle), np.sin(angle)
        plane = ((c * dx + s * dy) / radii[0]) ** 2 + ((-s * dx + c * dy) / radii[1]) ** 2
        d = np.sqrt(plane + (dz / radii[2]) ** 2)
        edge = edge_mm / min(radii[:2])
        self.weight = np.clip(0.5 - (d - 1.0) / edge, 0.0, 1.0).astype(np.float32)

    def full(self, size) -> np.ndarray:
        out = np.zeros(size, np.float32)
        out[self.box] = self.weight
        return out


def _paint(volume, shape: _Shape, value, weight=None):
    w = shape.weight if weight is None else weight
    sub = volume[shape.box]
    sub *= 1.0 - w
    sub += w * value


def _texture(grid: Grid, seed, amplitude, cell_mm=2.5):
    """Granular multiplicative tissue texture: smoothed noise on a ~`cell_mm` grid, upsampled."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = grid.size
    _, sy, sx = grid.spacing
    coarse = (nz, max(2, int(ny * sy / cell_mm)), max(2, int(nx * sx / cell_mm)))
    noise = ndimage.gaussian_filter(rng.standard_normal(coarse, dtype=np.float32), (0.6, 1.0, 1.0))
    noise *= amplitude / max(float(noise.std()), 1e-6)
    factors = (1.0, ny / coarse[1], nx / coarse[2])
    return 1.0 + ndimage.zoom(noise, factors, order=1, grid_mode=True, mode="nearest")


# tissue -> (T2w, ADC 1e-6 mm^2/s, HBV, DCE early enhancement %); capsule: periprostatic plexus
_TISSUE = {
    "air": (0.0, 0.0, 0.0, 0.0),
    "fat": (470.0, 150.0, 2.0, 10.0),
    "muscle": (120.0, 1450.0, 9.0, 40.0),
    "cortex": (35.0, 250.0, 1.0, 5.0),
    "marrow": (330.0, 300.0, 2.0, 30.0),
    "pz": (390.0, 1800.0, 30.0, 50.0),
    "tz": (240.0, 1300.0, 24.0, 100.0),
    "stroma": (120.0, 1100.0, 12.0, 30.0),
    "capsule": (80.0, 1200.0, 8.0, 90.0),
    "wall": (130.0, 1300.0, 12.0, 180.0),
    "balloon": (15.0, 0.0, 0.0, 0.0),
}
_DCE_URINE, _DCE_ARTERY = 5.0, 600.0  # contrast reaches urine late, arteries first


def _tissue_values(scene: dict, modality: str) -> dict[str, float]:
    """Tissue name -> signal of `modality` (units of `_TISSUE`), urine included."""
    m = COMPONENTS.index(modality)
    values = {name: signals[m] for name, signals in _TISSUE.items()}
    values["urine"] = _DCE_URINE if modality == "dce" else scene["urine"][m]
    return values


def _paint_pelvis(vol: np.ndarray, grid: Grid, scene: dict, v: dict) -> None:
    """Paint `vol` [Z, Y, X] with the body around the gland: subcutaneous fat, muscle, fat pads,
    pelvic muscles, femoral heads and pubic rami, periprostatic fat and the capsule."""
    p, g = np.asarray(scene["prostate"]), scene["gland"]
    body = _Shape(grid, scene["body_center"], (*scene["body"], 1e4), edge_mm=2.0)
    _paint(vol, body, v["fat"])
    inner = tuple(r - scene["fat_mm"] for r in scene["body"])
    _paint(vol, _Shape(grid, scene["body_center"], (*inner, 1e4), edge_mm=2.0), v["muscle"])
    for offset, radii, angle in scene["fat_pads"]:
        _paint(vol, _Shape(grid, p + offset, radii, angle, edge_mm=3.0), v["fat"])
    for offset, radii, angle in scene["muscles"]:
        _paint(vol, _Shape(grid, p + offset, radii, angle, edge_mm=2.0), v["muscle"])
    for offset, radii in scene["bones"]:
        _paint(vol, _Shape(grid, p + offset, radii), v["cortex"])
        _paint(vol, _Shape(grid, p + offset, tuple(r - 3 for r in radii)), v["marrow"])
    _paint(vol, _Shape(grid, p, tuple(r + 5 for r in g), edge_mm=2.0), v["fat"])
    _paint(vol, _Shape(grid, p, tuple(r + 1.5 for r in g)), v["capsule"])


def _paint_gland(vol: np.ndarray, grid: Grid, scene: dict, v: dict) -> tuple[_Shape, np.ndarray]:
    """Paint the gland (PZ), its anterior stroma, the TZ within it and the BPH nodules in the TZ.
    Returns the gland's shape and the TZ weights [Z, Y, X] in [0, 1]."""
    p, g = np.asarray(scene["prostate"]), scene["gland"]
    gland = _Shape(grid, p, g)
    _paint(vol, gland, v["pz"])
    stroma = _Shape(grid, p + [0, -g[1] * 0.8, 0], (g[0] * 0.5, g[1] * 0.3, g[2] * 0.8))
    _paint(vol, stroma, v["stroma"])
    tz_full = _Shape(grid, scene["tz_center"], scene["tz"]).full(grid.size) * gland.full(grid.size)
    tz = _Shape(grid, scene["tz_center"], scene["tz"])
    tz.weight = tz_full[tz.box]
    _paint(vol, tz, v["tz"])
    for center, radius, factor in scene["nodules"]:
        nodule = _Shape(grid, center, (radius,) * 3)
        _paint(vol, nodule, v["tz"] * factor, nodule.weight * tz_full[nodule.box])
    return gland, tz_full


def _add_texture(vol: np.ndarray, grid: Grid, scene: dict, modality: str, tz_full) -> None:
    """Multiply `vol` [Z, Y, X] by granular tissue texture; in T2w also a fine grain only the
    0.5 mm grid resolves, in DCE the patchy BPH enhancement of the TZ (weights `tz_full`)."""
    seed = scene["texture_seed"]
    vol *= _texture(grid, seed + COMPONENTS.index(modality), 0.12 if modality == "t2w" else 0.08)
    if modality == "t2w":
        vol *= _texture(grid, seed + 7, 0.08, cell_mm=1.0)
    if modality == "dce":
        vol *= 1.0 + tz_full * (_texture(grid, seed + 11, 0.25, 4.0) - 1.0)


def _paint_lesions(vol, grid: Grid, lesions, gland_full, modality: str, v: dict, rng) -> list:
    """Paint the lesions visible in `modality`; returns every lesion's `_Shape`, cut to the gland
    (weights `gland_full` [Z, Y, X])."""
    shapes = []
    for lesion in lesions:
        shape = _Shape(grid, lesion.center, lesion.radii, lesion.angle)
        shape.weight = shape.weight * np.clip(2 * gland_full[shape.box], 0, 1)
        shapes.append(shape)
        conspicuity, adc = _LESION[lesion.cls]
        if modality == "adc" and lesion.visible_in in ("both", "adc", "dce"):
            # Drawn for a DCE-only lesion too (drawn visible in all, `synth._lesions`): the
            # stream, and so every later draw of the case, is that of the case without DCE.
            adc *= rng.uniform(0.96, 1.04)
        if lesion.visible_in not in ("both", _SHOWN_IN[modality]):
            continue
        if modality == "t2w":
            _paint(vol, shape, 0.4 * v["tz"], shape.weight * conspicuity)
        elif modality == "adc":
            _paint(vol, shape, adc)
        elif modality == "hbv":
            _paint(vol, shape, v["pz"] * (1.3 + 2.2 * conspicuity))
        else:  # early wash-in: 2.5x (class 1) to 5.5x (class 5) the normal PZ
            _paint(vol, shape, v["pz"] * (1.25 + 5.0 * conspicuity) * rng.uniform(0.9, 1.1))
    return shapes


def _paint_fluid_organs(vol: np.ndarray, grid: Grid, scene: dict, v: dict) -> None:
    """Paint the bladder (wall, urine) and the rectum (wall, endorectal balloon)."""
    bc, br = scene["bladder_center"], scene["bladder"]
    _paint(vol, _Shape(grid, bc, tuple(r + 3 for r in br)), v["wall"])
    _paint(vol, _Shape(grid, bc, br), v["urine"])
    rc, rr = scene["rectum_center"], scene["rectum_radius"]
    _paint(vol, _Shape(grid, rc, (rr + 4, rr + 1, 1e4)), v["wall"])
    _paint(vol, _Shape(grid, rc, (rr, rr - 3, 1e4)), v["balloon"])


def render(grid: Grid, scene: dict, lesions: list[Lesion], modality: str, rng) -> dict:
    """One modality on one grid: values before noise, plus the gland and lesion shapes."""
    v = _tissue_values(scene, modality)
    vol = np.full(grid.size, v["air"], np.float32)
    _paint_pelvis(vol, grid, scene, v)
    gland, tz_full = _paint_gland(vol, grid, scene, v)
    # Granular tissue texture, before the structures with flat signal (fluid, balloon, lesions).
    _add_texture(vol, grid, scene, modality, tz_full)
    if modality == "dce":  # arteries enhance first, brightest early
        for center, radii in _arteries(scene):
            _paint(vol, _Shape(grid, center, radii), _DCE_ARTERY)
    gland_full = gland.full(grid.size)
    shapes = _paint_lesions(vol, grid, lesions, gland_full, modality, v, rng)
    _paint_fluid_organs(vol, grid, scene, v)
    return {"volume": vol, "gland": gland_full, "lesions": [s.full(grid.size) for s in shapes]}


def _arteries(scene: dict) -> list[tuple[tuple, tuple]]:
    """(centre LPS mm, radii) of the neurovascular bundles (posterolateral to the gland, 5 and 7
    o'clock) and the femoral arteries (anterior to the femoral heads), from the scene alone."""
    p, g = np.asarray(scene["prostate"]), scene["gland"]
    bundles = [
        (p + [s * 0.6 * (g[0] + 4), 0.8 * (g[1] + 4), 0], (2.5, 2.5, g[2] + 10)) for s in (-1, 1)
    ]
    femoral = [
        (p + offset + [-np.sign(offset[0]) * 6, -32, 0], (4.0, 4.0, 1e4))
        for offset, _ in scene["bones"][:2]
    ]
    return [(tuple(c), r) for c, r in bundles + femoral]


def bias_field(grid: Grid, scene: dict) -> np.ndarray:
    """Smooth T2w bias: a linear drift plus, with an endorectal coil, a lobe at the rectum."""
    c, (gx, gy, gz) = scene["prostate"], scene["gradient"]
    x = (grid.axes[0] - c[0])[None, None, :]
    y = (grid.axes[1] - c[1])[None, :, None]
    z = (grid.axes[2] - c[2])[:, None, None]
    field = 1.0 + gx * x + gy * y + gz * z
    if scene["coil"]:
        rc = scene["rectum_center"]
        d2 = (x + c[0] - rc[0]) ** 2 + (y + c[1] - rc[1]) ** 2
        field = field + scene["coil_gain"] * np.exp(-d2 / (2 * 30.0**2))
    return field.astype(np.float32)


def add_rician_noise(volume: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of `volume` (any shape) after Gaussian noise of `sigma` on its real and
    imaginary parts: Rician noise, float32 for a float32 `volume`."""
    real = volume + sigma * rng.standard_normal(volume.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(volume.shape, dtype=np.float32)
    return np.sqrt(real * real + imag * imag)
