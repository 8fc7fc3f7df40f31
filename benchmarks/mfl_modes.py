"""How far the `select` MFL mode's loss and gradient are from the `vmap` mode's (the paper's) on
one batch: equal under `frozen` normalisation in float32 (in bfloat16 to its rounding), not under
`batch` normalisation, where `select`'s recomputed batch mixes slices of different subsets and so
normalises with other statistics.

    python benchmarks/mfl_modes.py --config configs/focalnet.py [--size 64] [--seed 0]
        [--config.k=v ...]

The config's model at its initial weights, on one random batch of `train.batch_size` slices
(uniform inputs, one square lesion of class 1 + b % 5 per slice), through the train step's loss
(`step.loss_fn`, no augmentation). MFL's gradient is the loss's gradient at lambda = 1 minus that
at lambda = 0 (the named loss's part cancels). Prints one JSON line: `seed`; per mode `mfl` and
the norm of its gradient; `same_choice` (the two modes trained each subset on the same share of
the slices, `mfl_subset_share`: a count per subset, not a slice-by-slice comparison);
`gradient_cosine` (1: the same direction); `gradient_relative_difference`
(|g_select - g_vmap| / |g_vmap|).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import result_line  # benchmarks/result_line.py (the script directory)
from benchmark_flags import count, run_main

from focalnet_jax.config_loading import load_config
from focalnet_jax.run import RunSpec
from focalnet_jax.training import step as step_lib
from focalnet_jax.training import train_state

MODES = ("vmap", "select")


def _batch(batch: int, size: int, channels: int, seed: int):
    rng = np.random.default_rng(seed)
    images = rng.uniform(0.0, 1.0, (batch, size, size, channels)).astype(np.float32)
    classes = np.zeros((batch, size, size), np.int32)
    side = max(size // 8, 2)
    for b in range(batch):
        r, c = rng.integers(0, size - side, 2)
        classes[b, r : r + side, c : c + side] = 1 + b % 5
    return jnp.asarray(images), jnp.asarray(classes), jnp.ones_like(jnp.asarray(classes), jnp.uint8)


def measure(config, *, size: int, seed: int) -> dict:
    """Per mode: MFL, its gradient's norm and the share of each subset; and their comparison."""
    out, gradients, shares = {}, {}, {}
    for mode in MODES:
        config.loss.mfl_mode = mode
        spec = RunSpec.from_config(config, image_size=(size, size))
        # One device, no shard_map: no data axis to sync BatchNorm over (same statistics).
        spec = dataclasses.replace(spec, model=spec.model.clone(axis_name=None))
        variables = train_state.init_variables(spec.model, jax.random.key(seed), spec.input_shape)
        data = _batch(config.train.batch_size, size, len(spec.components), seed)

        def loss(params, weight, images, classes, known, spec=spec, variables=variables):
            stats = variables["batch_stats"]
            return step_lib.loss_fn(params, stats, images, classes, known, weight, spec=spec)

        grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
        (_, (terms, _)), with_mfl = grad(variables["params"], 1.0, *data)
        _, without = grad(variables["params"], 0.0, *data)
        flat = [
            jnp.ravel(g) for g in jax.tree.leaves(jax.tree.map(jnp.subtract, with_mfl, without))
        ]
        gradients[mode] = np.asarray(jnp.concatenate(flat), np.float64)
        shares[mode] = np.asarray(terms["mfl_subset_share"])
        out[f"{mode}_mfl"] = float(terms["mfl"])
        out[f"{mode}_gradient_norm"] = float(np.linalg.norm(gradients[mode]))
    g_vmap, g_select = gradients["vmap"], gradients["select"]
    out["same_choice"] = bool(np.array_equal(shares["vmap"], shares["select"]))
    out["gradient_cosine"] = float(
        g_vmap @ g_select / np.linalg.norm(g_vmap) / np.linalg.norm(g_select)
    )
    out["gradient_relative_difference"] = float(
        np.linalg.norm(g_select - g_vmap) / np.linalg.norm(g_vmap)
    )
    return out | {"subsets": len(spec.subsets), "norm": config.model.norm}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="config file[:arg]")
    # `measure` draws a lesion square of max(size // 8, 2) pixels inside the slice
    parser.add_argument("--size", type=count(3), default=64, help="slice size")
    parser.add_argument("--seed", type=int, default=0, help="weights and batch")
    args, overrides = parser.parse_known_args(argv)
    config = load_config(args.config, overrides)
    with result_line.stdout_to_stderr():
        result = {"config": args.config, "overrides": overrides}
        result |= {"size": args.size, "seed": args.seed}
        result |= measure(config, size=args.size, seed=args.seed)
    result |= result_line.device_fields() | {"model": result_line.model_description(config)}
    print(json.dumps(result | {"batch_size": config.train.batch_size} | result_line.provenance()))


if __name__ == "__main__":
    run_main(main)
