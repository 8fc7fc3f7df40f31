"""MFL cost against the number of component subsets: the plain step and the FL+MFL step at each
subset count and MFL mode, as ratios to the plain step of the same run.

    python benchmarks/mfl_scaling.py --config configs/mfl4.py --components t2w,adc,hbv,dce \
        --subset-counts 2,6,14 [--modes vmap,select] [--steps 3] [--rounds 3] [--size 128] \
        [--config.k=v ...]

Subsets for a count M: the first M of every non-empty proper subset of the components in the
project's order (single components, then pairs, ...), so M = 2^C - 2 is all of them. Every step is
built from a `RunSpec` and compiled first; then, `--rounds` times, each MFL step is timed
(`--steps` steps, `block_until_ready`) right after a timing of the plain step, so both see the same
load; `time_ratio` is the median over rounds of MFL time / adjacent plain time. `memory_ratio` is
the compiled step's peak from XLA's memory analysis (arguments + outputs + temporaries - aliased),
MFL over plain; `flops_ratio` is XLA's FLOP count of the lowered steps (`Lowered.cost_analysis()`),
MFL over plain, null for a step run in chunks (XLA counts a loop's body once); on
a backend with memory statistics the process's running peak after each step's first call is
reported too (`device_peak_bytes`, a running maximum: steps run plain first, then by subset
count). The steps differ in their loss only: the state's init is compiled once and called again
for each step's fresh state; `compile_time_s` (and `plain_compile_time_s`) is each step's own
build, lowering and compile, also written to stderr as each is compiled. Prints one JSON line:
`{"results": [{"subsets", "mode", "mfl_chunk", "chunked", "time_ratio", "memory_ratio", ...}],
"device": ..., ...}`; `chunked` is false where `mfl_chunk` is 0 or not below the subset count
(the step then runs every subset in one `vmap`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import result_line  # benchmarks/result_line.py (the script directory)
from benchmark_flags import count, int_list, run_main
from train_step import (  # benchmarks/train_step.py (the script directory)
    _batch,
    compiled_peak_bytes,
)

from focalnet_jax import losses
from focalnet_jax.config_loading import load_config
from focalnet_jax.run import RunSpec
from focalnet_jax.training import sharding, train_state
from focalnet_jax.training import step as step_lib


class _Step:
    """One compiled train step with its own state, timed on a fixed batch."""

    def __init__(self, config, size: int, mesh, state):
        start = time.perf_counter()
        spec = RunSpec.from_config(config, image_size=(size, size))
        self.state = state  # donated to the step
        self.batch = jax.device_put(
            _batch(spec.global_batch, size, len(spec.components)), sharding.batch_sharding(mesh)
        )
        self.args = (jax.random.key(1), jnp.float32(100.0))
        lowered = step_lib.make_train_step(spec, mesh).lower(self.state, self.batch, *self.args)
        self.flops = (lowered.cost_analysis() or {}).get("flops")  # a loop body counted once
        self.compiled = lowered.compile()
        self.compile_time_s = time.perf_counter() - start
        self.peak_bytes = compiled_peak_bytes(self.compiled)
        self.state, metrics = self.compiled(self.state, self.batch, *self.args)  # warm-up
        jax.block_until_ready(metrics)
        self.device_peak_bytes = result_line.device_peak_bytes()

    def time(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            self.state, metrics = self.compiled(self.state, self.batch, *self.args)
        jax.block_until_ready((self.state, metrics))
        return (time.perf_counter() - start) / steps


def _compiled_step(name, config, size: int, mesh, new_state) -> _Step:
    """`_Step` from a fresh state; says on stderr when it is compiled (a run stopped by a time
    limit shows how far it got)."""
    step = _Step(config, size, mesh, new_state(jax.random.key(0)))
    print(f"compiled {name} in {step.compile_time_s:.1f} s", file=sys.stderr, flush=True)
    return step


def _config(args, overrides, mfl: bool, mode: str = "vmap", count: int = 0):
    config = load_config(args.config, [*overrides, f"--config.loss.mfl={str(mfl).lower()}"])
    components = tuple(args.components.split(",")) if args.components else config.data.components
    config.data.components = components
    config.loss.mfl_mode = mode
    config.loss.subsets = losses.component_subsets(components)[:count] if mfl else None
    return config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="config file[:arg]")
    parser.add_argument("--components", default="", help="comma-separated (default: config's)")
    parser.add_argument("--subset-counts", default="2,6,14", help="comma-separated M values")
    parser.add_argument("--modes", default=",".join(losses.MFL_MODES), help="MFL modes")
    parser.add_argument("--steps", type=count(1), default=3, help="timed steps per step and round")
    parser.add_argument("--rounds", type=count(1), default=3, help="alternating timing rounds")
    parser.add_argument("--size", type=count(17), default=128, help="slice size (store: 128)")
    return parser


def _kinds(parser, args, components) -> list[tuple[int, str]]:
    """(subset count, MFL mode) of every MFL step to time, counts ascending; bad flags are
    usage errors."""
    counts = int_list(parser, "--subset-counts", args.subset_counts)
    modes = list(dict.fromkeys(args.modes.split(",")))
    if set(modes) - set(losses.MFL_MODES):
        parser.error(f"--modes: expected names from {losses.MFL_MODES}, got {args.modes!r}")
    available = len(losses.component_subsets(components))
    if not counts or min(counts) < 1 or max(counts) > available:
        parser.error(f"--subset-counts: expected values in 1..{available}, got {counts}")
    return [(m, mode) for m in sorted(counts) for mode in modes]


def _time_rounds(
    plain: _Step, steps: dict, rounds: int, timed_steps: int
) -> tuple[list[float], dict]:
    """`rounds` times, each MFL step timed right after a timing of the plain step: the plain
    step times and, per kind, the MFL / adjacent plain time ratios."""
    plain_times, ratios = [], {kind: [] for kind in steps}
    for _ in range(rounds):
        for kind, step in steps.items():
            plain_times.append(plain.time(timed_steps))
            ratios[kind].append(step.time(timed_steps) / plain_times[-1])
    return plain_times, ratios


def _result_row(kind: tuple[int, str], step: _Step, plain: _Step, ratios: list, chunk: int) -> dict:
    """The JSON row of one (subset count, mode): median time ratio and memory against plain.
    `mfl_chunk` is the setting; `chunked` whether the step ran its subsets in chunks (the train
    step's rule, `losses.probe_chunk`: only when `mfl_chunk` is below the subset count, else all
    in one `vmap`)."""
    chunked = bool(losses.probe_chunk(chunk, kind[0]))
    counted = step.flops and plain.flops and not chunked  # XLA counts a loop's body once
    return {
        "subsets": kind[0],
        "mode": kind[1],
        "mfl_chunk": chunk,
        "chunked": chunked,
        "time_ratio": statistics.median(ratios),
        "memory_ratio": step.peak_bytes / plain.peak_bytes,
        "flops_ratio": step.flops / plain.flops if counted else None,
        "peak_bytes": step.peak_bytes,
        "device_peak_bytes": step.device_peak_bytes,
        "compile_time_s": step.compile_time_s,
    }


def main(argv=None) -> None:
    """Builds and times the plain step and every MFL step, and prints the JSON line."""
    parser = _parser()
    args, overrides = parser.parse_known_args(argv)
    config = _config(args, overrides, mfl=False)
    kinds = _kinds(parser, args, config.data.components)
    mesh = sharding.make_mesh()
    # The steps differ in their loss only: the state's init is compiled once, called per step.
    new_state = train_state.fresh_state_maker(
        RunSpec.from_config(config, image_size=(args.size, args.size)), mesh
    )
    plain = _compiled_step("plain", config, args.size, mesh, new_state)
    steps = {
        (m, mode): _compiled_step(
            f"{m} subsets {mode}",
            _config(args, overrides, True, mode, m),
            args.size,
            mesh,
            new_state,
        )
        for m, mode in kinds
    }
    plain_times, ratios = _time_rounds(plain, steps, args.rounds, args.steps)
    chunk = int(config.loss.mfl_chunk)
    device = jax.devices()[0]
    result = {
        "results": [_result_row(k, steps[k], plain, ratios[k], chunk) for k in kinds],
        "device": device.device_kind,
        "platform": device.platform,
        "plain_step_time_s": statistics.median(plain_times),
        "plain_peak_bytes": plain.peak_bytes,
        "plain_device_peak_bytes": plain.device_peak_bytes,
        "plain_compile_time_s": plain.compile_time_s,
        "config": args.config,
        "overrides": overrides,
        "components": list(config.data.components),
        "batch_size": config.train.batch_size,
        "image_size": args.size,
        "model": f"{result_line.model_description(config)} norm {config.model.norm}",
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "compilation_cache": jax.config.jax_compilation_cache_dir,  # warm: compiles are loads
        **result_line.provenance(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    run_main(main)
