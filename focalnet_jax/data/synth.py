"""Synthetic prostate mp-MRI in the PI-CAI layout (docs/data.md), deterministic by seed.

Each case is a scene of soft-edged ellipsoids in LPS world coordinates (mm) rendered separately on
the T2w grid (0.5 x 0.5 x 3 mm), the coarser ADC/HBV grid (2 x 2 x 3 mm, shifted origin) and, when
asked for, the DCE grid (1.5 x 1.5 x 3 mm, its own shifted origin), so the components must be
registered by physical coordinates exactly as real exams: body with subcutaneous fat, pelvic muscle,
femoral heads, periprostatic fat, a gland with peripheral (PZ) and transition (TZ) zones and BPH
nodules, the bladder (urine: brightest T2w, ADC 2700-3000), the rectum with an endorectal-coil
balloon, and lesions of classes 1..5 whose conspicuity rises with class. A configurable share of
lesions is visible only in T2w, only in ADC/HBV or (with DCE) only in DCE. T2w gets a smooth coil
bias field and Rician noise. ADC values are in 1e-6 mm^2/s: PZ ~1600-2000, TZ ~1200-1400,
lesions 600-1100 falling with class.

DCE is an early relative-enhancement map ((early post-contrast - pre-contrast) / pre-contrast, in %,
which cancels the coil's receive field): arteries and the bladder/rectal mucosa enhance most,
lesions strongly (more with class), the TZ moderately and patchily, the normal PZ little, urine not
yet; with Gaussian noise. Its random numbers come from a stream of its own: the other components do
not change when DCE is added (bar the lesions that the DCE-only share then hides from them).

The scene and lesions are drawn here; `synth_render` paints them onto each grid.

Labels hold the class of each lesion (1 = GS 3+3 ... 5 = GS >= 9); `labels/dataset.json` declares
`{"label_values": "isup"}` so value 1 is read as GS 3+3 rather than PI-CAI's "grade unknown".
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from focalnet_jax.data.atomic_files import (
    check_output_folder,
    check_replaceable,
    foreign_entries,
    replaced_folder,
)
from focalnet_jax.data.image_writing import write_image
from focalnet_jax.data.io import xyz
from focalnet_jax.data.manifest_checks import check_components
from focalnet_jax.data.synth_render import (
    COMPONENTS,
    Grid,
    Lesion,
    add_rician_noise,
    bias_field,
    render,
)
from focalnet_jax.data.writer_folders import writer_lock
from focalnet_jax.errors import UserError

SYNTH_RECORD = "synth.json"  # what a dataset was made with: `synthesis_record`
# What a dataset folder holds (`_write_cases`): all `--overwrite` replaces.
_OWN_FILES = ("lesions.csv", "marksheet.csv", SYNTH_RECORD)
_OWN_FOLDERS = ("images", "labels", "masks")
_CLASS_SHARE = (0.24, 0.28, 0.2, 0.16, 0.12)  # of lesions, classes 1..5
_DCE_STREAM = 1  # SeedSequence spawn key of the DCE random stream


@dataclass(frozen=True)
class SynthConfig:
    """Grids are (z, y, x) sizes and spacings (mm); shares are fractions of cases or lesions."""

    t2w_size: tuple[int, int, int] = (20, 384, 384)
    t2w_spacing: tuple[float, float, float] = (3.0, 0.5, 0.5)
    dwi_size: tuple[int, int, int] = (20, 128, 84)
    dwi_spacing: tuple[float, float, float] = (3.0, 2.0, 2.0)
    dwi_shift_mm: float = 2.0  # max |origin shift| of the ADC/HBV grid per axis, beyond centring
    negative_share: float = 0.25  # cases without lesions
    max_lesions: int = 3
    t2w_only_share: float = 0.15  # lesions visible only in T2w
    adc_only_share: float = 0.15  # lesions visible only in ADC/HBV (only with "adc" or "hbv")
    coil_share: float = 0.5  # cases with an endorectal coil (strong bias field near the rectum)
    noise: float = 0.02  # Rician noise sigma relative to urine in T2w
    components: tuple[str, ...] = ("t2w", "adc", "hbv")  # T2w first; add "dce" for DCE
    dce_size: tuple[int, int, int] = (20, 128, 128)
    dce_spacing: tuple[float, float, float] = (3.0, 1.5, 1.5)
    dce_shift_mm: float = 2.0  # max |origin shift| of the DCE grid per axis (beyond the centring)
    dce_only_share: float = 0.15  # lesions visible only in DCE (only when "dce" is a component)
    dce_noise: float = 4.0  # Gaussian noise sigma of the DCE map (%; normal PZ ~50)

    def __post_init__(self):
        c = tuple(self.components)
        check_components(c)
        if not set(c) <= set(COMPONENTS):
            raise ValueError(
                f"components {','.join(c)!r}: synthetic cases have only {','.join(COMPONENTS)}"
            )
        shares = {"t2w": self.t2w_only_share}
        shares |= {"adc": self.adc_only_share} if _shows_dwi(c) else {}
        shares |= {"dce": self.dce_only_share} if "dce" in c else {}
        if not (all(s >= 0 for s in shares.values()) and sum(shares.values()) <= 1):  # NaN too
            terms = " + ".join(f"{name}-only {share:g}" for name, share in shares.items())
            raise ValueError(
                f"lesion visibility shares (the --*-only-share options) {terms} = "
                f"{sum(shares.values()):g}: expected each >= 0, summing to <= 1"
            )

    @classmethod
    def small(cls, **overrides) -> SynthConfig:
        """A 96 x 96 x 6 T2w (1 x 1 x 3 mm), 48 x 48 x 6 ADC (2 x 2 x 3 mm) and 64 x 64 x 6 DCE
        (1.5 x 1.5 x 3 mm) case for tests."""
        base = cls(t2w_size=(6, 96, 96), t2w_spacing=(3.0, 1.0, 1.0), dwi_size=(6, 48, 48))
        return replace(base, dce_size=(6, 64, 64), **overrides)


@dataclass
class SynthCase:
    images: dict[str, sitk.Image]
    label: sitk.Image
    mask: sitk.Image
    lesions: list[Lesion] = field(default_factory=list)
    prostate_center: tuple[float, float, float] = (0.0, 0.0, 0.0)  # LPS mm
    bladder: tuple[tuple[float, ...], tuple[float, ...]] = ((0.0,) * 3, (0.0,) * 3)  # centre, radii
    coil: bool = False  # endorectal coil (bright bias lobe at the rectum)


def _scene(rng: np.random.Generator, cfg: SynthConfig, fov_center) -> dict:
    """Random anatomy around `fov_center` (LPS mm): x to the left, y posterior, z superior."""
    p = np.asarray(fov_center) + rng.uniform([-6, -6, -3], [6, 6, 3])
    g = tuple(rng.uniform([22, 16, 16], [28, 21, 21]))
    j = rng.uniform(-1, 1, size=16)
    return {
        "prostate": tuple(p),
        "gland": g,
        "tz": (g[0] * 0.62, g[1] * 0.55, g[2] * 0.7),
        "tz_center": tuple(p + [0, -g[1] * 0.28, g[2] * 0.15]),
        "body": (rng.uniform(135, 160), rng.uniform(100, 115)),
        "body_center": tuple(p + [0, rng.uniform(8, 16), 0]),
        "bladder_center": tuple(p + [j[0] * 4, -g[1] - 8, g[2] + 16]),
        "bladder": tuple(rng.uniform([30, 22, 22], [42, 30, 30])),
        "rectum_center": tuple(p + [j[1] * 3, g[1] + 14, 0]),
        "rectum_radius": rng.uniform(11, 15),
        "fat_mm": rng.uniform(12, 22),  # subcutaneous fat
        "fat_pads": [  # (center offset, radii, angle): ischioanal fossae, perivesical, presacral
            *[((s * (24 + 3 * j[8]), g[1] + 30, 0), (15, 32, 90), s * 0.45) for s in (-1, 1)],
            ((0, -g[1] - 12, 0), (g[0] + 14, 18, 90), 0.0),
            ((0, g[1] + 52 + 3 * j[9], 0), (22, 20, 90), 0.0),
        ],
        "muscles": [  # (center offset, radii, angle): obturator, gluteus, anterior wall, levator
            *[((s * (g[0] + 20 + 3 * j[2]), 4.0, 0), (8, 32, 60), s * 0.2) for s in (-1, 1)],
            *[((s * (62 + 4 * j[3]), 72 + 4 * j[4], 0), (48, 32, 80), s * 0.5) for s in (-1, 1)],
            *[((s * 28, -78 + 3 * j[5], 0), (24, 9, 80), 0.0) for s in (-1, 1)],
            *[((s * 16, g[1] + 10, 0), (5, 18, 30), -s * 0.6) for s in (-1, 1)],
        ],
        "bones": [  # (center offset, radii): femoral heads, pubic rami
            *[((s * (70 + 3 * j[6]), -6, 6 + 3 * j[7]), (24, 24, 24)) for s in (-1, 1)],
            *[((s * 20, -g[1] - 22, -10), (16, 8, 22)) for s in (-1, 1)],
        ],
        "coil": bool(rng.random() < cfg.coil_share),
        "coil_gain": rng.uniform(0.8, 1.5),
        "gradient": rng.uniform(-0.002, 0.002, size=3),
        "nodules": [
            (
                tuple(p + rng.uniform([-10, -9, -8], [10, 2, 8])),
                rng.uniform(2.5, 5),
                rng.uniform(0.7, 1.4),
            )
            for _ in range(rng.integers(3, 7))
        ],
        "texture_seed": int(rng.integers(2**31)),
        "urine": (rng.uniform(700, 900), rng.uniform(2700, 3000), 4.0),
    }


def _lesions(rng: np.random.Generator, cfg: SynthConfig, scene: dict) -> list[Lesion]:
    if rng.random() < cfg.negative_share:
        return []
    lesions = []
    p, g = np.asarray(scene["prostate"]), scene["gland"]
    # A share of a component the dataset lacks is none: its lesions would be in no image.
    t2w_only = cfg.t2w_only_share
    adc_only = t2w_only + (cfg.adc_only_share if _shows_dwi(cfg.components) else 0.0)
    dce_only = adc_only + (cfg.dce_only_share if "dce" in cfg.components else 0.0)
    for _ in range(int(rng.integers(1, cfg.max_lesions + 1))):
        zone = "pz" if rng.random() < 0.7 else "tz"
        if zone == "pz":  # posterior-lateral horseshoe of the gland
            theta = rng.uniform(0.15 * np.pi, 0.85 * np.pi)
            offset = [0.7 * g[0] * np.cos(theta), 0.65 * g[1] * np.sin(theta), 0]
        else:
            offset = [rng.uniform(-0.4, 0.4) * g[0], (-0.3 + rng.uniform(-0.2, 0.2)) * g[1], 0]
        offset[2] = rng.uniform(-0.5, 0.5) * g[2]
        lo, hi = scene["z_range"]  # keep the centre 3 mm inside the T2w slab
        offset[2] = float(np.clip(p[2] + offset[2], lo + 3.0, hi - 3.0) - p[2])
        cls = int(rng.choice(5, p=_CLASS_SHARE)) + 1
        r = 3.0 + 0.9 * cls + rng.uniform(0, 2.5)
        radii = (r, r * rng.uniform(0.6, 1.0), rng.uniform(4.0, 7.0))
        u = rng.random()
        visible = "t2w" if u < t2w_only else "adc" if u < adc_only else "both"
        visible = "dce" if adc_only <= u < dce_only else visible
        lesion = Lesion(tuple(p + offset), radii, rng.uniform(0, np.pi), cls, visible, zone)
        # Extents apart (two may still meet across adjacent slices: each keeps its class).
        if not any(_touch(lesion, other) for other in lesions):
            lesions.append(lesion)
    return lesions


def _shows_dwi(components) -> bool:
    """Whether a lesion visible only in ADC/HBV is seen in one of `components`."""
    return bool({"adc", "hbv"} & set(components))


def _touch(a: Lesion, b: Lesion) -> bool:
    d = np.abs(np.subtract(a.center, b.center))
    return np.hypot(d[0], d[1]) < a.radii[0] + b.radii[0] + 1.5 and d[2] < a.radii[2] + b.radii[2]


def _t2w_grid(rng: np.random.Generator, cfg: SynthConfig) -> tuple[Grid, np.ndarray]:
    """The T2w grid, centred on the world origin +-5 mm per axis, and its centre (LPS mm)."""
    t2_extent = np.asarray(cfg.t2w_size) * np.asarray(cfg.t2w_spacing)
    t2_origin = tuple(
        rng.uniform(-5, 5, 3) + [-t2_extent[2] / 2, -t2_extent[1] / 2, -t2_extent[0] / 2]
    )
    fov_center = (
        np.asarray(t2_origin)
        + np.asarray(xyz((np.asarray(cfg.t2w_size) - 1) * cfg.t2w_spacing)) / 2
    )
    return Grid(cfg.t2w_size, cfg.t2w_spacing, t2_origin), fov_center


def _centred_grid(size_zyx, spacing_zyx, fov_center, shift_mm: float, rng) -> Grid:
    """A grid centred on `fov_center` (LPS mm), its origin shifted by up to `shift_mm` per axis."""
    extent = (np.asarray(size_zyx) - 1) * np.asarray(spacing_zyx)
    origin = fov_center - np.asarray(xyz(extent)) / 2 + rng.uniform(-1, 1, 3) * shift_mm
    return Grid(size_zyx, spacing_zyx, tuple(origin))


def _t2w_image(grid: Grid, volume: np.ndarray, scene: dict, cfg: SynthConfig, rng) -> sitk.Image:
    """The T2w image (uint16): the rendered `volume` [Z, Y, X] times the bias field, with Rician
    noise of `cfg.noise` times the urine signal."""
    t2w = add_rician_noise(volume * bias_field(grid, scene), cfg.noise * scene["urine"][0], rng)
    return grid.image(np.clip(np.round(t2w), 0, 65535).astype(np.uint16))


def _dwi_image(grid: Grid, scene: dict, lesions, name: str, rng) -> sitk.Image:
    """The ADC map (1e-6 mm^2/s, Gaussian noise sigma 60) or HBV image (Rician noise), uint16."""
    dwi = render(grid, scene, lesions, name, rng)["volume"]
    if name == "adc":
        dwi = np.clip(dwi + rng.normal(0, 60, dwi.shape), 0, None)
    else:
        dwi = add_rician_noise(dwi, 1.5, rng)
    return grid.image(np.round(dwi).astype(np.uint16))


def _dce_image(seed, cfg: SynthConfig, scene: dict, lesions, fov_center) -> sitk.Image:
    """The DCE map (uint16, % enhancement) on its own grid, from its own stream (`_DCE_STREAM`)."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_DCE_STREAM,)))
    grid = _centred_grid(cfg.dce_size, cfg.dce_spacing, fov_center, cfg.dce_shift_mm, rng)
    dce = render(grid, scene, lesions, "dce", rng)["volume"]
    dce = np.clip(dce + rng.normal(0, cfg.dce_noise, dce.shape), 0, None)
    return grid.image(np.round(dce).astype(np.uint16))


def _label(lesions: list[Lesion], weights: list[np.ndarray], size_zyx) -> np.ndarray:
    """uint8 [Z, Y, X] map of lesion classes where each lesion's weight (same shape) >= 0.5."""
    label = np.zeros(size_zyx, np.uint8)
    for lesion, w in zip(lesions, weights, strict=True):
        label[w >= 0.5] = lesion.cls
    return label


def synth_case(
    seed, cfg: SynthConfig | None = None, *, lesions: list[Lesion] | None = None
) -> SynthCase:
    """One synthetic case (SimpleITK images, label of classes, gland mask) from a seed.

    `lesions` replaces the random lesions (e.g. one at a known world position, for tests).
    """
    cfg = cfg or SynthConfig()
    rng = np.random.default_rng(seed)
    t2_grid, fov_center = _t2w_grid(rng, cfg)
    dwi_grid = _centred_grid(cfg.dwi_size, cfg.dwi_spacing, fov_center, cfg.dwi_shift_mm, rng)
    scene = _scene(rng, cfg, fov_center)
    scene["z_range"] = (t2_grid.axes[2][0], t2_grid.axes[2][-1])
    drawn = _lesions(rng, cfg, scene)  # drawn even when replaced: the later draws stay the same
    lesions = drawn if lesions is None else list(lesions)

    t2 = render(t2_grid, scene, lesions, "t2w", rng)
    images = {"t2w": _t2w_image(t2_grid, t2["volume"], scene, cfg, rng)}
    # In a fixed order (`t2w,hbv,adc` drew other ADC and HBV voxels than `t2w,adc,hbv`).
    for name in [c for c in COMPONENTS[1:] if c in cfg.components]:
        if name == "dce":
            images[name] = _dce_image(seed, cfg, scene, lesions, fov_center)
        else:
            images[name] = _dwi_image(dwi_grid, scene, lesions, name, rng)
    images = {name: images[name] for name in cfg.components}
    return SynthCase(
        images=images,
        label=t2_grid.image(_label(lesions, t2["lesions"], cfg.t2w_size)),
        mask=t2_grid.image((t2["gland"] >= 0.5).astype(np.uint8)),
        lesions=lesions,
        prostate_center=tuple(float(c) for c in scene["prostate"]),
        bladder=(
            tuple(float(c) for c in scene["bladder_center"]),
            tuple(float(r) for r in scene["bladder"]),
        ),
        coil=scene["coil"],
    )


def dataset_flag_problem(num_cases: int, seed: int) -> str | None:
    """Why `--cases` `num_cases` or `--seed` `seed` make no dataset (fewer than one case, a seed
    outside 0..2**32 - 1, which numpy reads as words: another seed's cases), or None."""
    if num_cases < 1:
        return f"--cases {num_cases}: expected at least 1"
    if not 0 <= seed < 2**32:
        return f"--seed {seed}: expected 0 to {2**32 - 1}"
    return None


def synthesis_record(num_cases: int, seed: int, cfg: SynthConfig) -> dict:
    """`{'cases', 'seed', 'config'}` as `write_dataset` records them in `SYNTH_RECORD` (the
    config's fields, tuples as lists): what decides every voxel of the dataset."""
    return json.loads(json.dumps({"cases": num_cases, "seed": seed, "config": asdict(cfg)}))


def read_synthesis_record(folder: str | os.PathLike) -> dict | None:
    """The `SYNTH_RECORD` of a dataset `write_dataset` wrote, or None (none there)."""
    path = Path(folder) / SYNTH_RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def write_dataset(
    out: str | os.PathLike,
    num_cases: int,
    seed: int = 0,
    cfg: SynthConfig | None = None,
    *,
    progress: bool = False,
    overwrite: bool = False,
) -> list[str]:
    """Write `num_cases` synthetic cases in the PI-CAI layout and a lesion table.

    Returns the list of case ids `<patient>_<study>`. Case i depends only on (seed, i); the
    arguments are recorded in `out/synth.json` (`synthesis_record`). The dataset is written to a
    temporary folder beside `out` and renamed to `out` when complete; a non-empty `out` is
    refused unless `overwrite` (then it is replaced whole), and even then unless it is an
    earlier synthetic dataset (it holds `lesions.csv`) holding nothing else (a store or notes
    put in it would be deleted).
    """
    check_output_folder(Path(out))
    with writer_lock(out, "synth"):  # a second run meanwhile replaced this one's dataset
        check_replaceable(Path(out), overwrite, "lesions.csv", "focalnet synth")
        if strays := foreign_entries(Path(out), _OWN_FILES.__contains__, _OWN_FOLDERS):
            raise UserError(
                f"--out {out} holds {strays[0]!r}, which focalnet synth did not write: "
                f"--overwrite would delete it; move it out of {out} or choose a new folder"
            )
        with replaced_folder(out) as tmp:
            return _write_cases(tmp, num_cases, seed, cfg or SynthConfig(), progress)


def _write_cases(out: Path, num_cases: int, seed: int, cfg: SynthConfig, progress: bool):
    """`write_dataset` into the (empty) folder `out`."""
    ids = np.random.default_rng([seed, 2**20])
    patients, case_ids = [], []
    for i in range(num_cases):
        # About one patient in ten has a second study, as in PI-CAI.
        new = i == 0 or ids.random() >= 0.1
        patients.append(f"{10000 + i}" if new else patients[-1])
        case_ids.append(f"{patients[-1]}_{1000000 + i}")
    rows, marks = [], []
    (out / "labels").mkdir(parents=True, exist_ok=True)
    (out / "labels" / "dataset.json").write_text(json.dumps({"label_values": "isup"}) + "\n")
    pairs = list(zip(patients, case_ids, strict=True))
    for i, (patient, case) in enumerate(
        tqdm(pairs, desc="synth", unit="case", disable=not progress)
    ):
        sc = synth_case([seed, i], cfg)
        for name, image in sc.images.items():
            write_image(image, out / "images" / patient / f"{case}_{name}.mha")
        write_image(sc.label, out / "labels" / f"{case}.nii.gz")
        write_image(sc.mask, out / "masks" / f"{case}.nii.gz")
        for j, les in enumerate(sc.lesions, start=1):
            rows.append([case, j, les.cls, les.zone, les.visible_in, *np.round(les.center, 3)])
        marks.append([patient, case.split("_")[1], max((les.cls for les in sc.lesions), default=0)])
    with (out / "lesions.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case_id", "lesion", "class", "zone", "visible_in", "x", "y", "z"])
        w.writerows(rows)
    with (out / "marksheet.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patient_id", "study_id", "case_ISUP"])
        w.writerows(marks)
    record = synthesis_record(num_cases, seed, cfg)
    (out / SYNTH_RECORD).write_text(json.dumps(record, indent=1) + "\n")
    return case_ids
