"""`focalnet synth`, `preprocess` and `folds`: flags and a thin call into focalnet_jax.data."""

from __future__ import annotations

import argparse
from pathlib import Path

from focalnet_jax.errors import UserError, plural


def add_synth(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="dataset folder (PI-CAI layout)")
    parser.add_argument("--cases", type=int, required=True, help="number of cases (studies)")
    parser.add_argument("--seed", type=int, default=0, help="case i depends only on (seed, i)")
    parser.add_argument(
        "--small", action="store_true", help="96 x 96 x 6 T2w (1 x 1 x 3 mm) for quick tests"
    )
    parser.add_argument(
        "--t2w-only-share", type=float, default=0.15, help="lesions only in T2w (default 0.15)"
    )
    parser.add_argument(
        "--adc-only-share", type=float, help="lesions only in ADC/HBV (default 0.15; needs adc/hbv)"
    )
    parser.add_argument(
        "--dce-only-share", type=float, help="lesions only in DCE (default 0.15; needs dce)"
    )
    parser.add_argument(
        "--components", default="t2w,adc,hbv", help="comma-separated, t2w first; of t2w,adc,hbv,dce"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def run_synth(args: argparse.Namespace) -> int:
    from focalnet_jax.data.synth import SynthConfig, dataset_flag_problem, write_dataset

    options = {"t2w_only_share": args.t2w_only_share}
    options["components"] = tuple(c.strip() for c in args.components.split(",") if c.strip())
    for flag, share, shown_in in [
        ("--adc-only-share", args.adc_only_share, ("adc", "hbv")),
        ("--dce-only-share", args.dce_only_share, ("dce",)),
    ]:
        if share is None:
            continue
        if share and not set(shown_in) & set(options["components"]):
            raise UserError(
                f"{flag} {share}: --components {args.components} has no {' or '.join(shown_in)}, "
                f"so no lesion is shown in {shown_in[0].upper()} only; add "
                f"{shown_in[0]} or leave the flag out"
            )
        options[f"{shown_in[0]}_only_share"] = share
    try:
        config = SynthConfig.small(**options) if args.small else SynthConfig(**options)
    except ValueError as err:  # the options are the user's
        raise UserError(str(err)) from err
    if problem := dataset_flag_problem(args.cases, args.seed):
        raise UserError(problem)
    cases = write_dataset(
        args.out, args.cases, args.seed, config, progress=True, overwrite=args.overwrite
    )
    print(f"wrote {plural(len(cases), 'synthetic case')} to {args.out}")
    return 0


def add_preprocess(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layout", choices=("picai", "manifest"), required=True)
    parser.add_argument(
        "--images",
        type=Path,
        action="append",
        help="picai: <images>/<patient>/<case>_<comp>.mha; repeat for several image folders",
    )
    parser.add_argument(
        "--labels",
        type=Path,
        action="append",
        help="picai: <labels>/<case>.nii.gz (ISUP values; .dcm: a DICOM SEG); repeat to fill "
        "in: a case takes its label from the first folder that holds one (e.g. expert, then "
        "AI-derived labels)",
    )
    parser.add_argument("--masks", type=Path, help="picai: whole-gland masks for centring")
    parser.add_argument(
        "--marksheet", type=Path, help="picai: marksheet.csv (kept as case metadata)"
    )
    parser.add_argument("--manifest", type=Path, help="manifest: CSV of cases (see docs/data.md)")
    parser.add_argument("--out", type=Path, required=True, help="store folder to write")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument(
        "--skip-bad-cases", action="store_true", help="list bad cases in errors.csv, keep going"
    )
    parser.add_argument("--components", default="t2w,adc", help="comma-separated, T2w first")
    parser.add_argument(
        "--slices",
        choices=("all", "annotated", "covered"),
        default="all",
        help="slices to store: every T2w slice, those holding lesion labels, or those every "
        "component covers (a DWI slab shorter than the T2w's; a lesion on another slice is still "
        "an error) (default all)",
    )
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
        "picai layout reads <labels>/dataset.json, else 'picai'; manifest 'isup'. A DICOM SEG "
        "label's 'csPCa' segments need picai, its 'ISUP 1' (GS 3+3) ones isup",
    )
    parser.add_argument(
        "--interpolator",
        choices=("bspline", "linear"),
        default="bspline",
        help="image resampling (labels: nearest neighbour; default bspline)",
    )


def run_preprocess(args: argparse.Namespace) -> int:
    from focalnet_jax.data.atomic_files import check_output_folder
    from focalnet_jax.data.build_store import preprocess_layout

    check_output_folder(args.out)
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
    print(summary)
    return 0


def add_folds(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", type=Path, required=True, help="preprocessed store")
    parser.add_argument("--num-folds", type=int, default=5, help="folds (default 5)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the patient-level split (default 0)"
    )
    parser.add_argument("--out", type=Path, help="also write fold-<k>.json files here")
    parser.add_argument("--list-cases", action="store_true", help="print each fold's case ids")
    parser.add_argument(
        "--splits",
        type=Path,
        help="print given folds instead (as data.splits: picai_baseline ds-config folder, "
        "splits.json, fold-<k>.json folder)",
    )


def run_folds(args: argparse.Namespace) -> int:
    from focalnet_jax.data.atomic_files import check_output_folder
    from focalnet_jax.data.folds import fold_table, write_fold_files
    from focalnet_jax.data.store import open_store

    if args.out and args.splits:
        raise UserError("--out writes seeded folds; the --splits given are fold files already")
    check_output_folder(args.out)  # before the table is printed
    if args.seed < 0:
        raise UserError(f"--seed {args.seed}: expected 0 or more")
    store = open_store(args.store)
    rows = fold_table(store, args.num_folds, args.seed, args.splits or "")
    print("fold  patients  cases  slices  annotated  patients per highest class 0..5")
    for row in rows:
        per_class = " ".join(f"{n:3d}" for n in row["patients_per_max_class"])
        print(
            f"{row['fold']:4d}  {row['patients']:8d}  {row['cases']:5d}  {row['slices']:6d}"
            f"  {row['annotated']:9d}  {per_class}"
        )
        if args.list_cases:
            print("      " + " ".join(row["case_ids"]))
    if args.out:
        for path in write_fold_files(store, args.out, args.num_folds, args.seed):
            print(f"wrote {path}")
    return 0
