"""Preprocessing speed: seconds per case for PI-CAI-size synthetic cases with 1 and N workers.

    python benchmarks/preprocess.py [--cases 8] [--workers N] [--slices 24]

Prints one JSON line. Case generation is not timed; each timing covers reading the .mha/.nii.gz
files, resampling T2w/ADC/HBV and the label onto the crop grid, normalisation, lesion instances and
writing the store (worker start-up included for N workers). The 1-worker run uses one core
(SimpleITK limited to one thread), as each worker process does. Target: < 2 s per case per core.
`--workers` defaults to the CPU count, at most `--cases`; more workers than cases is refused
(preprocessing starts at most one worker per case, so the N-worker run would be fewer workers
than the line says).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import result_line  # benchmarks/result_line.py (the script directory)
import SimpleITK as sitk
from benchmark_flags import count

from focalnet_jax.data.build_store import preprocess_cases
from focalnet_jax.data.layouts import discover_picai
from focalnet_jax.data.preprocess_config import PreprocessConfig
from focalnet_jax.data.synth import SynthConfig, write_dataset
from focalnet_jax.demo import cpu_name


def _time(cases, out, workers, config) -> float:
    start = time.perf_counter()
    preprocess_cases(cases, out, config=config, workers=workers, progress=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=count(1), default=8)
    parser.add_argument("--workers", type=count(1), help="default: CPU count, at most --cases")
    parser.add_argument("--slices", type=count(1), default=24, help="T2w slices (PI-CAI: about 24)")
    parser.add_argument("--components", default="t2w,adc,hbv")
    args = parser.parse_args()
    if args.workers is None:
        args.workers = min(os.cpu_count() or 1, args.cases)
    elif args.workers > args.cases:  # `preprocess_cases` caps its workers at the cases
        parser.error(
            f"--workers {args.workers}: more than the {args.cases} --cases (at most one worker "
            "per case)"
        )
    components = tuple(args.components.split(","))
    synth_components = SynthConfig().components  # what the synthetic dataset holds
    if components[0] != "t2w" or not set(components) <= set(synth_components):
        parser.error(
            f"--components: expected t2w first, then some of {synth_components[1:]}, "
            f"got {args.components!r}"
        )
    synth = SynthConfig(t2w_size=(args.slices, 384, 384), dwi_size=(args.slices, 128, 84))
    config = PreprocessConfig(label_values="isup")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_dataset(root / "data", args.cases, seed=0, cfg=synth)
        cases = discover_picai(
            root / "data" / "images",
            root / "data" / "labels",
            root / "data" / "masks",
            components=components,
        )
        _time(cases[:1], root / "warmup", 1, config)  # imports and file cache
        # One worker runs in this process: limit SimpleITK to one thread so that it is one core,
        # as each of the N worker processes is.
        threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
        one = _time(cases, root / "store1", 1, config) / len(cases)
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
        many = _time(cases, root / "storeN", args.workers, config) / len(cases)
    print(
        json.dumps(
            {
                "benchmark": "preprocess",
                "cases": len(cases),
                "t2w_size_zyx": list(synth.t2w_size),
                "components": list(components),
                "seconds_per_case_1_worker": round(one, 4),
                "workers": args.workers,
                "seconds_per_case_n_workers": round(many, 4),
                "speedup": round(one / many, 2),
                "seconds_per_case_per_core": round(one, 4),
                "cpu": cpu_name(),
                "cpu_count": os.cpu_count(),
                "target_seconds_per_case_per_core": 2.0,
                **result_line.provenance(),
            }
        )
    )


if __name__ == "__main__":
    main()
