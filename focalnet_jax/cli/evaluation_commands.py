"""`focalnet evaluate`, `summarize`, `predict`: flags and a thin call into the evaluation."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from focalnet_jax.cli.training_commands import add_compilation_cache_flag
from focalnet_jax.errors import UserError

_CACHE_DEFAULT = "$JAX_COMPILATION_CACHE_DIR, else none"
_CACHE_REUSE = "later runs of the same models reuse their compiled inference"
_BATCH_HELP = (
    "slices per inference batch (1 to 1024), rounded up to a multiple of the local devices"
)


EVALUATE_BATCH_SIZE = 32
# localization.RADIUS_MM and MIN_SCORE, not imported: that would load SciPy at every command's
# parse (tests/test_evaluation_cli.py checks they agree).
RADIUS_MM, MIN_SCORE = 5.0, 1e-3
_WORKDIR_ONLY = "--workdir only"


def add_evaluate(parser: argparse.ArgumentParser) -> None:
    _add_evaluate_inputs(parser)
    _add_evaluate_protocol(parser)
    add_compilation_cache_flag(parser, _CACHE_DEFAULT, f"{_CACHE_REUSE}; {_WORKDIR_ONLY}")
    parser.epilog = (
        "With --predictions (files already predicted) the flags that make predictions are "
        "refused: --tta flip, --step, --store, --all-cases, --batch-size, --compilation_cache. "
        "--cases needs --predictions; --allow-training-cases needs --all-cases."
    )


def _add_evaluate_inputs(parser: argparse.ArgumentParser) -> None:
    """`evaluate`'s flags of what it evaluates and where it writes."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--predictions", type=Path, help="folder of <case_id>.npz prediction files (contract)"
    )
    source.add_argument(
        "--workdir",
        type=Path,
        help="training run: predict its validation fold into OUT/predictions, then evaluate; with "
        "--all-cases a run or a CV folder (the ensemble of its finished folds)",
    )
    parser.add_argument(
        "--all-cases",
        action="store_true",
        help="predict and evaluate every case of --store (a test set); needs --workdir, --store "
        "and --out",
    )
    parser.add_argument(
        "--allow-training-cases",
        action="store_true",
        help="with --all-cases: evaluate even if the store holds cases, or patients, the runs "
        "trained on (not held-out numbers; warned)",
    )
    parser.add_argument(
        "--tta",
        choices=("none", "flip"),
        default="none",
        help=f"flip: average with the left-right flipped input's prediction ({_WORKDIR_ONLY}; "
        "default: none)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="output folder (required with --predictions and with --all-cases; default "
        "WORKDIR/eval); with --workdir its predictions/ is replaced whole (refused if it holds "
        "other files than predictions); an earlier "
        "evaluation's figures in it are removed, no other file",
    )
    parser.add_argument(
        "--cases",
        type=Path,
        help="with --predictions: the case ids to evaluate (one a line, a JSON list, or "
        'picai_eval\'s {"subject_list": [...]}); a listed case without <case_id>.npz is an '
        "error (default: every file found)",
    )
    parser.add_argument(
        "--step", type=int, help=f"checkpoint step of one run ({_WORKDIR_ONLY}; default: latest)"
    )
    parser.add_argument(
        "--store",
        type=Path,
        help=f"preprocessed store ({_WORKDIR_ONLY}; default: the run's data.store; required "
        "with --all-cases)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        help=f"{_BATCH_HELP} ({_WORKDIR_ONLY}; default: {EVALUATE_BATCH_SIZE})",
    )


def _add_evaluate_protocol(parser: argparse.ArgumentParser) -> None:
    """`evaluate`'s flags of the protocol and of what it writes."""
    parser.add_argument(
        "--radius-mm",
        type=float,
        default=RADIUS_MM,
        help="paper protocol: hit distance to a lesion and radius of the local-maximum window, "
        f"in mm (default: {RADIUS_MM:g})",
    )
    parser.add_argument(
        "--min-score",
        type=float,
        default=MIN_SCORE,
        help="paper protocol: a detection's lesion score P(class >= 1) must exceed this "
        f"(default: {MIN_SCORE:g})",
    )
    parser.add_argument(
        "--slices",
        choices=("all", "annotated"),
        help="slices of the 2D protocol (default: all; with --workdir and no --all-cases, the "
        "run's data.slices)",
    )
    parser.add_argument("--no-picai", action="store_true", help="skip the PI-CAI metrics")
    parser.add_argument(
        "--picai-bootstraps",
        type=int,
        default=1000,
        help="bootstrap resamples of the PI-CAI 95%% CIs; 0 skips the CIs (default: 1000)",
    )
    parser.add_argument(
        "--no-figures",
        action="store_true",
        help="write no PNG figures (an earlier evaluation's in --out are removed)",
    )
    parser.add_argument(
        "--label",
        default=None,
        help="method name in the report (default: the --workdir folder's name, else 'model')",
    )


def run_evaluate(args: argparse.Namespace) -> int:
    from focalnet_jax.evaluation.flag_checks import check_evaluate_flags
    from focalnet_jax.training.distributed import compilation_cache

    check_evaluate_flags(args)  # before the cache is set: refused with --predictions
    with compilation_cache(args.compilation_cache), _out_lock(args):
        return _evaluate(args)


def _out_lock(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    """The lock beside the evaluation's output folder (`writer_lock`), held from the first
    prediction to the last figure: two runs into one folder left one's figures beside the other's
    metrics, both ending well."""
    from focalnet_jax.data.writer_folders import writer_lock
    from focalnet_jax.evaluation.flag_checks import evaluation_out

    out = evaluation_out(args)
    return contextlib.nullcontext() if out is None else writer_lock(out, "evaluate")


def _evaluate(args: argparse.Namespace) -> int:
    from focalnet_jax.evaluation.evaluate import (
        evaluate_predictions,
        evaluation_summary,
        remove_evaluation,
    )
    from focalnet_jax.evaluation.flag_checks import evaluation_out
    from focalnet_jax.evaluation.predictions import read_case_list

    batch_size = args.batch_size or EVALUATE_BATCH_SIZE
    slices = args.slices or "all"
    if args.workdir is not None and args.cases is not None:
        raise UserError("--cases goes with --predictions (--workdir evaluates its fold)")
    cases = read_case_list(args.cases) if args.cases is not None else None
    if args.all_cases:
        from focalnet_jax.evaluation.run_predictions import predict_test_store

        out, slices = args.out, args.slices or "all"
        predictions = None if out is None else out / "predictions"
        # New predictions come in with no metrics of the ones they replace beside them (a stop
        # before the new metrics are written leaves no folder that contradicts itself).
        cases = predict_test_store(args.workdir, args.store, predictions, step=args.step,
                                   tta=args.tta, batch_size=batch_size,
                                   allow_training_cases=args.allow_training_cases,
                                   before_swap=lambda: remove_evaluation(out))  # fmt: skip
    elif args.workdir is not None:
        from focalnet_jax.evaluation.run_predictions import predict_fold
        from focalnet_jax.run.workdir import read_config

        out = evaluation_out(args)
        predictions = out / "predictions"
        cases = predict_fold(
            args.workdir,
            predictions,
            step=args.step,
            store_path=args.store,
            batch_size=batch_size,
            tta=args.tta,
            before_swap=lambda: remove_evaluation(out),
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
        label=method_label(args.label, args.workdir),
        slices=slices,
    )
    print(f"{evaluation_summary(metrics)}; wrote {out / 'metrics.json'}")
    return 0


def add_summarize(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--runs",
        nargs="+",
        action="extend",  # `--runs A=x --runs B=y` keeps both (the default kept only B)
        required=True,
        metavar="NAME=DIR",
        help="method name and a folder holding one metrics.json of `focalnet evaluate` per fold "
        "(searched recursively; one that evaluates an ensemble, a run already counted, or a "
        "file under another method's folder is refused); repeatable",
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="output folder: summary.json, summary.md, froc.png, froc_gs.png, roc.png (replaced; "
        "no other file touched)",
    )
    parser.epilog = (
        "Every fold of every method must be evaluated with the same settings (--slices, "
        "--radius-mm, --min-score), and the folds of one method predicted with the same --tta "
        "and --candidate-* settings; folds that differ are refused."
    )


def run_summarize(args: argparse.Namespace) -> int:
    from focalnet_jax.data.writer_folders import writer_lock
    from focalnet_jax.evaluation.flag_checks import check_output_folder, parse_runs
    from focalnet_jax.evaluation.summary import check_summary_folder, summarize_runs

    runs = parse_runs(args.runs)
    check_output_folder(args.out)
    with writer_lock(args.out, "summarize"):
        check_summary_folder(args.out)
        summarize_runs(runs, args.out)
    print(f"wrote {args.out / 'summary.json'} and {args.out / 'summary.md'}")
    return 0


def add_predict(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        type=Path,
        action="append",
        required=True,
        help="training run or CV folder (its finished folds); repeat: ensemble",
    )
    parser.add_argument(
        "--step", type=int, help="checkpoint step of a single run (default: its latest)"
    )
    _add_one_exam_flags(parser)
    _add_many_exams_flags(parser)
    for name in ("t2w", "adc", "hbv"):
        parser.add_argument(
            f"--{name}-series",
            help=f"one exam: SeriesInstanceUID or exact SeriesDescription of the {name} series "
            "(when its DICOM folder holds several)",
        )
    parser.add_argument(
        "--component-series",
        action="append",
        metavar="NAME=UID",
        help="one exam: SeriesInstanceUID or exact SeriesDescription of a --component series; "
        "repeat",
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="output folder, replaced whole; one exam: refused if it holds other files than "
        "predict's; many exams: one subfolder per case",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="detections.csv and overlay.png show the detections whose lesion score "
        "P(class >= 1) is at least this; a maximum below 0.001 is no detection (default: 0.5)",
    )
    parser.add_argument(
        "--dicom",
        action="store_true",
        help="also write detections_seg.dcm (the detection map's lesion candidates, a DICOM "
        "Segmentation) and score_map.dcm (the csPCa score, a DICOM Parametric Map) on the T2w "
        "series' frames, for PACS viewers (the T2w must be DICOM)",
    )
    parser.add_argument("--batch-size", type=int, default=16, help=f"{_BATCH_HELP} (default: 16)")
    parser.add_argument(
        "--tta",
        choices=("none", "flip"),
        default="none",
        help="flip: average with the left-right flipped input's prediction (default: none)",
    )
    from focalnet_jax.evaluation.detection_map import add_candidate_flags

    add_candidate_flags(parser)
    add_compilation_cache_flag(parser, _CACHE_DEFAULT, _CACHE_REUSE)


def _add_one_exam_flags(parser: argparse.ArgumentParser) -> None:
    """`predict`'s flags of one exam: its images, mask and crop centre."""
    parser.add_argument("--t2w", help="one exam: T2w DICOM folder, .mha, .nii(.gz), .nrrd")
    parser.add_argument("--adc", help="one exam: ADC DICOM folder or image file")
    parser.add_argument("--hbv", help="one exam: high b-value DWI DICOM folder or image file")
    parser.add_argument(
        "--component",
        action="append",
        metavar="NAME=PATH",
        help="one exam: another component the model reads, e.g. dce=exam/dce.mha; repeat",
    )
    parser.add_argument(
        "--mask", help="one exam: prostate mask on any grid; its centroid centres the crop"
    )
    centre = parser.add_mutually_exclusive_group()
    centre.add_argument(
        "--center",
        metavar="X,Y,Z",
        help="one exam, without --mask: crop centre in mm, LPS (DICOM patient coordinates: +x "
        "left, +y posterior, +z head), as detections.csv gives points; 3D Slicer shows RAS "
        "(negate x and y, or use --center-ras); a negative X needs '=': "
        "--center=-25.7,31.9,-38.5 (default: the T2w volume centre)",
    )
    centre.add_argument(
        "--center-ras",
        metavar="X,Y,Z",
        help="one exam, without --mask: crop centre in mm, RAS (3D Slicer, nibabel: +x right, "
        "+y anterior), used as the LPS point -X,-Y,Z; a negative X needs '=': "
        "--center-ras=-25.7,-31.9,-38.5",
    )


def _add_many_exams_flags(parser: argparse.ArgumentParser) -> None:
    """`predict`'s flags of many exams: where they are, bad cases, an earlier output."""
    parser.add_argument("--layout", choices=("picai", "manifest"), help="many exams")
    parser.add_argument(
        "--images",
        type=Path,
        action="append",
        help="picai: <images>/<patient>/<case>_<comp>.mha (or .mhd, .nii, .nii.gz, .nrrd); "
        "repeat for several image folders",
    )
    parser.add_argument(
        "--masks",
        type=Path,
        help="picai: whole-gland masks <masks>/<case>.nii.gz (or .nii, .mha, .nrrd) centre the "
        "crops (a case without one: the T2w volume centre)",
    )
    parser.add_argument("--manifest", type=Path, help="manifest: CSV of cases (labels unused)")
    parser.add_argument(
        "--skip-bad-cases",
        action="store_true",
        help="many exams: skip a case that fails, listed in OUT/errors.csv (default: the first "
        "bad case stops the run, OUT unchanged)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="many exams: replace a non-empty --out whole (only an earlier predict output); "
        "without --resume: discard the unfinished OUT.partial of an interrupted run",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="many exams: continue the unfinished OUT.partial of an interrupted run (same models "
        "and settings): its finished cases are kept, the others predicted",
    )


def run_predict(args: argparse.Namespace) -> int:
    from focalnet_jax.evaluation import predict_command
    from focalnet_jax.training.distributed import compilation_cache

    with compilation_cache(args.compilation_cache):
        print(predict_command.run(args))
    return 0


def method_label(label: str | None, workdir: Path | None) -> str:
    """The method's name in the report and figures: `--label`, else the run folder's name (of
    its absolute path: `--workdir .` named it ''), else 'model'."""
    return label or (workdir.resolve().name if workdir else "model")
