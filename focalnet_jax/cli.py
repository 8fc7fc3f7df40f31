"""The `focalnet` console script: argument parsing only (commands: README.md).

Each subcommand has an `_add_<name>` function that declares its flags and a `_run_<name>` function
that imports the module doing the work lazily (so `focalnet synth` does not pay for importing JAX).
A user error (`errors.one_line_user_errors`) of any command ends as one line on stderr, `focalnet
<command>: error: <message>`, and exit status 2; `--verbose` adds its traceback. Other exceptions
keep their traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from focalnet_jax.errors import UserError, one_line_user_errors

# --- data: synth, preprocess, folds ---------------------------------------------------------------


def _add_synth(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="dataset folder (PI-CAI layout)")
    parser.add_argument("--cases", type=int, required=True, help="number of cases (studies)")
    parser.add_argument("--seed", type=int, default=0, help="case i depends only on (seed, i)")
    parser.add_argument(
        "--small", action="store_true", help="96 x 96 x 6 T2w (1 x 1 x 3 mm) for quick tests"
    )
    parser.add_argument("--t2w-only-share", type=float, default=0.15, help="lesions only in T2w")
    parser.add_argument(
        "--adc-only-share", type=float, default=0.15, help="lesions only in ADC/HBV"
    )
    parser.add_argument("--dce-only-share", type=float, default=0.15, help="lesions only in DCE")
    parser.add_argument(
        "--components", default="t2w,adc,hbv", help="comma-separated, t2w first; of t2w,adc,hbv,dce"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def _run_synth(args: argparse.Namespace) -> int:
    from focalnet_jax.data.synth import SynthConfig, write_dataset

    options = {"t2w_only_share": args.t2w_only_share, "adc_only_share": args.adc_only_share}
    options["dce_only_share"] = args.dce_only_share
    options["components"] = tuple(c.strip() for c in args.components.split(",") if c.strip())
    try:
        config = SynthConfig.small(**options) if args.small else SynthConfig(**options)
    except ValueError as err:  # the options are the user's
        raise UserError(str(err)) from err
    if args.cases < 1:
        raise UserError(f"--cases {args.cases}: expected at least 1")
    cases = write_dataset(
        args.out, args.cases, args.seed, config, progress=True, overwrite=args.overwrite
    )
    print(f"wrote {len(cases)} synthetic cases to {args.out}")
    return 0


def _add_preprocess(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layout", choices=("picai", "manifest"), required=True)
    parser.add_argument("--images", type=Path, help="picai: <images>/<patient>/<case>_<comp>.mha")
    parser.add_argument("--labels", type=Path, help="picai: <labels>/<case>.nii.gz (ISUP values)")
    parser.add_argument("--masks", type=Path, help="picai: whole-gland masks for centring")
    parser.add_argument(
        "--marksheet", type=Path, help="picai: marksheet.csv (kept as case metadata)"
    )
    parser.add_argument("--manifest", type=Path, help="manifest: CSV of cases (see docs/data.md)")
    parser.add_argument("--out", type=Path, required=True, help="store folder to write")
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument(
        "--skip-bad-cases", action="store_true", help="list bad cases in errors.csv, keep going"
    )
    parser.add_argument("--components", default="t2w,adc", help="comma-separated, T2w first")
    parser.add_argument("--slices", choices=("all", "annotated"), default="all")
    parser.add_argument(
        "--unlabelled",
        choices=("error", "negative", "skip"),
        default="error",
        help="a case without a label (PI-CAI: no label file; manifest: no label column or an "
        "empty cell) is an error, a negative, or left out",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a store at --out made with other settings"
    )
    parser.add_argument(
        "--label-values",
        choices=("auto", "picai", "isup"),
        default="auto",
        help="label value 1: 'picai' = csPCa of unknown grade, 'isup' = GS 3+3; 'auto': "
        "picai layout reads <labels>/dataset.json, else 'picai'; manifest 'isup'",
    )
    parser.add_argument("--interpolator", choices=("bspline", "linear"), default="bspline")


def _run_preprocess(args: argparse.Namespace) -> int:
    from focalnet_jax.data.build_store import preprocess_layout

    summary = preprocess_layout(
        args.layout,
        out=args.out,
        images=args.images,
        labels=args.labels,
        masks=args.masks,
        marksheet=args.marksheet,
        manifest=args.manifest,
        components=tuple(c.strip() for c in args.components.split(",") if c.strip()),
        slices=args.slices,
        workers=args.workers,
        skip_bad_cases=args.skip_bad_cases,
        unlabelled=args.unlabelled,
        label_values=args.label_values,
        interpolator=args.interpolator,
        overwrite=args.overwrite,
    )
    print(
        f"wrote {summary.num_cases} cases ({summary.num_slices} slices) to {summary.path}"
        + (f"; {len(summary.errors)} bad cases in errors.csv" if summary.errors else "")
    )
    return 0


def _add_folds(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", type=Path, required=True, help="preprocessed store")
    parser.add_argument("--num-folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write fold-<k>.json files here")
    parser.add_argument("--list-cases", action="store_true", help="print each fold's case ids")


def _run_folds(args: argparse.Namespace) -> int:
    from focalnet_jax.data.folds import fold_table, write_fold_files
    from focalnet_jax.data.store import open_store

    store = open_store(args.store)
    rows = fold_table(store, args.num_folds, args.seed)
    print("fold  patients  cases  slices  patients per highest class 0..5")
    for row in rows:
        per_class = " ".join(f"{n:3d}" for n in row["patients_per_max_class"])
        print(
            f"{row['fold']:4d}  {row['patients']:8d}  {row['cases']:5d}  {row['slices']:6d}"
            f"  {per_class}"
        )
        if args.list_cases:
            print("      " + " ".join(row["case_ids"]))
    if args.out:
        for path in write_fold_files(store, args.out, args.num_folds, args.seed):
            print(f"wrote {path}")
    return 0


# --- training: train, cv --------------------------------------------------------------------------


def _add_distributed_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "multi-process (default: SLURM's variables, else one process)"
    )
    group.add_argument("--coordinator_address", help="HOST:PORT of process 0")
    group.add_argument("--num_processes", type=int, help="total number of processes")
    group.add_argument("--process_id", type=int, help="this process's rank, 0..N-1")


def _add_compilation_cache_flag(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--compilation_cache",
        type=Path,
        help="folder of the persistent XLA compilation cache, so restarts and folds reuse the "
        f"compiled steps (default: {default})",
    )


def _add_train(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        required=True,
        help="config file, optionally with :arg (configs/picai.py:fold=2)",
    )
    parser.add_argument(
        "--workdir", type=Path, required=True, help="run folder; resumes if present"
    )
    parser.add_argument("--fold", type=int, help="shortcut for --config.data.fold")
    parser.epilog = "Any config field can be overridden: --config.train.steps=100 --config.seed=1"
    _add_compilation_cache_flag(parser, "$JAX_COMPILATION_CACHE_DIR, else none")
    _add_distributed_flags(parser)


def _training_setup(args: argparse.Namespace):
    """Join the process group, load the config with its overrides; returns the config."""
    import logging

    from focalnet_jax.config_loading import load_config
    from focalnet_jax.run import RunSpec
    from focalnet_jax.training import distributed

    # Our progress at INFO; libraries (Orbax, absl) only from WARNING.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("focalnet_jax").setLevel(logging.INFO)
    try:
        distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
        config = load_config(args.config, args.overrides)
    except (KeyError, ValueError, FileNotFoundError) as error:  # flags and config: the user's
        raise UserError(error.args[0] if error.args else str(error)) from error
    if args.fold is not None:
        config.data.fold = args.fold
    RunSpec.from_config(config)  # every config error in one line, before any compilation

    logging.getLogger("focalnet_jax").info("%s", distributed.describe())
    return config


def _run_train(args: argparse.Namespace) -> int:
    from focalnet_jax.training import train_and_evaluate
    from focalnet_jax.training.distributed import compilation_cache

    with compilation_cache(args.compilation_cache):
        config = _training_setup(args)
        train_and_evaluate(config, args.workdir)
    print(f"checkpoints and TensorBoard logs in {args.workdir}")
    return 0


def _int_list(text: str) -> list[int]:
    try:
        return [int(f) for f in text.split(",")]
    except ValueError:
        message = f"expected comma-separated integers, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None


def _add_cv(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="config file, optionally with :arg")
    parser.add_argument("--workdir", type=Path, required=True, help="fold k in WORKDIR/fold<k>")
    parser.add_argument("--folds", type=_int_list, help="comma-separated folds (default: all)")
    parser.add_argument("--fold", type=int, help=argparse.SUPPRESS)
    _add_compilation_cache_flag(
        parser, "$JAX_COMPILATION_CACHE_DIR, else WORKDIR/compilation_cache"
    )
    _add_distributed_flags(parser)


def _run_cv(args: argparse.Namespace) -> int:
    import jax

    from focalnet_jax.training import train_and_evaluate
    from focalnet_jax.training.distributed import compilation_cache

    cache = args.compilation_cache
    if cache is None and not jax.config.jax_compilation_cache_dir:
        cache = args.workdir / "compilation_cache"
    with compilation_cache(cache):
        config = _training_setup(args)
        folds = args.folds or list(range(config.data.num_folds))
        for fold in folds:
            config.data.fold = fold
            train_and_evaluate(config, args.workdir / f"fold{fold}")
    print(f"trained folds {folds}; runs in {args.workdir}/fold<k>")
    return 0


# --- evaluation: evaluate, summarize, predict -----------------------------------------------------


def _add_evaluate(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--predictions", type=Path, help="folder of <case_id>.npz prediction files (contract)"
    )
    source.add_argument("--workdir", type=Path, help="run: predict its validation fold, evaluate")
    parser.add_argument("--all-cases", action="store_true", help="every case of --store (test set)")
    parser.add_argument("--tta", choices=("none", "flip"), default="none", help="left-right flip")
    parser.add_argument(
        "--out", type=Path, help="output folder (required with --predictions; default WORKDIR/eval)"
    )
    parser.add_argument(
        "--cases",
        type=Path,
        help="with --predictions: the case ids to evaluate (one a line, or a JSON list); a listed "
        "case without <case_id>.npz is an error (default: every file found)",
    )
    parser.add_argument("--step", type=int, help="checkpoint step with --workdir (default: latest)")
    parser.add_argument("--store", type=Path, help="preprocessed store (default: the run's config)")
    parser.add_argument("--batch-size", type=int, default=32, help="slices per inference batch")
    parser.add_argument("--radius-mm", type=float, default=5.0, help="hit radius and NMS radius")
    parser.add_argument("--min-score", type=float, default=1e-3, help="lowest detection score")
    parser.add_argument(
        "--slices",
        choices=("all", "annotated"),
        help="slices of the 2D protocol (default: all; with --workdir the run's data.slices)",
    )
    parser.add_argument("--no-picai", action="store_true", help="skip the PI-CAI metrics")
    parser.add_argument("--picai-bootstraps", type=int, default=1000, help="0 skips the CIs")
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    parser.add_argument("--label", default=None, help="method name in the report")


def _run_evaluate(args: argparse.Namespace) -> int:
    from focalnet_jax.evaluation.evaluate import evaluate_predictions, evaluation_summary
    from focalnet_jax.evaluation.flag_checks import check_evaluate_flags
    from focalnet_jax.evaluation.predictions import read_case_list

    check_evaluate_flags(args)
    slices = args.slices or "all"
    if args.workdir is not None and args.cases is not None:
        raise UserError("--cases goes with --predictions (--workdir evaluates its fold)")
    cases = read_case_list(args.cases) if args.cases is not None else None
    if args.all_cases:
        from focalnet_jax.evaluation.run_predictions import predict_test_store

        out, slices = args.out, args.slices or "all"
        predictions = None if out is None else out / "predictions"
        cases = predict_test_store(args.workdir, args.store, predictions, step=args.step,
                                   tta=args.tta, batch_size=args.batch_size)  # fmt: skip
    elif args.workdir is not None:
        from focalnet_jax.evaluation.run_predictions import predict_fold
        from focalnet_jax.run.workdir import read_config

        out = args.out or args.workdir / "eval"
        predictions = out / "predictions"
        cases = predict_fold(
            args.workdir,
            predictions,
            step=args.step,
            store_path=args.store,
            batch_size=args.batch_size,
            tta=args.tta,
        )
        slices = args.slices or str(read_config(args.workdir).data.slices)
    elif args.out is None:
        raise UserError("--out is required with --predictions")
    else:
        predictions, out = args.predictions, args.out
    metrics = evaluate_predictions(
        predictions,
        out,
        cases=cases,
        radius_mm=args.radius_mm,
        min_score=args.min_score,
        with_picai=not args.no_picai,
        picai_bootstraps=args.picai_bootstraps,
        with_figures=not args.no_figures,
        label=args.label or (args.workdir.name if args.workdir else "model"),
        slices=slices,
    )
    print(f"{evaluation_summary(metrics)}; wrote {out / 'metrics.json'}")
    return 0


def _add_summarize(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--runs",
        nargs="+",
        required=True,
        metavar="NAME=DIR",
        help="method name and a folder holding one metrics.json per fold (searched recursively)",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")


def _run_summarize(args: argparse.Namespace) -> int:
    from focalnet_jax.evaluation.flag_checks import check_output_folder, parse_runs
    from focalnet_jax.evaluation.summary import summarize_runs

    runs = parse_runs(args.runs)
    check_output_folder(args.out)
    summarize_runs(runs, args.out)
    print(f"wrote {args.out / 'summary.json'} and {args.out / 'summary.md'}")
    return 0


def _add_predict(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        type=Path,
        action="append",
        required=True,
        help="training run or CV folder (its finished folds); repeat: ensemble",
    )
    parser.add_argument("--step", type=int, help="checkpoint step of one run (default: latest)")
    parser.add_argument("--t2w", help="one exam: T2w DICOM folder, .mha, .nii(.gz), .nrrd")
    parser.add_argument("--adc", help="one exam: ADC DICOM folder or image file")
    parser.add_argument("--hbv", help="one exam: high b-value DWI DICOM folder or image file")
    parser.add_argument("--mask", help="prostate mask on any grid (centres the crop)")
    parser.add_argument("--center", help="crop centre 'x,y,z' (LPS mm)")
    parser.add_argument("--layout", choices=("picai", "manifest"), help="many exams")
    parser.add_argument("--images", type=Path, help="picai: <images>/<patient>/<case>_<comp>.mha")
    parser.add_argument("--masks", type=Path, help="picai: whole-gland masks for centring")
    parser.add_argument("--manifest", type=Path, help="manifest: CSV of cases (labels unused)")
    parser.add_argument("--skip-bad-cases", action="store_true", help="bad cases: errors.csv")
    parser.add_argument(
        "--overwrite", action="store_true", help="many exams: replace a non-empty --out whole"
    )
    for name in ("t2w", "adc", "hbv"):
        parser.add_argument(
            f"--{name}-series",
            help=f"SeriesInstanceUID or exact SeriesDescription of the {name} series "
            "(when its DICOM folder holds several)",
        )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--threshold", type=float, default=0.5, help="lowest listed detection")
    parser.add_argument("--batch-size", type=int, default=16, help="slices per inference batch")
    parser.add_argument("--tta", choices=("none", "flip"), default="none", help="left-right flip")
    from focalnet_jax.evaluation.detection_map import add_candidate_flags

    add_candidate_flags(parser)


def _run_predict(args: argparse.Namespace) -> int:
    from focalnet_jax.evaluation import predict_command

    print(predict_command.run(args))
    return 0


# --- studies: arms x repeats x folds (focalnet_jax/study) ----------------------------------------


def _add_study(parser: argparse.ArgumentParser) -> None:
    from focalnet_jax.study.commands import add_arguments

    add_arguments(parser)


def _run_study(args: argparse.Namespace) -> int:
    from focalnet_jax.study.commands import run

    return run(args)


_COMMANDS: dict[str, tuple] = {
    # name: (help, add_parser_fn, run_fn)
    "synth": ("write a synthetic mp-MRI dataset in the PI-CAI layout", _add_synth, _run_synth),
    "preprocess": (
        "preprocess a PI-CAI folder or a manifest into a dataset store",
        _add_preprocess,
        _run_preprocess,
    ),
    "folds": ("print the patient-level cross-validation folds of a store", _add_folds, _run_folds),
    "train": ("train a config (resumes from --workdir)", _add_train, _run_train),
    "cv": ("train a config on every cross-validation fold", _add_cv, _run_cv),
    "evaluate": (
        "FROC, GS ROC and PI-CAI metrics of predictions (metrics.json, report.md, PNGs)",
        _add_evaluate,
        _run_evaluate,
    ),
    "summarize": (
        "combine cross-validation folds of several methods: mean+-SD, bands, Welch tests",
        _add_summarize,
        _run_summarize,
    ),
    "predict": (
        "run a model or an ensemble on exams: NIfTI score and detection maps, detections CSV, PNG",
        _add_predict,
        _run_predict,
    ),
    "study": (
        "arms x repeats x folds of training runs, locally or on SLURM; status; report",
        _add_study,
        _run_study,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="focalnet",
        description="FocalNet: prostate cancer detection and Gleason score prediction in mp-MRI.",
    )
    verbose_help = "show the traceback of an error"
    parser.add_argument("--verbose", action="store_true", help=verbose_help)
    # Also after the subcommand; SUPPRESS keeps a --verbose given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose_help
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_fn, _) in _COMMANDS.items():
        add_fn(sub.add_parser(name, help=help_text, description=help_text, parents=[common]))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # `train` and `cv` take free-form `--config.KEY=VALUE` overrides that argparse does not know,
    # `study` `--spec.KEY=VALUE`.
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command not in ("train", "cv", "study"):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = unknown
    run_fn = _COMMANDS[args.command][2]
    action = getattr(args, "study_command", None)  # `focalnet study ACTION: error: ...`
    prog = f"focalnet {args.command}" + (f" {action}" if action else "")
    with one_line_user_errors(prog, verbose=args.verbose):
        return int(run_fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
