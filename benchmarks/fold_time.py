"""One training fold, timed end to end: the real loop (`train_and_evaluate`) with its compilation,
input pipeline, steps, validation, checkpoints and TensorBoard logs.

    python benchmarks/fold_time.py --config configs/focalnet.py [--store STORE]
        [--train-slices 1400] [--max-steps N] [--config.k=v ...]

The paper trains each fold for 200 epochs over about 1400 training slices at batch 16 (section
III-A): 87 steps an epoch, 17,400 steps. `--train-slices N` sets the fold's schedule to
`train.epochs * (N // train.batch_size)` steps whatever the store's size (a step's time does not
depend on what the slices show); `--train-slices 0` keeps the config's own schedule on the store.
Without `--store`, `--cases` synthetic cases are written and preprocessed under `--out` (reused
when already there).

The run starts fresh in a temporary workdir. `--max-steps` stops it early (a quick look on a slow
machine); the fold's time is then projected as `overhead_s + fold_steps * steady_step_time_s`,
where the steady step time is the median of the loop's logged intervals after the first (the first
holds the compilation) and `overhead_s` is the measured wall time not explained by the steps run
at that rate (start-up, compilation, validation, checkpoints of the shortened run). Prints one
JSON line: measured `wall_s`, `steps_run`, `fold_steps`, `steady_step_time_s`, `overhead_s`,
`projected_fold_s` (the measured wall time when the whole fold ran), the compilation cache folder
in use (null: every step compiled in this run) and the device.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from focalnet_jax.config_loading import load_config
from focalnet_jax.data.store import open_store
from focalnet_jax.demo import synthetic_store
from focalnet_jax.run import RunSpec
from focalnet_jax.training import train_and_evaluate
from focalnet_jax.training.tb_logging import read_scalars


def step_intervals(workdir: Path, batch_size: int) -> list[float]:
    """Seconds per step over each logged interval, from `train/images_per_s`."""
    _, images_per_s = read_scalars(workdir / "tb", "train/images_per_s")
    return [batch_size / float(v) for v in images_per_s]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="config file[:arg]")
    parser.add_argument("--store", type=Path, help="preprocessed store (default: synthetic)")
    parser.add_argument("--out", type=Path, default=Path("fold_time_data"), help="synthetic data")
    parser.add_argument("--cases", type=int, default=60, help="synthetic cases without --store")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--train-slices",
        type=int,
        default=1400,
        help="training slices of the fold's schedule (paper: ~1400); 0 = the store's",
    )
    parser.add_argument("--max-steps", type=int, default=0, help="stop early and project; 0 = all")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args, overrides = parser.parse_known_args(argv)
    if args.store is None:
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON line
            args.store = synthetic_store(args.out, cases=args.cases, workers=args.workers)
    store = args.store

    config = load_config(args.config, [*overrides, f"--config.data.store={store}"])
    batch = config.train.batch_size
    if args.train_slices:
        if args.train_slices < batch:
            parser.error(f"--train-slices {args.train_slices} < one batch of {batch}")
        config.train.steps = config.train.epochs * (args.train_slices // batch)
    opened = open_store(store)
    spec = RunSpec.from_config(config)
    train_rows = spec.fold_split(opened).train_rows
    fold_steps = spec.total_steps(len(train_rows) // batch)
    steps_run = min(args.max_steps, fold_steps) if args.max_steps > 0 else fold_steps
    if steps_run < 3 * config.train.log_every:
        parser.error(
            f"{steps_run} steps give fewer than 3 logged intervals of train.log_every="
            f"{config.train.log_every}: raise --max-steps or lower --config.train.log_every"
        )
    config.train.steps = steps_run

    with tempfile.TemporaryDirectory(prefix="fold_time_") as tmp:
        with contextlib.redirect_stdout(sys.stderr):
            start = time.perf_counter()
            train_and_evaluate(config, Path(tmp), store=opened)
            wall = time.perf_counter() - start
        intervals = step_intervals(Path(tmp), batch)
    steady = float(np.median(intervals[1:]))
    overhead = wall - steps_run * steady
    device = jax.devices()[0]
    print(
        json.dumps(
            {
                "benchmark": "fold_time",
                "config": args.config,
                "overrides": overrides,
                "store": str(store),
                "store_train_slices": int(len(train_rows)),
                "schedule_train_slices": args.train_slices or int(len(train_rows)),
                "batch_size": batch,
                "fold_steps": fold_steps,
                "steps_run": steps_run,
                "wall_s": wall,
                "steady_step_time_s": steady,
                "first_interval_step_time_s": intervals[0],
                "overhead_s": overhead,
                "projected_fold_s": wall
                if steps_run == fold_steps
                else overhead + fold_steps * steady,
                "projected": steps_run < fold_steps,
                # A warm persistent cache ($JAX_COMPILATION_CACHE_DIR) skips the compilation.
                "compilation_cache": jax.config.jax_compilation_cache_dir,
                "model": f"{config.model.name}-{config.model.depth} width {config.model.width} "
                f"OS {config.model.output_stride} {config.model.dtype}",
                "loss": config.loss.name,
                "mfl": config.loss.mfl_mode if config.loss.mfl else None,
                "device_kind": device.device_kind,
                "platform": device.platform,
                "num_devices": jax.device_count(),
                "jax_version": jax.__version__,
                "date": datetime.date.today().isoformat(),
            }
        )
    )


if __name__ == "__main__":
    main()
