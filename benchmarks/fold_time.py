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
machine); the fold's time is then projected as

    overhead_s + fold_steps * steady_step_time_s
        + (fold validations) * validation_s * val_slices.schedule / val_slices.store
        - (run validations) * validation_s + (fold - run checkpoints) * checkpoint_s

where the steady step time is the median of the loop's logged intervals after the first (the first
holds the compilation), `overhead_s` is the measured wall time not explained by the steps run at
that rate (start-up, compilation, the shortened run's own validations and checkpoints), and
`validation_s` and `checkpoint_s` are the loop's own timings of each (TensorBoard's
`time/validation_s`, `time/checkpoint_s`): the median validation after the first (which compiles)
and the median checkpoint save. A validation's time is taken to grow with its slices: the fold's
validation set is `val_slices.schedule`, the schedule's training slices times the store's ratio
of validation to training slices (the paper: 83-84 validation cases to 333-334 training ones). A
shortened run that would validate fewer than twice validates every ceil(steps / 2) steps instead
(`run_eval_every`), so that one validation after the compiled one is timed; what a run could not
time (a SIGTERM before its second validation) is named in `projection_leaves_out`.
`validations` and `checkpoints` give the counts of the run and of the whole fold.

Prints one JSON line: measured `wall_s`, `steps_run`, `fold_steps`, `steady_step_time_s`,
`overhead_s`, `validation_s`, `checkpoint_s`, `projected_fold_s` (the measured wall time when the
whole fold ran), the compilation cache folder in use (null: every step compiled in this run), the
device and its peak memory (null on CPU). A SIGTERM (e.g. a time limit's) stops the run at its
next step, saved; the line is then printed for the steps done (`stopped_by_sigterm`; its
`overhead_s` holds that stop's checkpoint and no last validation).
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
from benchmark_flags import count, run_main

from focalnet_jax.config_loading import load_config
from focalnet_jax.data.store import open_store
from focalnet_jax.demo import synthetic_store
from focalnet_jax.run import RunSpec
from focalnet_jax.training import train_and_evaluate
from focalnet_jax.training.graceful_stop import TrainingStopped
from focalnet_jax.training.tb_logging import read_scalars


def loop_timings(workdir: Path, batch_size: int) -> dict[str, list[float]]:
    """What the loop logged of its time, in step order: `intervals`, seconds per step over each
    logged interval (from `train/images_per_s`); `validation_s` and `checkpoint_s`, the seconds
    of each validation and checkpoint save."""
    _, images_per_s = read_scalars(workdir / "tb", "train/images_per_s")
    timings = {"intervals": [batch_size / float(v) for v in images_per_s]}
    for name in ("validation_s", "checkpoint_s"):
        timings[name] = [float(v) for v in read_scalars(workdir / "tb", f"time/{name}")[1]]
    return timings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="config file[:arg]")
    parser.add_argument("--store", type=Path, help="preprocessed store (default: synthetic)")
    parser.add_argument("--out", type=Path, default=Path("fold_time_data"), help="synthetic data")
    parser.add_argument(
        "--cases", type=count(1), default=60, help="synthetic cases without --store"
    )
    parser.add_argument("--workers", type=count(1), default=os.cpu_count() or 1)
    parser.add_argument(
        "--train-slices",
        type=int,
        default=1400,
        help="training slices of the fold's schedule (paper: ~1400); 0 = the store's",
    )
    parser.add_argument(
        "--max-steps", type=count(0), default=0, help="stop early and project; 0 = all"
    )
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


def _timed_run(config, store) -> tuple[float, dict[str, list[float]], int | None]:
    """Trains `config` in a fresh temporary workdir: (wall seconds, `loop_timings`, and the
    step a SIGTERM stopped it at (its checkpoint saved), else None: also for a SIGTERM that came
    once the run was complete, its last validation and checkpoint done). A time limit's SIGTERM
    thus still gives the timings logged so far."""
    with tempfile.TemporaryDirectory(prefix="fold_time_") as tmp:
        stopped_at = None
        with result_line.stdout_to_stderr():
            start = time.perf_counter()
            try:
                train_and_evaluate(config, Path(tmp), store=store)
            except TrainingStopped as stop:
                stopped_at = None if stop.complete else stop.step
            wall = time.perf_counter() - start
        return wall, loop_timings(Path(tmp), config.train.batch_size), stopped_at


def event_counts(every: int, steps: int) -> int:
    """How often a loop of `steps` steps validates (or saves) with `every`: at each multiple of
    `every` and at the last step (0 = only at the last step)."""
    multiples = steps // every if every else 0
    return multiples + (0 if every and steps % every == 0 else 1)


def run_eval_every(eval_every: int, steps_run: int, fold_steps: int) -> int:
    """The run's `eval_every`: the config's, unless a shortened run would then validate fewer than
    twice; then every ceil(steps_run / 2) steps (at that step and the last)."""
    if steps_run == fold_steps or event_counts(eval_every, steps_run) >= 2:
        return eval_every
    return -(-steps_run // 2)


def _event_counts(every: dict, steps_run: int, fold_steps: int, stopped: bool) -> dict:
    """`validations` and `checkpoints`: {"run": in the run, "fold": in the whole fold}, with
    `every[name] = (run's, fold's)` interval (`None`: never, a fold without validation slices).
    A run stopped by SIGTERM saved at its stop but did not validate there."""
    counts = {}
    for name, (run_every, fold_every) in every.items():
        if fold_every is None:
            counts[name] = {"run": 0, "fold": 0}
            continue
        run = event_counts(run_every, steps_run)
        if stopped and name == "validations":  # not at the step it stopped after
            run = (steps_run - 1) // run_every if run_every else 0
        counts[name] = {"run": run, "fold": event_counts(fold_every, fold_steps)}
    return counts


def _median_or_none(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def _projection(wall: float, timings: dict, steps_run: int, fold_steps: int, counts: dict,
                val_scale: float) -> dict:  # fmt: skip
    """The measured wall time and, where the run stopped early, the fold's time projected (the
    module's formula); `val_scale`: the fold's validation slices over the store's."""
    intervals = timings["intervals"]
    steady = float(np.median(intervals[1:]))
    overhead = wall - steps_run * steady
    validation = _median_or_none(timings["validation_s"][1:])
    saving = _median_or_none(timings["checkpoint_s"])
    projected, left_out = overhead + fold_steps * steady, []
    for name, each, scale in (("validations", validation, val_scale), ("checkpoints", saving, 1)):
        run, fold = counts[name]["run"], counts[name]["fold"]
        if each is not None:  # the run's own are in `overhead`, the fold's at its size
            projected += fold * each * scale - run * each
        elif fold > run or (fold and scale != 1):
            left_out.append(name)
    full = steps_run == fold_steps
    return {
        "wall_s": wall,
        "steady_step_time_s": steady,
        "first_interval_step_time_s": intervals[0],
        "overhead_s": overhead,
        "validation_s": validation,
        "checkpoint_s": saving,
        "projected_fold_s": wall if full else projected,
        "projected": not full,
        "projection_leaves_out": [] if full else left_out,
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
    split = spec.fold_split(opened)
    train_slices, val_slices = len(split.train_rows), len(split.val_rows)
    schedule_slices = args.train_slices or train_slices
    schedule_val_slices = round(schedule_slices * val_slices / train_slices)
    fold_steps = spec.total_steps(train_slices // config.train.batch_size)
    steps_run = _steps_to_run(parser, config, fold_steps, args.max_steps)
    eval_every = config.train.eval_every
    config.train.steps = steps_run
    config.train.eval_every = run_eval_every(eval_every, steps_run, fold_steps)
    wall, timings, stopped_at = _timed_run(config, opened)
    if stopped_at is not None:  # SIGTERM (a time limit): project from the steps done
        steps_run = stopped_at
        if len(timings["intervals"]) < 3:
            raise SystemExit(f"stopped by SIGTERM at step {stopped_at}: under 3 logged intervals")
    train = config.train
    every = {
        "validations": (train.eval_every, eval_every) if val_slices else (0, None),
        "checkpoints": (train.checkpoint_every, train.checkpoint_every),
    }
    counts = _event_counts(every, steps_run, fold_steps, stopped_at is not None)
    val_scale = schedule_val_slices / val_slices if val_slices else 1.0
    result = {
        "benchmark": "fold_time",
        "config": args.config,
        "overrides": overrides,
        "store": str(args.store),
        "store_train_slices": train_slices,
        "schedule_train_slices": schedule_slices,
        "val_slices": {"store": val_slices, "schedule": schedule_val_slices},
        "batch_size": train.batch_size,
        "fold_steps": fold_steps,
        "steps_run": steps_run,
        "run_eval_every": train.eval_every,
        "stopped_by_sigterm": stopped_at is not None,
        **_projection(wall, timings, steps_run, fold_steps, counts, val_scale),
        **counts,
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
    run_main(main)
