"""One command for the synthetic MFL study (configs/studies/synthetic_mfl.py):

    python -m focalnet_jax.study.synthetic --out runs/synthetic_mfl \
        [--results docs/results/synthetic_mfl] [--spec.KEY=VALUE ...]

synthesises a PI-CAI-layout dataset where most lesions are visible in only one component (MFL's
premise), preprocesses it, prints the patient-level folds, runs the study with the local executor
and writes its report; `--results` copies the report folder there. Every step already done in
`--out` is kept, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import time
from pathlib import Path

from focalnet_jax import cli

SPEC = Path(__file__).resolve().parents[2] / "configs" / "studies" / "synthetic_mfl.py"


def _run(argv: list[str]) -> None:
    print(f"\n$ focalnet {shlex.join(argv)}", flush=True)
    status = cli.main(argv)
    if status:
        raise SystemExit(f"focalnet {' '.join(argv[:2])} failed with status {status}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m focalnet_jax.study.synthetic",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, required=True, help="data, store and study folder")
    parser.add_argument("--cases", type=int, default=60, help="synthetic cases")
    parser.add_argument("--seed", type=int, default=0, help="synthetic data seed")
    parser.add_argument("--single-share", type=float, default=0.4, help="T2w-only = ADC-only")
    parser.add_argument("--parallel", type=int, default=1, help="cells at once")
    parser.add_argument("--results", type=Path, help="copy DIR/report here")
    args, overrides = parser.parse_known_args(argv)
    start = time.perf_counter()
    data, store, study = args.out / "data", args.out / "store", args.out / "study"
    if not (data / "marksheet.csv").is_file():
        share = str(args.single_share)
        _run(["synth", "--out", str(data), "--cases", str(args.cases), "--seed", str(args.seed),
              "--t2w-only-share", share, "--adc-only-share", share])  # fmt: skip
    if not (store / "cases.json").is_file():
        _run(["preprocess", "--layout=picai", f"--images={data / 'images'}",
              f"--labels={data / 'labels'}", f"--masks={data / 'masks'}", f"--out={store}",
              "--workers=2"])  # fmt: skip
    _run(["folds", f"--store={store}", "--num-folds=5"])
    run = ["study", "run", f"--spec={SPEC}:{store}", f"--workdir={study}"]
    _run([*run, f"--parallel={args.parallel}", *overrides])
    _run(["study", "report", f"--workdir={study}"])
    if args.results:
        shutil.copytree(study / "report", args.results, dirs_exist_ok=True)
        print(f"copied {study / 'report'} to {args.results}")
    print(f"\nsynthetic MFL study finished in {(time.perf_counter() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
