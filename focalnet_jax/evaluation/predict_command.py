"""The body of `focalnet predict`: its parsed flags to one exam (`predict.predict_exam`) or to
every case of a PI-CAI folder or manifest (`batch_predict.predict_layout`), with one model or an
ensemble (`ensemble.load_ensemble`) and the detection-map settings (`CandidateSettings`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from focalnet_jax.data.io import CaseError
from focalnet_jax.errors import UserError, as_interrupt
from focalnet_jax.evaluation import picai
from focalnet_jax.evaluation.batch_predict import predict_layout
from focalnet_jax.evaluation.detection_map import CandidateSettings
from focalnet_jax.evaluation.ensemble import load_ensemble
from focalnet_jax.evaluation.flag_checks import check_predict_flags
from focalnet_jax.evaluation.partial_output import partial_folder, resume_hint
from focalnet_jax.evaluation.predict import check_exam_out, predict_exam

COMPONENTS = ("t2w", "adc", "hbv")


def parse_center(text: str | None, flag: str = "--center") -> tuple[float, float, float] | None:
    """'x,y,z' (mm) given with `flag` -> a point; None for None."""
    if not text:
        return None
    try:
        center = tuple(float(v) for v in text.split(","))
    except ValueError:
        center = ()
    if len(center) != 3:
        raise UserError(f"{flag} expects x,y,z, got {text!r}")
    return center


def crop_centre(args: argparse.Namespace) -> tuple[float, float, float] | None:
    """The LPS crop centre (mm) of `--center` (LPS) or `--center-ras` (RAS, as 3D Slicer shows
    points: LPS with x and y negated), or None."""
    if args.center_ras:
        x, y, z = parse_center(args.center_ras, "--center-ras")
        return (-x, -y, z)
    return parse_center(args.center)


def _flag(name: str, series: bool = False) -> str:
    """The flag and its value that give component `name` of one exam (`series`: that chooses its
    series), e.g. `--adc PATH`, `--component-series dce=UID`."""
    value = "UID" if series else "PATH"
    if name in COMPONENTS:
        return f"--{name}-series {value}" if series else f"--{name} {value}"
    return f"--component{'-series' if series else ''} {name}={value}"


def _named(items, flag: str, example: str, given: dict[str, str]) -> dict[str, str]:
    """`given` and each NAME=VALUE of the repeated `flag`, each a name beyond t2w/adc/hbv."""
    named = dict(given)
    for item in items or ():
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name or not value:
            what = "PATH" if flag == "--component" else "UID"
            raise UserError(f"{flag} expects NAME={what} (e.g. {example}), got {item!r}")
        if name in COMPONENTS:
            raise UserError(f"{flag} {item}: give {name} with {_flag(name, flag != '--component')}")
        if name in named:
            raise UserError(f"{flag} names {name!r} twice ({named[name]} and {value})")
        named[name] = value
    return named


def parse_components(args: argparse.Namespace) -> tuple[dict[str, str], dict[str, str]]:
    """One exam's component files (--t2w/--adc/--hbv, each --component NAME=PATH) and the
    series chosen in DICOM folders of several (--<name>-series, --component-series NAME=UID)."""
    components = _named(
        args.component,
        "--component",
        "dce=exam/dce.mha",
        {n: getattr(args, n) for n in COMPONENTS if getattr(args, n)},
    )
    series = _named(
        args.component_series,
        "--component-series",
        "dce=1.2.840.1",
        {n: getattr(args, f"{n}_series") for n in COMPONENTS if getattr(args, f"{n}_series")},
    )
    return components, series


def _check_exam_gives(models, components: dict[str, str]) -> None:
    """Raises naming the flag of each component the models read that the exam does not give."""
    missing = [c for c in models.components if c not in components]
    if missing:
        # A misspelt name (`--component dec=...`) is among the given ones the models do not read.
        unread = [c for c in components if c not in models.components]
        given = f" (given {', '.join(unread)}, which they do not read)" if unread else ""
        raise UserError(
            f"the model(s) {', '.join(map(str, models.runs))} read {list(models.components)} "
            f"(T2w as the reference grid); give {', '.join(map(_flag, missing))}{given}"
        )


def _predict_many(models, args: argparse.Namespace, options: dict) -> str:
    """`predict_layout` as the flags say; when it is interrupted (Ctrl-C, SIGTERM) or fails on a
    case, prints how to resume the partial output it keeps."""
    try:
        summary = predict_layout(
            models,
            args.layout,
            args.out,
            images=args.images,
            masks=args.masks,
            manifest=args.manifest,
            skip_bad_cases=args.skip_bad_cases,
            overwrite=args.overwrite,
            resume=args.resume,
            dicom=args.dicom,
            **options,
        )
    except (KeyboardInterrupt, Exception) as error:
        stop = as_interrupt(error)  # a SIGTERM that drawing code turned into its own error
        resumable = isinstance(stop, KeyboardInterrupt | CaseError)
        if resumable and partial_folder(args.out).is_dir():
            print(resume_hint(args.out, bad_case=isinstance(stop, CaseError)), file=sys.stderr)
        if stop is not error:
            raise stop from error
        raise
    return summary.describe()


def run(args: argparse.Namespace) -> str:
    """Predicts as the flags say; returns the line to print (what was written)."""
    check_predict_flags(args)
    if args.layout is None and not args.t2w:
        raise UserError("give --t2w and the model's other components (one exam) or --layout")
    components, series = parse_components(args)
    if series and args.layout is not None:
        raise UserError(
            f"{_flag(min(series), series=True)} is for one exam; a manifest chooses series in its "
            "<component>_series columns"
        )
    if unread := sorted(n for n in series if n not in components):
        raise UserError(
            f"{_flag(unread[0], series=True)} names a series of {_flag(unread[0])}, which is not "
            "given"
        )
    center = crop_centre(args)
    if args.layout is None:
        check_exam_out(args.out)  # before the models load
        if args.dicom and Path(args.t2w).is_file():  # a missing one: the reader names it
            raise UserError(
                f"--dicom: --t2w {args.t2w} is an image file, not a DICOM series folder, so there "
                "is no DICOM source for detections_seg.dcm to reference; give the T2w DICOM folder"
            )
    if reason := picai.available():  # before the models load and predict
        raise UserError(
            f"focalnet predict writes detection_map.nii.gz with picai_eval's lesion candidates: "
            f"{reason}"
        )
    candidates = CandidateSettings.from_flags(args)
    models = load_ensemble(
        args.checkpoint, step=args.step, batch_size=args.batch_size, tta=args.tta
    )
    options = {"threshold": args.threshold, "candidates": candidates}
    if args.layout is not None:
        return _predict_many(models, args, options)
    _check_exam_gives(models, components)
    written = predict_exam(
        models,
        components,
        args.out,
        center=center,
        mask=args.mask,
        series=series,
        dicom=args.dicom,
        **options,
    )
    return "wrote " + ", ".join(str(p) for p in written)
