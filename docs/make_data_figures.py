"""Make the figures of docs/data.md from the ProstateX exam and a synthetic case.

    python docs/make_data_figures.py [--prostatex ../shared/data/prostatex/ProstateX-0000]

Writes docs/figures/synthetic_vs_prostatex.png and docs/figures/preprocessing_before_after.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from focalnet_jax.data import preprocess_case  # noqa: E402
from focalnet_jax.data.io import read_image  # noqa: E402
from focalnet_jax.data.synth import synth_case  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FINDING = (25.7457, 31.8707, -38.511)  # ProstateX-0000, GS 4+3, LPS mm


def _slice_at(image: sitk.Image, point) -> tuple[np.ndarray, float, float]:
    """The axial slice of `image` nearest to a world point, and the point's (col, row) on it."""
    i, j, k = image.TransformPhysicalPointToContinuousIndex(tuple(float(c) for c in point))
    k = int(np.clip(round(k), 0, image.GetSize()[2] - 1))
    return sitk.GetArrayViewFromImage(image)[k], i, j


def _extent(image: sitk.Image):
    """imshow extent in mm relative to the origin (so grids of different spacing line up)."""
    sx, sy, _ = image.GetSpacing()
    nx, ny, _ = image.GetSize()
    return (-0.5 * sx, (nx - 0.5) * sx, (ny - 0.5) * sy, -0.5 * sy)


def synthetic_vs_prostatex(real: dict, synth: dict, point_real, point_synth, out: Path) -> None:
    fig, axes = plt.subplots(2, 3, figsize=(10.5, 7.2))
    limits = {"t2w": None, "adc": (0, 3000), "hbv": None}
    for row, (title, images, point) in enumerate(
        (("ProstateX-0000", real, point_real), ("synthetic", synth, point_synth))
    ):
        for col, name in enumerate(("t2w", "adc", "hbv")):
            image = images[name]
            plane, _, _ = _slice_at(image, point)
            vmin, vmax = limits[name] or (0, np.percentile(plane, 99.5))
            ax = axes[row, col]
            ax.imshow(plane, cmap="gray", vmin=vmin, vmax=vmax, extent=_extent(image))
            ax.set_title(f"{title}: {name.upper()} {image.GetSize()[0]}x{image.GetSize()[1]}, "
                         f"{image.GetSpacing()[0]:.1f} mm", fontsize=9)  # fmt: skip
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("Native grids, one axial slice through the gland (ADC window 0-3000 x 1e-6 mm²/s)")
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


def before_after(real: dict, case, out: Path) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(8, 8))
    s, r, c = case.world_to_pixel(*FINDING)
    k = int(round(case.slice_index[int(round(s))]))
    corners = case.pixel_to_world(
        [s, s, s, s, s], [-0.5, -0.5, 127.5, 127.5, -0.5], [-0.5, 127.5, 127.5, -0.5, -0.5]
    )
    for row, name in enumerate(("t2w", "adc")):
        image = real[name]
        plane, i, j = _slice_at(image, FINDING)
        vmax = 3000 if name == "adc" else np.percentile(plane, 99.5)
        ax = axes[row, 0]
        ax.imshow(plane, cmap="gray", vmin=0, vmax=vmax)
        box = [image.TransformPhysicalPointToContinuousIndex(p) for p in zip(*corners, strict=True)]
        ax.plot([b[0] for b in box], [b[1] for b in box], "y-", lw=1)
        ax.plot(i, j, "r+", ms=10)
        ax.set_title(f"before: {name.upper()} raw, native grid (slice {k})", fontsize=9)
        crop = case.images[int(round(s)), :, :, row]
        ax = axes[row, 1]
        ax.imshow(crop, cmap="gray", vmin=0, vmax=1)
        ax.plot(c, r, "r+", ms=10)
        label = "air 0, bladder 1" if name == "t2w" else "clip 0-3000, /3000"
        ax.set_title(f"after: {name.upper()} on the 128x128 crop ({label})", fontsize=9)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("ProstateX-0000: 80 x 80 mm crop (yellow) -> 128 x 128; + = GS 4+3 finding")
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = ROOT.parent / "shared" / "data" / "prostatex" / "ProstateX-0000"
    parser.add_argument("--prostatex", type=Path, default=default)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "figures")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    real = {name: read_image(args.prostatex / name) for name in ("t2w", "adc", "hbv")}
    sc = synth_case(args.seed)
    synthetic_vs_prostatex(
        real, sc.images, FINDING, sc.prostate_center, args.out / "synthetic_vs_prostatex.png"
    )
    components = {n: args.prostatex / n for n in ("t2w", "adc")}
    case = preprocess_case(components, case_id="ProstateX-0000")
    before_after(real, case, args.out / "preprocessing_before_after.png")
    print(f"wrote figures to {args.out}")


if __name__ == "__main__":
    main()
