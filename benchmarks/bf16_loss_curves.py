"""bfloat16 compute against float32: the same run's training-loss curves side by side.

    python benchmarks/bf16_loss_curves.py --store STORE [--config configs/demo.py] [--steps 1200]

Trains `--config` twice on the store from the same seed (same initialisation, data order and
augmentation), once with `model.dtype=float32` and once with `bfloat16` (float32 parameters and
loss either way), and prints one JSON line: the `train/loss` curve of each at every `log_every`
steps, the largest relative gap between the two curves after a moving average over
`--smooth` logged points, the final validation scalars of each, and the device. bf16 is acceptable
where the curves match; the threshold is the reader's, the gap is what this reports.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from focalnet_jax.config_loading import load_config
from focalnet_jax.training import train_and_evaluate


def _scalars(workdir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(workdir / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def _smooth(values: np.ndarray, width: int) -> np.ndarray:
    return np.convolve(values, np.ones(width) / width, mode="valid")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", required=True, help="preprocessed store")
    parser.add_argument("--config", default="configs/demo.py")
    parser.add_argument("--steps", type=int, default=0, help="0: the config's train.steps")
    parser.add_argument("--smooth", type=int, default=5, help="logged points per moving average")
    args, overrides = parser.parse_known_args(argv)

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "bfloat16"):
            extra = [f"--config.data.store={args.store}", f"--config.model.dtype={dtype}"]
            if args.steps:
                extra.append(f"--config.train.steps={args.steps}")
            config = load_config(args.config, [*overrides, *extra])
            workdir = Path(tmp) / dtype
            with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON line
                train_and_evaluate(config, workdir)
            runs[dtype] = _scalars(workdir)

    steps, loss32 = map(np.asarray, zip(*runs["float32"]["train/loss"], strict=True))
    _, loss16 = map(np.asarray, zip(*runs["bfloat16"]["train/loss"], strict=True))
    smooth32, smooth16 = _smooth(loss32, args.smooth), _smooth(loss16, args.smooth)
    gap = np.abs(smooth16 - smooth32) / np.abs(smooth32)
    final_val = {
        dtype: {tag: scalars[tag][-1][1] for tag in scalars if tag.startswith("val/")}
        for dtype, scalars in runs.items()
    }
    print(
        json.dumps(
            {
                "benchmark": "bf16_loss_curves",
                "config": args.config,
                "overrides": overrides,
                "steps": [int(s) for s in steps],
                "loss_float32": [float(v) for v in loss32],
                "loss_bfloat16": [float(v) for v in loss16],
                "smooth_points": args.smooth,
                "max_relative_gap_smoothed": float(gap.max()),
                "mean_relative_gap_smoothed": float(gap.mean()),
                "final_val": final_val,
                "device_kind": jax.devices()[0].device_kind,
                "jax_version": jax.__version__,
                "date": datetime.date.today().isoformat(),
            }
        )
    )


if __name__ == "__main__":
    main()
