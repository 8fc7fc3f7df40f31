"""One command for the synthetic MFL study (configs/studies/synthetic_mfl.py):

    python -m focalnet_jax.study.synthetic --out runs/synthetic_mfl \\
        [--results docs/results/synthetic_mfl] [--spec.KEY=VALUE ...]

synthesises a PI-CAI-layout dataset where most lesions are visible in only one component (MFL's
premise), preprocesses it, prints the patient-level folds, runs the study with the local executor
and writes its report; `--results` copies the report folder there. Every step already done in
`--out` is kept, so an interrupted run continues where it stopped; data there made with another
`--cases`, `--seed` or `--single-share` is refused. Each step is a `focalnet`
command run as `python -m focalnet_jax.cli` in a child process, printed before it runs.
"""

from __future__ import annotations

import argparse
import io
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from focalnet_jax.study.spec import relative_to_cwd

SPEC = Path(__file__).resolve().parents[2] / "configs" / "studies" / "synthetic_mfl.py"


def focalnet(argv: list[str]) -> None:
    """Print and run `focalnet ARGV` in a child process; SystemExit when it fails. The child
    writes to the file behind `sys.stdout` where there is one, so `contextlib.redirect_stdout`
    redirects its output too."""
    print(f"\n$ focalnet {shlex.join(argv)}", flush=True)
    status = subprocess.call([sys.executable, "-m", "focalnet_jax.cli", *argv], stdout=_stdout_fd())
    if status:
        raise SystemExit(f"focalnet {argv[0]} failed with status {status}")


def _stdout_fd() -> int | None:
    """The file descriptor behind `sys.stdout` (None for one without a file: inherit fd 1)."""
    try:
        return sys.stdout.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None


def _store_is_current(store: Path) -> bool:
    """Whether `store` holds a store this code reads (absent or of an older format: False)."""
    from focalnet_jax.data.store import open_store
    from focalnet_jax.data.store_settings import StaleStoreError

    try:
        open_store(store)
    except (FileNotFoundError, StaleStoreError) as why:
        if (store / "cases.json").is_file():
            print(f"rebuilding the store: {why}")
        return False
    return True


def _made_as_asked(data: Path, expected: dict) -> bool:
    """Whether `data` holds the synthetic dataset `expected` (a `synthesis_record`) describes;
    False when there is none, an incomplete one or one without a record (an older version: it is
    rebuilt). Raises `SystemExit` for one made with other arguments: its store and what was
    trained on it (the demo's run, a study) are not those asked for, and replacing it would lose
    them."""
    from focalnet_jax.data.store_settings import flat_settings
    from focalnet_jax.data.synth import SYNTH_RECORD, read_synthesis_record

    if not (data / "marksheet.csv").is_file():
        return False
    recorded = read_synthesis_record(data)
    if recorded is None:
        print(f"rebuilding the synthetic data: {data} has no {SYNTH_RECORD} (an older version)")
        return False
    made, asked = flat_settings(recorded), flat_settings(expected)  # 'config.<field>' keys
    differ = [f"{k} {made.get(k)!r} (asked {v!r})" for k, v in asked.items() if made.get(k) != v]
    if differ:
        raise SystemExit(
            f"{data}: synthetic data made with {', '.join(differ)}; the store made from it, and "
            "what was trained on that, are not those asked for: use another --out"
        )
    return True


def synthetic_store(
    out: Path, *, cases: int, seed: int = 0, workers: int = 2, single_share: float | None = None
) -> Path:
    """`focalnet synth` into `out/data` (with `single_share` of lesions visible in T2w only and
    as many in ADC only), then `focalnet preprocess` into `out/store`; each is skipped when its
    output is already there (`_made_as_asked`: data made with other arguments is refused), and a
    store of an older format or of rebuilt data is rebuilt. Returns the store."""
    from focalnet_jax.data.synth import SynthConfig, synthesis_record

    data, store = out / "data", out / "store"
    shares = {"t2w_only_share": single_share, "adc_only_share": single_share}
    try:  # as `focalnet synth` records it
        config = SynthConfig(**(shares if single_share is not None else {}))
    except ValueError as error:
        raise SystemExit(f"--single-share {single_share}: {error}") from None
    rebuilt = not _made_as_asked(data, synthesis_record(cases, seed, config))
    if rebuilt:
        synth = ["synth", f"--out={data}", "--cases", str(cases), "--seed", str(seed)]
        synth.append("--overwrite")
        if single_share is not None:
            synth += ["--t2w-only-share", str(single_share), "--adc-only-share", str(single_share)]
        focalnet(synth)
    if rebuilt or not _store_is_current(store):
        focalnet(["preprocess", "--layout=picai", f"--images={data / 'images'}",
                  f"--labels={data / 'labels'}", f"--masks={data / 'masks'}", f"--out={store}",
                  f"--workers={workers}", "--overwrite"])  # fmt: skip
    return store


def check_flags(parser: argparse.ArgumentParser, args, *counts: str) -> None:
    """Refuses before any step runs (a parser error, exit status 2) a `--cases` below 1, a
    `--seed` outside `focalnet synth`'s range and each flag of `counts` (e.g. 'workers') below 1:
    a bad one was refused by the step it reached, after synthesis (and preprocessing) were done."""
    from focalnet_jax.data.synth import dataset_flag_problem

    if problem := dataset_flag_problem(args.cases, args.seed):
        parser.error(problem)
    for name in counts:
        if (value := getattr(args, name)) < 1:
            parser.error(f"--{name} {value}: expected at least 1")


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
    check_flags(parser, args, "parallel")
    if not SPEC.is_file():  # before minutes of synthesis and preprocessing
        raise SystemExit(f"{SPEC} not found: run the study from a clone of the repository")
    start = time.perf_counter()
    store = synthetic_store(
        args.out, cases=args.cases, seed=args.seed, single_share=args.single_share
    )
    study = args.out / "study"
    focalnet(["folds", f"--store={store}", "--num-folds=5"])
    run = ["study", "run", f"--spec={relative_to_cwd(SPEC)}:{store}", f"--workdir={study}"]
    focalnet([*run, f"--parallel={args.parallel}", *overrides])
    focalnet(["study", "report", f"--workdir={study}"])
    if args.results:
        shutil.copytree(study / "report", args.results, dirs_exist_ok=True)
        print(f"copied {study / 'report'} to {args.results}")
    print(f"\nsynthetic MFL study finished in {(time.perf_counter() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
