"""Plot `benchmarks/mfl_scaling.py` results: time and memory ratios to the plain step against the
number of MFL subsets, one line per mode and chunk size.

    python benchmarks/plot_mfl_scaling.py RESULT.json [RESULT.json ...] --out FIGURE.png
"""

from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_ROW_KEYS = ("subsets", "mode", "mfl_chunk", "time_ratio", "memory_ratio")
_RUN_KEYS = ("results", "model", "batch_size", "image_size", "device", "date")


def _read_result(parser: argparse.ArgumentParser, path: str) -> dict:
    """The JSON line of `mfl_scaling.py` in `path`; a missing file or another file ends the
    script in one line (`parser.error`)."""
    try:
        with open(path) as f:
            run = json.load(f)
    except OSError as error:
        parser.error(f"{path}: {error.strerror}")
    except ValueError as error:
        parser.error(f"{path}: not JSON ({error})")
    missing = [k for k in _RUN_KEYS if not isinstance(run, dict) or k not in run]
    rows = run.get("results") if not missing else None
    if missing or not isinstance(rows, list) or not rows:
        parser.error(f"{path}: not a result of mfl_scaling.py (no {', '.join(missing) or 'rows'})")
    if gaps := [k for k in _ROW_KEYS if any(not isinstance(r, dict) or k not in r for r in rows)]:
        parser.error(f"{path}: not a result of mfl_scaling.py (a row has no {gaps[0]})")
    return run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", nargs="+", help="JSON lines printed by mfl_scaling.py")
    parser.add_argument("--out", required=True, help="PNG to write")
    args = parser.parse_args(argv)
    runs = [_read_result(parser, path) for path in args.results]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for run in runs:
        lines = sorted({(r["mode"], r["mfl_chunk"]) for r in run["results"]})
        for mode, chunk in lines:
            rows = sorted(
                (r for r in run["results"] if (r["mode"], r["mfl_chunk"]) == (mode, chunk)),
                key=lambda r: r["subsets"],
            )
            label = f"{mode}, mfl_chunk={chunk or 'all'}"
            style = "-o" if mode == "select" else "--s"
            for ax, key in zip(axes, ("time_ratio", "memory_ratio"), strict=True):
                ax.plot([r["subsets"] for r in rows], [r[key] for r in rows], style, label=label)
    first = runs[0]
    for ax, title, target in zip(
        axes, ("step time / plain step", "compiled peak memory / plain step"), (7, 2), strict=True
    ):
        ax.axhline(target, color="grey", lw=0.8, ls=":", label=f"target at 14 subsets: {target}x")
        ax.set(xlabel="MFL subsets M", title=title, yscale="log")
        ax.set_xticks(sorted({r["subsets"] for r in first["results"]}))
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(
        f"{first['model']}, batch {first['batch_size']}, {first['image_size']}px, "
        f"{first['device']} ({first['date']}, indicative)",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)


if __name__ == "__main__":
    main()
