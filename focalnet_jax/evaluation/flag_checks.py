"""Checks of the flags of `focalnet evaluate`, `predict` and `summarize` made before any model is
loaded or any file written: numbers in range, input modes not mixed, output folders that can be
created. Each failure is a `UserError` naming the flag, the value and the reason."""

from __future__ import annotations

import argparse
from pathlib import Path

from focalnet_jax.data.atomic_files import check_output_folder
from focalnet_jax.errors import UserError
from focalnet_jax.evaluation.localization import check_detection_settings

ONE_EXAM_FLAGS = ("t2w", "adc", "hbv", "component", "mask", "center", "center_ras")
MANY_EXAM_FLAGS = ("images", "masks", "manifest")
MANY_EXAM_SWITCHES = ("skip_bad_cases", "overwrite", "resume")


MAX_BATCH_SIZE = 1024  # slices per model call: every case's last batch is padded to it


def _check_batch_size(args: argparse.Namespace) -> None:
    """1..`MAX_BATCH_SIZE` (100000 padded a 7-slice case to 7.4 GB and aborted in XLA)."""
    if args.batch_size is not None and not 1 <= args.batch_size <= MAX_BATCH_SIZE:
        raise UserError(
            f"--batch-size {args.batch_size}: expected 1 to {MAX_BATCH_SIZE} slices per model "
            "call (each case's last batch is padded to it)"
        )


def check_evaluate_flags(args: argparse.Namespace) -> None:
    """`focalnet evaluate`: batch size, hit radius, score floor, bootstraps, flags that make
    predictions (or the compiled model that makes them) given with --predictions, the output
    folder."""
    _check_batch_size(args)
    check_detection_settings(args.radius_mm, args.min_score, ("--radius-mm", "--min-score"))
    if args.picai_bootstraps < 0:
        raise UserError(f"--picai-bootstraps {args.picai_bootstraps}: expected 0 or more")
    if args.allow_training_cases and not args.all_cases:
        raise UserError(
            "--allow-training-cases goes with --all-cases (a run's own fold is held out)"
        )
    if args.predictions is not None:
        # They shape or speed up a prediction; files already predicted are evaluated as they are.
        given = {"--tta flip": args.tta != "none", "--step": args.step is not None,
                 "--store": args.store is not None, "--all-cases": args.all_cases,
                 "--batch-size": args.batch_size is not None,
                 "--compilation_cache": args.compilation_cache is not None}  # fmt: skip
        if named := [flag for flag, on in given.items() if on]:
            raise UserError(
                f"{named[0]} goes with --workdir (it makes the predictions); --predictions "
                f"{args.predictions} evaluates the files as they were predicted"
            )
    check_output_folder(evaluation_out(args))
    if args.predictions is not None and args.out is not None:
        predictions, out = Path(args.predictions).resolve(), Path(args.out).resolve()
        if out == predictions or predictions in out.parents:
            raise UserError(
                f"--out {args.out} is --predictions {args.predictions} or inside it: its metrics "
                "would be read as a file of the predictions; choose a folder beside it"
            )


def evaluation_out(args: argparse.Namespace) -> Path | None:
    """`focalnet evaluate`'s output folder: --out, else a run's `<workdir>/eval` where --workdir
    evaluates its own fold (not with --all-cases, which needs --out); None where none is given."""
    if args.out is not None:
        return Path(args.out)
    if args.workdir is not None and not args.all_cases:
        return Path(args.workdir) / "eval"
    return None


def check_predict_flags(args: argparse.Namespace) -> None:
    """`focalnet predict`: batch size, detections threshold, one exam or many (not both), one
    crop centre, the output folder."""
    _check_batch_size(args)
    if not 0 <= args.threshold <= 1:  # above 1 (or NaN): no detection can reach it
        raise UserError(f"--threshold {args.threshold}: expected a lesion score in [0, 1]")
    if args.layout is not None:
        mixed = [f for f in ONE_EXAM_FLAGS if getattr(args, f)]
        if mixed:
            raise UserError(
                f"--{mixed[0].replace('_', '-')} is for one exam; --layout {args.layout} reads "
                f"its exams from "
                f"{'--images' if args.layout == 'picai' else '--manifest'}"
            )
        other = "manifest" if args.layout == "picai" else "images"
        if getattr(args, other) is not None or (args.layout == "manifest" and args.masks):
            flag = other if getattr(args, other) is not None else "masks"
            raise UserError(f"--{flag} does not go with --layout {args.layout}")
    else:
        mixed = [f for f in MANY_EXAM_FLAGS if getattr(args, f) is not None]
        mixed += [f for f in MANY_EXAM_SWITCHES if getattr(args, f)]
        if mixed:
            flag = mixed[0].replace("_", "-")
            raise UserError(f"--{flag} needs --layout (many exams); one exam is --t2w/--adc")
        for flag in ("center", "center_ras"):
            if args.mask and getattr(args, flag):
                raise UserError(
                    f"--{flag.replace('_', '-')} {getattr(args, flag)} does not go with --mask "
                    f"{args.mask}: the mask's centroid centres the crop"
                )
    check_output_folder(args.out)


def parse_runs(items: list[str]) -> dict[str, Path]:
    """`summarize --runs NAME=DIR ...` -> {name: folder}; a malformed item or a repeated name is an
    error."""
    runs: dict[str, Path] = {}
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise UserError(f"--runs expects NAME=DIR, got {item!r}")
        if name in runs:
            raise UserError(f"--runs names {name!r} twice ({runs[name]} and {folder})")
        runs[name] = Path(folder)
    return runs
