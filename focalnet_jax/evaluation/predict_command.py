"""The body of `focalnet predict`: its parsed flags to one exam (`predict.predict_exam`) or to
every case of a PI-CAI folder or manifest (`batch_predict.predict_layout`), with one model or an
ensemble (`ensemble.load_ensemble`) and the detection-map settings (`CandidateSettings`)."""

from __future__ import annotations

import argparse

from focalnet_jax.errors import UserError
from focalnet_jax.evaluation.batch_predict import predict_layout
from focalnet_jax.evaluation.detection_map import CandidateSettings
from focalnet_jax.evaluation.ensemble import load_ensemble
from focalnet_jax.evaluation.flag_checks import check_predict_flags
from focalnet_jax.evaluation.predict import predict_exam

COMPONENTS = ("t2w", "adc", "hbv")


def parse_center(text: str | None) -> tuple[float, float, float] | None:
    """'x,y,z' (LPS mm) -> a point; None for None."""
    if not text:
        return None
    try:
        center = tuple(float(v) for v in text.split(","))
    except ValueError:
        center = ()
    if len(center) != 3:
        raise UserError(f"--center expects x,y,z, got {text!r}")
    return center


def parse_components(args: argparse.Namespace) -> dict[str, str]:
    """One exam's component files: --t2w/--adc/--hbv and each --component NAME=PATH."""
    components = {name: getattr(args, name) for name in COMPONENTS if getattr(args, name)}
    for item in args.component or ():
        name, sep, path = item.partition("=")
        name = name.strip()
        if not sep or not name or not path:
            raise UserError(f"--component expects NAME=PATH (e.g. dce=exam/dce.mha), got {item!r}")
        if name in COMPONENTS:
            raise UserError(f"--component {item}: give {name} with --{name}")
        if name in components:
            raise UserError(f"--component names {name!r} twice ({components[name]} and {path})")
        components[name] = path
    return components


def _check_exam_gives(models, components: dict[str, str]) -> None:
    """Raises naming the flag of each component the models read that the exam does not give."""
    missing = [c for c in models.components if c not in components]
    if missing:
        flags = [f"--{c} PATH" if c in COMPONENTS else f"--component {c}=PATH" for c in missing]
        raise UserError(
            f"the model(s) {', '.join(map(str, models.runs))} read {list(models.components)} "
            f"(T2w as the reference grid); give {', '.join(flags)}"
        )


def run(args: argparse.Namespace) -> str:
    """Predicts as the flags say; returns the line to print (what was written)."""
    check_predict_flags(args)
    if args.layout is None and not args.t2w:
        raise UserError("give --t2w and the model's other components (one exam) or --layout")
    components = parse_components(args)
    series = {n: getattr(args, f"{n}_series") for n in COMPONENTS if getattr(args, f"{n}_series")}
    if series and args.layout is not None:
        raise UserError(
            f"--{min(series)}-series is for one exam; a manifest chooses series in its "
            "<component>_series columns"
        )
    if unread := sorted(n for n in series if not getattr(args, n)):
        raise UserError(f"--{unread[0]}-series names a series of --{unread[0]}, which is not given")
    center = parse_center(args.center)
    candidates = CandidateSettings.from_flags(args)
    models = load_ensemble(
        args.checkpoint, step=args.step, batch_size=args.batch_size, tta=args.tta
    )
    options = {"threshold": args.threshold, "candidates": candidates}
    if args.layout is not None:
        summary = predict_layout(
            models,
            args.layout,
            args.out,
            images=args.images,
            masks=args.masks,
            manifest=args.manifest,
            skip_bad_cases=args.skip_bad_cases,
            overwrite=args.overwrite,
            **options,
        )
        return summary.describe()
    _check_exam_gives(models, components)
    written = predict_exam(
        models, components, args.out, center=center, mask=args.mask, series=series, **options
    )
    return "wrote " + ", ".join(str(p) for p in written)
