"""`make demo`: synthesise a small dataset, preprocess it, train `configs/demo.py` on fold 0 and
evaluate the validation fold, printing each `focalnet` command as it runs it.

    python -m focalnet_jax.demo --out demo_run

Steps already done in `--out` (dataset, store, finished training) are reused, so an interrupted
demo continues where it stopped; a store of an older format is rebuilt. A few minutes on 2
CPU cores; the seconds each step took are written to `--out/timings.json` (with `reused`: whether
`--out` held earlier steps' outputs, so that not every step ran; and the CPU model).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
from itertools import pairwise
from pathlib import Path

from focalnet_jax import cli
from focalnet_jax.data.atomic_files import write_json_atomic
from focalnet_jax.study.synthetic import check_flags, synthetic_store

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.py"


def cpu_name() -> str:
    """The CPU model (Linux: `model name` of /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _run(argv: list[str]) -> None:
    print(f"\n$ focalnet {shlex.join(argv)}", flush=True)
    status = cli.main(argv)
    if status:
        raise SystemExit(f"focalnet {argv[0]} failed with status {status}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m focalnet_jax.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for data, store and run")
    parser.add_argument("--cases", type=int, default=60, help="synthetic cases (default 60)")
    parser.add_argument("--seed", type=int, default=0, help="synthetic data seed (default 0)")
    parser.add_argument(
        "--workers", type=int, default=2, help="preprocessing processes (default 2)"
    )
    parser.add_argument("overrides", nargs="*", help="extra --config.KEY=VALUE for training")
    args, extra = parser.parse_known_args(argv)
    check_flags(parser, args, "workers")
    if not CONFIG.is_file():
        raise SystemExit(f"{CONFIG} not found: run the demo from a clone of the repository")
    workdir = args.out / "run"
    reused = args.out.is_dir() and any(args.out.iterdir())
    marks = [time.perf_counter()]
    store = synthetic_store(args.out, cases=args.cases, seed=args.seed, workers=args.workers)
    marks.append(time.perf_counter())
    _run(
        [
            "train",
            f"--config={CONFIG}",
            f"--workdir={workdir}",
            f"--config.data.store={store}",
            *args.overrides,
            *extra,
        ]
    )
    marks.append(time.perf_counter())
    _run(["evaluate", f"--workdir={workdir}", "--picai-bootstraps=0"])
    marks.append(time.perf_counter())
    names = ("synth_and_preprocess", "train", "evaluate")
    steps = {n: round(b - a, 1) for n, (a, b) in zip(names, pairwise(marks), strict=True)}
    timings = {
        "seconds": {**steps, "total": round(marks[-1] - marks[0], 1)},
        "reused": reused,
        "cases": args.cases,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "cpu": cpu_name(),  # float32 round-off, so the trained model, differs by CPU model
        "date": datetime.date.today().isoformat(),
    }
    write_json_atomic(timings, args.out / "timings.json")
    minutes = (marks[-1] - marks[0]) / 60
    print(
        f"\ndemo finished in {minutes:.1f} min: checkpoints in {workdir / 'checkpoints'}, "
        f"TensorBoard logs in {workdir / 'tb'} (tensorboard --logdir {shlex.quote(str(workdir))}); "
        f"metrics and figures in {workdir / 'eval'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
