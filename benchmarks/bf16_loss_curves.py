"""bfloat16 compute against float32: the same run's training-loss curves side by side.

    python benchmarks/bf16_loss_curves.py --store STORE [--config configs/demo.py] [--steps 1200]
        [--plot curves.png] [--evaluate]
    python benchmarks/bf16_loss_curves.py --result RESULT.json --plot curves.png   # redraw only

Trains `--config` twice on the store from the same seed (same initialisation, data order and
augmentation), once with `model.dtype=float32` and once with `bfloat16` (float32 parameters and
loss either way), and prints one JSON line: the `train/loss` curve of each at every `log_every`
steps, the largest relative gap between the two curves after a moving average over
`--smooth` logged points, the final validation scalars of each, with `--evaluate` each run's FROC
sensitivity at 1 false positive per patient on its validation fold (index, csPCa, all lesions),
and the device. bf16 is acceptable where the curves match; the threshold is the reader's, the gap
is what this reports.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import jax
import numpy as np
import result_line  # benchmarks/result_line.py (the script directory)
from benchmark_flags import count, run_main
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from focalnet_jax.config_loading import load_config
from focalnet_jax.errors import UserError
from focalnet_jax.training import train_and_evaluate


def _scalars(workdir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(workdir / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def _froc_at_one_fp(workdir: Path, slices: str) -> dict[str, float]:
    """Sensitivity at 1 false positive per patient on the run's validation fold, per group."""
    from focalnet_jax.evaluation.evaluate import evaluate_predictions
    from focalnet_jax.evaluation.inference import predict_validation_fold

    predictions = workdir / "predictions"
    cases, _ = predict_validation_fold(workdir, predictions)
    metrics = evaluate_predictions(
        predictions, cases=cases, with_picai=False, with_figures=False, slices=slices
    )
    groups = ("index", "clinically_significant", "all")
    return {g: float(metrics["froc"][g]["sensitivity_at_fp"]["1"]) for g in groups}


def _smooth(values: np.ndarray, width: int) -> np.ndarray:
    return np.convolve(values, np.ones(width) / width, mode="valid")


def plot(result: dict, path: Path) -> Path:
    """Both `train/loss` curves against the step: logged values thin, moving averages thick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, width = np.asarray(result["steps"]), int(result["smooth_points"])
    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    for dtype, color in (("float32", "tab:blue"), ("bfloat16", "tab:orange")):
        loss = np.asarray(result[f"loss_{dtype}"])
        ax.plot(steps, loss, color=color, alpha=0.35, linewidth=0.8)
        ax.plot(steps[width - 1 :], _smooth(loss, width), color=color, linewidth=2.0, label=dtype)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (FL + lambda MFL)")
    ax.set_title(
        f"{result['config']} on {result['device_kind']}: mean gap "
        f"{100 * result['mean_relative_gap_smoothed']:.0f} %, max "
        f"{100 * result['max_relative_gap_smoothed']:.0f} % (moving average of {width})",
        fontsize=9,
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", help="preprocessed store (needed unless --result)")
    parser.add_argument("--config", default="configs/demo.py")
    parser.add_argument("--steps", type=count(0), default=0, help="0: the config's train.steps")
    parser.add_argument(
        "--smooth", type=count(1), default=5, help="logged points per moving average"
    )
    parser.add_argument("--plot", type=Path, help="also draw both curves into this PNG")
    parser.add_argument(
        "--evaluate",
        action="store_true",
        help="also evaluate each run on its validation fold (FROC sensitivity at 1 FP/patient)",
    )
    parser.add_argument("--result", type=Path, help="a saved result line to redraw (no training)")
    return parser


def _train_both(args, overrides: list[str]) -> tuple[dict, dict]:
    """Trains `--config` in float32 and in bfloat16 (temporary workdirs): each run's scalars
    (`_scalars`) and, with `--evaluate`, its `_froc_at_one_fp` (else {})."""
    runs, froc = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "bfloat16"):
            extra = [f"--config.data.store={args.store}", f"--config.model.dtype={dtype}"]
            if args.steps:
                extra.append(f"--config.train.steps={args.steps}")
            config = load_config(args.config, [*overrides, *extra])
            workdir = Path(tmp) / dtype
            with result_line.stdout_to_stderr():
                train_and_evaluate(config, workdir)
            runs[dtype] = _scalars(workdir)
            if args.evaluate:
                froc[dtype] = _froc_at_one_fp(workdir, str(config.data.slices))
    return runs, froc


def _check_smooth(smooth: int, points: int) -> None:
    """A moving average wider than the curve's `points` (np.convolve then swaps its inputs: one
    ratio of sums, a gap of 0 for opposite curves) is refused."""
    if smooth > points:
        raise UserError(f"--smooth {smooth}: the runs log {points} train/loss points; choose fewer")


def _logged_points(config) -> int | None:
    """The `train/loss` points a run of `config` logs (every `log_every` steps and the last), or
    None where its length is set in epochs (known once the store is read)."""
    steps = int(config.train.steps)
    return -(-steps // int(config.train.log_every)) if steps > 0 else None


def _compare_curves(runs: dict, smooth: int) -> dict:
    """Both `train/loss` curves, their relative gap after a moving average over `smooth`
    logged points (largest and mean), and each run's final `val/` scalars."""
    steps, loss32 = map(np.asarray, zip(*runs["float32"]["train/loss"], strict=True))
    _, loss16 = map(np.asarray, zip(*runs["bfloat16"]["train/loss"], strict=True))
    _check_smooth(smooth, len(loss32))
    smooth32, smooth16 = _smooth(loss32, smooth), _smooth(loss16, smooth)
    gap = np.abs(smooth16 - smooth32) / np.abs(smooth32)
    return {
        "steps": [int(s) for s in steps],
        "loss_float32": [float(v) for v in loss32],
        "loss_bfloat16": [float(v) for v in loss16],
        "smooth_points": smooth,
        "max_relative_gap_smoothed": float(gap.max()),
        "mean_relative_gap_smoothed": float(gap.mean()),
        "final_val": {
            dtype: {tag: scalars[tag][-1][1] for tag in scalars if tag.startswith("val/")}
            for dtype, scalars in runs.items()
        },
    }


def main(argv: list[str] | None = None) -> None:
    """Trains both runs and prints the JSON line (or redraws a saved one: `--result`)."""
    parser = _parser()
    args, overrides = parser.parse_known_args(argv)
    if args.result:
        if not args.plot:
            parser.error("--result only redraws a saved result: give --plot PNG")
        result = json.loads(args.result.read_text())
    elif not args.store:
        parser.error("--store is required (or --result with --plot to redraw a saved result)")
    else:
        steps = [f"--config.train.steps={args.steps}"] if args.steps else []
        points = _logged_points(load_config(args.config, [*overrides, *steps]))
        if points is not None:  # before two runs are trained
            _check_smooth(args.smooth, points)
        runs, froc = _train_both(args, overrides)
        compared = _compare_curves(runs, args.smooth)
        result = {
            "benchmark": "bf16_loss_curves",
            "config": args.config,
            "overrides": overrides,
            **compared,
            "froc_sensitivity_at_1fp": froc or None,
            "device_kind": jax.devices()[0].device_kind,
            **result_line.provenance(),
        }
    if args.plot:
        plot(result, args.plot)
    print(json.dumps(result))


if __name__ == "__main__":
    run_main(main)
