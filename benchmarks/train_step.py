"""Train-step speed: the FL-only step and the FL+MFL step (vmap and select modes) side by side.

    python benchmarks/train_step.py --config configs/focalnet.py [--steps 20] [--kinds fl,...]
        [--config.k=v ...]

Prints one JSON line: per step kind, images/s, step time, compile time and memory, the MFL/FL
step-time ratios, and the device kind. Memory: `compiled_peak_bytes`, the compiled step's peak
from XLA's memory analysis (arguments + outputs + temporaries - aliased, per device: each kind's
own, on every backend); `peak_memory_bytes`, the device's `memory_stats()['peak_bytes_in_use']`
after the kind's steps (null where the backend has none), a running maximum of the process: only
the first kind's is its own, a later kind's is at least every earlier kind's. Inputs are random
slices of the store's size (128 x 128) with square lesions, so no store is needed. Each step is
compiled once (`lower().compile()`, timed), run once to warm up, then timed over `--steps` steps
with `block_until_ready`.
`images_per_s` is the global batch (all devices) over the step time. `flops_per_device_step` is
XLA's count for the lowered step (`Lowered.cost_analysis()`), which under `shard_map` is one
device's program; `flops_per_step` is that times the number of devices (the arithmetic of the
whole step, the replicated work counted on every device), so `tflops_per_s` is the achieved rate
of all devices together, like `images_per_s`. `chunked` says whether the MFL step runs its
subsets in chunks (`loss.mfl_chunk` below the number of subsets; false without MFL): XLA counts
the loop's body once, so there the three FLOP fields are null. With `--profile-steps N`, N more
steps of each kind are traced with `jax.profiler`: `profile` holds the ops that took longest, and
the time per kind of op (`profile_summary.py`).

The kinds differ in their loss only, so the state's init is compiled once (`init_time_s`: its
first call, compile and run) and called again for each kind's own fresh state. Each kind's result
is also written to stderr as soon as it is measured, so a run stopped by a time limit keeps what
it measured in its log.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import benchmark_flags  # benchmarks/benchmark_flags.py (the script directory)
import jax
import jax.numpy as jnp
import numpy as np
import profile_summary  # benchmarks/profile_summary.py
import result_line

from focalnet_jax import losses
from focalnet_jax.config_loading import load_config
from focalnet_jax.run import RunSpec
from focalnet_jax.training import sharding, train_state
from focalnet_jax.training import step as step_lib

KINDS = {
    "fl": ["--config.loss.mfl=false"],
    "fl_mfl_vmap": ["--config.loss.mfl=true", "--config.loss.mfl_mode=vmap"],
    "fl_mfl_select": ["--config.loss.mfl=true", "--config.loss.mfl_mode=select"],
}


def _batch(batch_size: int, size: int, channels: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    classes = np.zeros((batch_size, size, size), np.int32)
    for b in range(batch_size):
        r, c = rng.integers(0, size - 16, 2)
        classes[b, r : r + 16, c : c + 16] = 1 + b % 5
    return {
        "images": rng.uniform(0, 1, (batch_size, size, size, channels)).astype(np.float32),
        "classes": classes,
        "grade_known": np.ones_like(classes, np.uint8),
        "t2w_lower_ratio": np.zeros(batch_size, np.float32),
    }


def compiled_peak_bytes(compiled) -> int:
    """XLA's peak estimate of a compiled step: arguments + outputs + temporaries - aliased."""
    m = compiled.memory_analysis()
    return int(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )


def flop_fields(spec: RunSpec, device_flops, devices: int, step_time: float) -> dict:
    """`chunked` (whether the step runs its MFL subsets in chunks, `losses.probe_chunk`) and XLA's
    count of one device's step (`device_flops`) as `flops_per_device_step`, times `devices` as
    `flops_per_step`, over `step_time` as `tflops_per_s`; all three null where chunked (XLA
    counts a loop's body once) or where XLA gave no count."""
    chunked = bool(losses.probe_chunk(spec.mfl_chunk, len(spec.subsets)))
    device_flops = None if chunked or not device_flops else device_flops
    flops = device_flops * devices if device_flops else None
    return {
        "chunked": chunked,
        "flops_per_step": flops,
        "flops_per_device_step": device_flops,
        "tflops_per_s": flops / step_time / 1e12 if flops else None,
    }


def measure(
    config, state, mesh, *, steps: int, size: int, profile_steps: int = 0, kind: str = ""
) -> dict:
    """Compile, warm up and time `steps` train steps of `config` from `state` (donated) on one
    random batch, the timings written to stderr at once as `<kind>: {...}` (a time limit that
    stops the profile keeps them); then, with `profile_steps`, trace that many more and add
    where their time goes (`profile`, written to stderr as `<kind> profile: {...}`)."""
    spec = RunSpec.from_config(config, image_size=(size, size))
    batch = jax.device_put(
        _batch(spec.global_batch, size, len(spec.components)), sharding.batch_sharding(mesh)
    )
    key, lam = jax.random.key(1), jnp.float32(100.0)
    start = time.perf_counter()
    step = step_lib.make_train_step(spec, mesh)
    lowered = step.lower(state, batch, key, lam)
    device_flops = (lowered.cost_analysis() or {}).get("flops")
    compiled = lowered.compile()
    compile_time = time.perf_counter() - start
    state, metrics = compiled(state, batch, key, lam)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch, key, lam)
    jax.block_until_ready((state, metrics))
    step_time = (time.perf_counter() - start) / steps
    result = {
        "images_per_s": config.train.batch_size / step_time,
        "step_time_s": step_time,
        "compile_time_s": compile_time,
        **flop_fields(spec, device_flops, mesh.size, step_time),
        "compiled_peak_bytes": compiled_peak_bytes(compiled),
        "peak_memory_bytes": result_line.device_peak_bytes(),
        "final_loss": float(metrics["loss"]),
    }
    print(f"{kind}: {json.dumps(result)}", file=sys.stderr, flush=True)
    if profile_steps:

        def one_step():
            nonlocal state
            state, step_metrics = compiled(state, batch, key, lam)
            return step_metrics

        result["profile"] = profile_summary.profile_or_error(
            one_step, profile_steps, hlo_text=compiled.as_text()
        )
        print(f"{kind} profile: {json.dumps(result['profile'])}", file=sys.stderr, flush=True)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="config file[:arg]")
    parser.add_argument(
        "--steps", type=benchmark_flags.count(1), default=20, help="timed steps per kind"
    )
    # `_batch` draws a 16-pixel lesion square inside the slice
    parser.add_argument(
        "--size", type=benchmark_flags.count(17), default=128, help="slice size (store: 128)"
    )
    benchmark_flags.add_kinds_flag(parser, KINDS, "step kinds to time (ratios need fl)")
    profile_summary.add_calls_flag(
        parser,
        "--profile-steps",
        "after timing, trace this many steps of each kind: its slowest ops (`profile`)",
    )
    args, overrides = parser.parse_known_args(argv)
    kinds = benchmark_flags.chosen_kinds(parser, args.kinds, KINDS)
    result = {"config": args.config, "overrides": overrides}
    mesh = sharding.make_mesh()
    new_state = None
    for kind in kinds:
        config = load_config(args.config, [*overrides, *KINDS[kind]])
        if new_state is None:  # the kinds differ in their loss only: one init compiled for all
            spec = RunSpec.from_config(config, image_size=(args.size, args.size))
            new_state = train_state.fresh_state_maker(spec, mesh)
            start = time.perf_counter()
            jax.block_until_ready(new_state(jax.random.key(0)))
            result["init_time_s"] = time.perf_counter() - start
        result[kind] = measure(
            config,
            new_state(jax.random.key(0)),
            mesh,
            steps=args.steps,
            size=args.size,
            profile_steps=args.profile_steps,
            kind=kind,
        )
    for kind in ("fl_mfl_vmap", "fl_mfl_select"):
        if "fl" in result and kind in result:
            ratio = result[kind]["step_time_s"] / result["fl"]["step_time_s"]
            result[f"ratio_{kind}_to_fl"] = ratio
    result.update(
        **result_line.device_fields(),
        batch_size=config.train.batch_size,
        image_size=args.size,
        model=result_line.model_description(config),
        components=list(config.data.components),
        steps_timed=args.steps,
        # A warm persistent cache ($JAX_COMPILATION_CACHE_DIR) makes compile_time_s a load.
        compilation_cache=jax.config.jax_compilation_cache_dir,
        **result_line.provenance(),
    )
    print(json.dumps(result))


if __name__ == "__main__":
    benchmark_flags.run_main(main)
