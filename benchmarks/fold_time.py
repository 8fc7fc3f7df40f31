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
at that rate (start-up, compilation, validation, checkpoints of the shortened run). The whole
fold validates and saves more often than its first steps (`validations` and `checkpoints` give
both counts): the projection leaves the time of those extra ones out. Prints one JSON line:
measured `wall_s`, `steps_run`, `fold_steps`, `steady_step_time_s`, `overhead_s`,
`projected_fold_s` (the measured wall time when the whole fold ran), the compilation cache folder
in use (null: every step compiled in this run), the device and its peak memory (null on CPU).
A SIGTERM (e.g. a time limit's) stops the run at its next step, saved; the line is then printed
for the steps done (`stopped_by_sigterm`; its `overhead_s` holds that stop's checkpoint and no
last validation).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import result_line  # benchmarks/result_line.py (the script directory)

from focalnet_jax.config_loading import load_config
from focalnet_jax.data.store import open_store
from focalnet_jax.demo import synthetic_store
from focalnet_jax.run import RunSpec
from focalnet_jax.training import train_and_evaluate
from focalnet_jax.training.graceful_stop import TrainingStopped
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


def _schedule_config(parser, args, overrides: list[str], store: Path):
    """The config on `store`, its schedule set from `--train-slices` (unless 0)."""
    config = load_config(args.config, [*overrides, f"--config.data.store={store}"])
    batch = config.train.batch_size
    if args.train_slices:
        if args.train_slices < batch:
            parser.error(f"--train-slices {args.train_slices} < one batch of {batch}")
        config.train.steps = config.train.epochs * (args.train_slices // batch)
    return config


def _steps_to_run(parser, config, fold_steps: int, max_steps: int) -> int:
    """The fold's steps, or its first `max_steps`; fewer than 3 logged intervals is an error."""
    steps_run = min(max_steps, fold_steps) if max_steps > 0 else fold_steps
    if steps_run < 3 * config.train.log_every:
        parser.error(
            f"{steps_run} steps give fewer than 3 logged intervals of train.log_every="
            f"{config.train.log_every}: raise --max-steps or lower --config.train.log_every"
        )
    return steps_run


def _timed_run(config, store) -> tuple[float, list[float], int | None]:
    """Trains `config` in a fresh temporary workdir: (wall seconds, `step_intervals`, and the
    step a SIGTERM stopped it at (its checkpoint saved), else None). A time limit's SIGTERM thus
    still gives the intervals logged so far."""
    with tempfile.TemporaryDirectory(prefix="fold_time_") as tmp:
        stopped_at = None
        with result_line.stdout_to_stderr():
            start = time.perf_counter()
            try:
                train_and_evaluate(config, Path(tmp), store=store)
            except TrainingStopped as stop:
                stopped_at = stop.step
            wall = time.perf_counter() - start
        return wall, step_intervals(Path(tmp), config.train.batch_size), stopped_at


def event_counts(every: int, steps: int) -> int:
    """How often a loop of `steps` steps validates (or saves) with `every`: at each multiple of
    `every` and at the last step (0 = only at the last step)."""
    multiples = steps // every if every else 0
    return multiples + (0 if every and steps % every == 0 else 1)


def _event_counts(train, steps_run: int, fold_steps: int, stopped: bool) -> dict:
    """`validations` and `checkpoints`: {"run": in the run, "fold": in the whole fold}. A run
    stopped by SIGTERM saved at its stop but did not validate there."""
    counts = {}
    for name, every in (("validations", train.eval_every), ("checkpoints", train.checkpoint_every)):
        run = event_counts(every, steps_run)
        if stopped and name == "validations":
            run = steps_run // every if every else 0
        counts[name] = {"run": run, "fold": event_counts(every, fold_steps)}
    return counts


def _projection(wall: float, intervals: list[float], steps_run: int, fold_steps: int) -> dict:
    """The measured wall time and, where the run stopped early, the fold's time projected from
    the steady step time (the median interval after the first, which holds the compilation)."""
    steady = float(np.median(intervals[1:]))
    overhead = wall - steps_run * steady
    return {
        "wall_s": wall,
        "steady_step_time_s": steady,
        "first_interval_step_time_s": intervals[0],
        "overhead_s": overhead,
        "projected_fold_s": wall if steps_run == fold_steps else overhead + fold_steps * steady,
        "projected": steps_run < fold_steps,
    }


def main(argv: list[str] | None = None) -> None:
    """Times the fold (or its first `--max-steps` steps) and prints the JSON line."""
    parser = _parser()
    args, overrides = parser.parse_known_args(argv)
    if args.store is None:
        with result_line.stdout_to_stderr():
            args.store = synthetic_store(args.out, cases=args.cases, workers=args.workers)
    config = _schedule_config(parser, args, overrides, args.store)
    opened = open_store(args.store)
    spec = RunSpec.from_config(config)
    train_slices = len(spec.fold_split(opened).train_rows)
    fold_steps = spec.total_steps(train_slices // config.train.batch_size)
    steps_run = _steps_to_run(parser, config, fold_steps, args.max_steps)
    config.train.steps = steps_run
    wall, intervals, stopped_at = _timed_run(config, opened)
    if stopped_at is not None:  # SIGTERM (a time limit): project from the steps done
        steps_run = stopped_at
        if len(intervals) < 3:
            raise SystemExit(f"stopped by SIGTERM at step {stopped_at}: under 3 logged intervals")
    result = {
        "benchmark": "fold_time",
        "config": args.config,
        "overrides": overrides,
        "store": str(args.store),
        "store_train_slices": train_slices,
        "schedule_train_slices": args.train_slices or train_slices,
        "batch_size": config.train.batch_size,
        "fold_steps": fold_steps,
        "steps_run": steps_run,
        "stopped_by_sigterm": stopped_at is not None,
        **_projection(wall, intervals, steps_run, fold_steps),
        **_event_counts(config.train, steps_run, fold_steps, stopped_at is not None),
        # A warm persistent cache ($JAX_COMPILATION_CACHE_DIR) skips the compilation.
        "compilation_cache": jax.config.jax_compilation_cache_dir,
        "model": result_line.model_description(config),
        "loss": config.loss.name,
        "mfl": config.loss.mfl_mode if config.loss.mfl else None,
        "device_peak_bytes": result_line.device_peak_bytes(),
        **result_line.device_fields(),
        **result_line.provenance(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
