"""Where chunked MFL subsets cost time: the subset probe (`losses.subset_distances`) forward and
its gradient, all subsets in one `vmap` against chunks in a loop (`lax.map`), side by side.

    python benchmarks/mfl_chunk_loop.py --config configs/mfl4.py [--chunk 4] [--size 64]
        [--repeats 5] [--kinds forward,input_gradient,parameter_gradient] [--config.k=v ...]

Every non-empty proper subset of the config's components is probed on a random batch, with the
model's initial weights and `train=True` normalisation, as in the `vmap` MFL mode (the chunks
`jax.checkpoint`-ed, as the train step does; a `--chunk` of all the subsets or more is refused,
as the probe would not loop). Timed: the
forward pass (distances `[M, B]`), the gradient of their sum with respect to the input images
(the backward pass without weight gradients) and with respect to the parameters (what training
computes), each compiled once and then the median of `--repeats` calls (`block_until_ready`);
`--kinds` times only those named (each kind is two compilations, the longest part of a run);
with each, the temporary memory of the compiled function from XLA's memory analysis
(`*_temp_bytes`). Prints one JSON line with these and the `loop_over_vmap` time ratio of each: a
ratio near 1 for the forward pass and far above 1 for the parameter gradient says that the loop's
weight gradients, not the loop itself, are slow on this backend. `--profile-calls N` traces N
calls of each parameter gradient and adds its slowest ops and time per kind of op
(`parameter_gradient_{vmap,loop}_profile`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import benchmark_flags  # benchmarks/benchmark_flags.py (the script directory)
import jax
import jax.numpy as jnp
import profile_summary  # benchmarks/profile_summary.py
import result_line
from jax.sharding import PartitionSpec

from focalnet_jax import losses
from focalnet_jax.config_loading import load_config
from focalnet_jax.errors import UserError
from focalnet_jax.run import RunSpec
from focalnet_jax.training import sharding, train_state


def _probe(spec: RunSpec, batch_stats, chunk: int):
    """(params, images `[B, H, W, C]`) -> sum of the probe's distances `d[M, B]` over all
    subsets, `chunk` subsets at a time."""
    masks = losses.subset_masks(spec.components, None)

    def probs_of(params, x):
        variables = {"params": params, "batch_stats": batch_stats}
        out, _ = spec.model.apply(variables, x, train=True, mutable=["batch_stats"])
        return losses.mfl_probs(out, spec.output_encoding)

    def total(params, images):
        full = probs_of(params, images)
        targets = jnp.ones_like(full)  # every bit compared
        subset_probs = lambda x: probs_of(params, x)
        if chunk:  # as the train step's `vmap` mode: each chunk recomputed in the backward pass
            subset_probs = jax.checkpoint(subset_probs)
        return jnp.sum(
            losses.subset_distances(subset_probs, images, masks, full, targets, chunk=chunk)
        )

    return total


def _median_time(fn, args: tuple, repeats: int) -> float:
    """Median seconds of `fn(*args)` over `repeats` calls after a first (warm-up) call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


KINDS = {"forward": None, "input_gradient": 1, "parameter_gradient": 0}
"""Timed functions of the probe: itself, and its gradient with respect to argument 1 or 0."""


def measure(
    config, *, chunk: int, size: int, repeats: int, kinds=tuple(KINDS), profile_calls: int = 0
) -> dict:
    """Times (s) of each of `kinds` (of `KINDS`), unchunked and in chunks of `chunk`, and their
    ratios; with `profile_calls`, where the parameter gradient's time goes in each form
    (`profile_summary`)."""
    spec = RunSpec.from_config(config, image_size=(size, size), num_devices=1)
    subsets = len(losses.component_subsets(spec.components))
    if not losses.probe_chunk(chunk, subsets):  # the "loop" would be the vmap again
        raise UserError(
            f"--chunk {chunk}: the config's {subsets} subsets would run in one vmap, with no loop "
            f"to time; choose --chunk below {subsets}"
        )
    variables = train_state.init_variables(spec.model, jax.random.key(0), spec.input_shape)
    shape = (spec.global_batch, size, size, len(spec.components))
    args = (variables["params"], jax.random.normal(jax.random.key(1), shape))
    mesh = sharding.make_mesh()  # BatchNorm's statistics name the mesh's data axis
    result = {}
    for name, n in (("vmap", 0), ("loop", chunk)):
        total = _probe(spec, variables.get("batch_stats", {}), n)
        for kind in kinds:
            argnum = KINDS[kind]
            fn = total if argnum is None else jax.grad(total, argnums=argnum)
            mapped = jax.shard_map(
                fn, mesh=mesh, in_specs=PartitionSpec(), out_specs=PartitionSpec()
            )
            compiled = jax.jit(mapped).lower(*args).compile()
            result[f"{kind}_{name}_s"] = _median_time(compiled, args, repeats)
            result[f"{kind}_{name}_temp_bytes"] = compiled.memory_analysis().temp_size_in_bytes
            if profile_calls and kind == "parameter_gradient":
                result[f"{kind}_{name}_profile"] = profile_summary.profile_or_error(
                    lambda c=compiled: c(*args), profile_calls, top=5, hlo_text=compiled.as_text()
                )
    for kind in kinds:
        result[f"{kind}_loop_over_vmap"] = result[f"{kind}_loop_s"] / result[f"{kind}_vmap_s"]
    return result | {"subsets": subsets, "chunk": chunk}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="config file[:arg]")
    parser.add_argument(
        "--chunk", type=benchmark_flags.count(1), default=4, help="subsets per loop iteration"
    )
    parser.add_argument("--size", type=benchmark_flags.count(1), default=64, help="slice size")
    parser.add_argument(
        "--repeats", type=benchmark_flags.count(1), default=5, help="timed calls of each function"
    )
    benchmark_flags.add_kinds_flag(parser, KINDS, "functions to time")
    profile_summary.add_calls_flag(
        parser,
        "--profile-calls",
        "trace this many parameter-gradient calls of each form: its slowest ops",
    )
    args, overrides = parser.parse_known_args(argv)
    kinds = benchmark_flags.chosen_kinds(parser, args.kinds, KINDS)
    config = load_config(args.config, overrides)
    result = {"config": args.config, "overrides": overrides}
    result |= {"size": args.size, "repeats": args.repeats, "kinds": kinds}
    result |= measure(
        config,
        chunk=args.chunk,
        size=args.size,
        repeats=args.repeats,
        kinds=kinds,
        profile_calls=args.profile_calls,
    )
    result |= result_line.device_fields() | {"model": result_line.model_description(config)}
    print(json.dumps(result | {"batch_size": config.train.batch_size} | result_line.provenance()))


if __name__ == "__main__":
    benchmark_flags.run_main(main)
