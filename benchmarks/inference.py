"""Inference speed per exam: one model and an ensemble, without and with preprocessing.

    python benchmarks/inference.py --config configs/focalnet.py [--models 5] [--repeats 10]
        [--tta flip] [--config.k=v ...]

Prints one JSON line. The exam is a synthetic mp-MRI case of 20 T2w slices (384 x 384, 0.5 x 0.5 x
3 mm; ADC 128 x 84 at 2 x 2 x 3 mm; `focalnet_jax.data.synth`) written as .mha files, its
components those of the config (any of t2w, adc, hbv, dce). Times, each
the median of `--repeats` runs on that one exam after one warm-up run (compilation excluded), in
seconds per exam (`time_exam`):
- `predict_s`: the models on the preprocessed crop slices (all slices in one batch per model,
  split over every local device, `num_devices`; host to device and back included):
  `Ensemble.__call__`;
- `with_preprocessing_s`: reading the exam files and `preprocess_case` (resampling to the crop,
  intensity normalisation) plus `predict_s`'s work;
- `preprocess_s`: the preprocessing alone, and `write_outputs_s` (one run after a warm-up): what
  `focalnet predict` writes (maps resampled to the T2w grid, detection map, detections.csv,
  overlay.png).
Models are the config's network with random weights (speed does not depend on the weights), one
per seed; the ensemble's models share one compiled function, as `load_ensemble`'s do.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import result_line  # benchmarks/result_line.py (the script directory)
from benchmark_flags import count, run_main

from focalnet_jax.config_loading import load_config
from focalnet_jax.data import preprocess_case
from focalnet_jax.data.image_writing import write_image
from focalnet_jax.data.synth import SynthConfig, synth_case
from focalnet_jax.data.synth_render import COMPONENTS as SYNTH_COMPONENTS
from focalnet_jax.evaluation.ensemble import make_ensemble
from focalnet_jax.evaluation.inference import Predictor
from focalnet_jax.evaluation.predict import write_exam_outputs
from focalnet_jax.run import RunSpec


def write_exam(folder: Path, components: tuple[str, ...], seed: int = 0) -> dict[str, str]:
    """A default-size synthetic exam (20 slices) as .mha files: component -> path for each of
    `components`, and 'mask'. The exam's T2w, ADC and high-b DWI are the same whichever of them
    are asked for (DCE, where asked for, is drawn besides)."""
    synth = SynthConfig()
    if "dce" in components:
        synth = replace(synth, components=(*synth.components, "dce"))
    case = synth_case(seed, synth)
    files = {}
    for name in components:
        files[name] = str(folder / f"exam_{name}.mha")
        write_image(case.images[name], files[name])
    files["mask"] = str(folder / "exam_mask.mha")
    write_image(case.mask, files["mask"])
    return files


def models(config, count: int, batch_size: int, tta: str):
    """An ensemble of `count` randomly initialised models of `config`."""
    spec = RunSpec.from_config(config, num_devices=1)
    images = jnp.zeros((1, *spec.image_size, len(spec.components)), jnp.float32)
    predictors = []
    for seed in range(count):
        variables = jax.device_get(spec.model.init(jax.random.key(seed), images, train=False))
        predictors.append(Predictor.from_variables(spec, variables, batch_size=batch_size))
    runs = [Path(f"random-{seed}") for seed in range(count)]
    return make_ensemble(predictors, runs, [None] * count, tta)


def time_exam(preprocess, ensembles: dict, repeats: int) -> dict:
    """Median seconds over `repeats` runs on the exam, after one warm-up run. Each repetition
    reads and preprocesses the exam once and runs every ensemble on those slices, so that
    `preprocess_s` and each `predict_s` come from the same moments of a shared machine; with
    preprocessing is their per-repetition sum."""
    times: dict[str, list[float]] = {"preprocess_s": []}
    for name in ensembles:
        times[name] = []
    for repeat in range(repeats + 1):
        start = time.perf_counter()
        images = preprocess().images
        preprocess_s = time.perf_counter() - start
        predict_s = {}
        for name, ensemble in ensembles.items():
            start = time.perf_counter()
            ensemble(images)
            predict_s[name] = time.perf_counter() - start
        if repeat:  # the first is the warm-up: compilation and caches
            times["preprocess_s"].append(preprocess_s)
            for name, seconds in predict_s.items():
                times[name].append(seconds)
    result = {"preprocess_s": statistics.median(times["preprocess_s"])}
    for name in ensembles:
        total = [p + t for p, t in zip(times["preprocess_s"], times[name], strict=True)]
        result[name] = {
            "predict_s": statistics.median(times[name]),
            "with_preprocessing_s": statistics.median(total),
        }
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="config file[:arg]")
    parser.add_argument("--models", type=count(1), default=5, help="ensemble size")
    parser.add_argument(
        "--repeats", type=count(1), default=10, help="timed runs on the exam (after a warm-up)"
    )
    parser.add_argument("--tta", choices=("none", "flip"), default="none")
    args, overrides = parser.parse_known_args(argv)
    config = load_config(args.config, overrides)
    components = tuple(config.data.components)
    if not set(components) <= set(SYNTH_COMPONENTS):
        parser.error(f"config has {components}: the synthetic exam has only {SYNTH_COMPONENTS}")

    with tempfile.TemporaryDirectory() as tmp:
        files = write_exam(Path(tmp), components)
        exam = {name: files[name] for name in components}

        def preprocess():
            return preprocess_case(exam, mask=files["mask"], case_id="exam")

        case = preprocess()
        slices = len(case.images)
        result = {"config": args.config, "overrides": overrides, "slices": slices}
        counts = sorted({1, args.models})
        ensembles = {f"models_{n}": models(config, n, slices, args.tta) for n in counts}
        result.update(time_exam(preprocess, ensembles, args.repeats))
        scores, out = ensembles["models_1"](case.images), Path(tmp) / "out"
        write_exam_outputs(case, scores, out)  # warm-up: imports, first figure
        start = time.perf_counter()
        write_exam_outputs(case, scores, out)
        result["write_outputs_s"] = time.perf_counter() - start
    result.update(
        tta=args.tta,
        device_peak_bytes=result_line.device_peak_bytes(),
        **result_line.device_fields(),
        model=result_line.model_description(config),
        components=list(components),
        repeats=args.repeats,
        numpy_version=np.__version__,
        **result_line.provenance(),
    )
    print(json.dumps(result))


if __name__ == "__main__":
    run_main(main)
