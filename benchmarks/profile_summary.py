"""Where a compiled step spends its time: `jax.profiler` traces of a few calls, reduced to the
ops that take longest. Imported by the scripts beside it (`train_step.py --profile-steps N`).

The trace's XSpace is read with `jax.profiler.ProfileData`. Op events come from the accelerator's
planes (`/device:GPU:0`, ...: the `XLA Ops` line where the profiler derives one, else the kernel
events of its `Stream` lines); on the CPU backend, from the XLA worker threads of `/host:CPU`
(their op times add up over threads, so they can exceed the wall time). Only leaf events count
(an event with another one starting inside it on the same line is a container, e.g. a while
loop or the thunk executor), so no time is counted twice on a line. Kernel events are grouped by
the HLO op that launched them (`op_name`).
"""

from __future__ import annotations

import argparse
import collections
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jax

# An op's `hlo_category` stat (where the profiler gives one), HLO name or kernel name -> a coarse
# kind; cuDNN convolutions are custom calls whose kernels say fprop/dgrad/wgrad.
_KINDS = (
    ("convolution", re.compile(r"conv(?!ert)|cudnn|fprop|dgrad|wgrad", re.I)),
    ("matmul", re.compile(r"dot|gemm|cublas|matmul", re.I)),
    ("collective", re.compile(r"all-reduce|all-gather|reduce-scatter|collective|nccl", re.I)),
    ("copy/transpose", re.compile(r"copy|transpose|memcpy|memset", re.I)),
    ("reduction", re.compile(r"reduce", re.I)),
    ("fusion", re.compile(r"fusion", re.I)),
)


def op_kind(category: str | None, *names: str) -> str:
    """A coarse kind of an op: convolution, matmul, collective, copy/transpose, reduction, fusion
    (elementwise and other fused ops) or other: what its profiler `category` says where given,
    else the first kind that any of `names` (HLO name, kernel name) says."""
    for candidates in ([category] if category else [], names):
        for kind, pattern in _KINDS:
            if any(pattern.search(name) for name in candidates):
                return kind
    return "other"


_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"([a-z][a-z0-9\-]*)\(")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
# Opcodes (or custom-call targets: cuDNN convolutions, cuBLAS matmuls) -> kind. A fusion takes the
# first of the first four kinds, in this order, of an op it holds, else it is `fusion`
# (elementwise, with any copies and transposes fused into it).
_OPCODE_KINDS = (
    ("convolution", re.compile(r"^convolution$|^__cudnn\$conv")),
    ("matmul", re.compile(r"^dot$|^__cublas|gemm")),
    ("collective", re.compile(r"^(all-reduce|all-gather|reduce-scatter|all-to-all)")),
    ("reduction", re.compile(r"^(reduce|reduce-window|select-and-scatter)$")),
    ("copy/transpose", re.compile(r"^(copy|transpose)$")),
)
_FUSED_KINDS = ("convolution", "matmul", "collective", "reduction")


def hlo_kinds(hlo_text: str) -> dict[str, str]:
    """{instruction name: kind} of a compiled module's text (`Compiled.as_text()`): a fusion is a
    convolution when it holds one (a CPU `ynn_fusion` or a GPU fusion around a matmul included),
    and so on in the order of `_OPCODE_KINDS`; names the profiler's op events carry."""
    computations: dict[str, list[tuple[str, str, str]]] = {}
    body = None
    for line in hlo_text.splitlines():
        if (header := _HEADER.match(line)) and " = " not in line:
            body = computations.setdefault(header.group(1), [])
        elif line.strip() == "}":
            body = None
        elif body is not None and (instruction := _INSTRUCTION.match(line)):
            rest = instruction.group(2)
            opcode = _OPCODE.search(rest)
            target = _TARGET.search(rest)
            name = target.group(1) if target else (opcode.group(1) if opcode else "")
            called = _CALLS.search(rest)
            body.append((instruction.group(1), name, called.group(1) if called else ""))

    def own_kind(opcode: str) -> str | None:
        return next((kind for kind, pattern in _OPCODE_KINDS if pattern.search(opcode)), None)

    def kinds_inside(computation: str, seen: frozenset = frozenset()) -> set[str]:
        found = set()
        for _, opcode, called in computations.get(computation, []):
            found.add(own_kind(opcode))
            if called and called not in seen:
                found |= kinds_inside(called, seen | {computation})
        return found

    kinds = {}
    for instructions in computations.values():
        for name, opcode, called in instructions:
            if opcode == "fusion":
                inside = kinds_inside(called)
                kinds[name] = next((k for k in _FUSED_KINDS if k in inside), "fusion")
            else:
                kinds[name] = own_kind(opcode) or "other"
    return kinds


_HLO_OP = re.compile(r"hlo_op=([^,#]+)")


def op_name(event_name: str, stats: dict) -> str:
    """The HLO op an event ran: its `hlo_op` stat, else the innermost `#hlo_op=<name>` of its
    `annotation` stat (a GPU kernel launched for the op), else the event's own name."""
    if stats.get("hlo_op"):
        return str(stats["hlo_op"])
    ops = _HLO_OP.findall(str(stats.get("annotation", "")))
    return ops[-1] if ops else event_name


def _op_lines(space) -> tuple[str, int, list]:
    """(`device` | `host`, the number of device planes with op events (1 for the host), the
    lines whose events are ops) of a `ProfileData`."""
    lines, devices = [], 0
    for plane in (p for p in space.planes if p.name.startswith("/device:")):
        plane_lines = list(plane.lines)
        ops = [line for line in plane_lines if line.name == "XLA Ops"]
        ops = ops or [line for line in plane_lines if line.name.startswith("Stream")]
        if any(next(iter(line.events), None) is not None for line in ops):
            lines, devices = lines + ops, devices + 1
    if devices:
        return "device", devices, lines
    host = space.find_plane_with_name("/host:CPU")
    lines = [] if host is None else [ln for ln in host.lines if ln.name.startswith("tf_XLA")]
    return "host", 1, lines


# Runtime bookkeeping, not ops: the CPU thunk executor, its thread pool and the zero-length
# `end: <op>` markers it nests in each op event.
_NOT_OPS = re.compile(r"^(end: |ThunkExecutor::|SlinkyThreadPool::|ThreadpoolListener::)")


def _leaf_events(line) -> list:
    """Op events of `line` (of some duration) that contain no other one (sorted by start)."""
    ops = [e for e in line.events if e.duration_ns > 0 and not _NOT_OPS.match(e.name)]
    events = sorted(ops, key=lambda e: (e.start_ns, -e.duration_ns))
    return [
        e
        for i, e in enumerate(events)
        if not (i + 1 < len(events) and events[i + 1].start_ns < e.start_ns + e.duration_ns)
    ]


def summarize(space, calls: int, top: int = 15, hlo_op_kinds: dict[str, str] | None = None) -> dict:
    """Per call of the traced function and per device: each op's time (ms), share and count, the
    `top` ops, and the time per coarse kind. `space`: a `jax.profiler.ProfileData`;
    `hlo_op_kinds`: {op: kind} from the compiled module (`hlo_kinds`), else (and for ops it does
    not name) `op_kind` guesses from the names. With several device planes (one per GPU), times
    are their mean (`devices` says how many)."""
    hlo_op_kinds = hlo_op_kinds or {}
    source, devices, lines = _op_lines(space)
    time_ns, count, kinds = collections.Counter(), collections.Counter(), collections.Counter()
    kind_of = {}
    for line in lines:
        for event in _leaf_events(line):
            stats = dict(event.stats)
            name = op_name(event.name, stats)
            kind = kind_of.setdefault(
                name,
                hlo_op_kinds.get(name) or op_kind(stats.get("hlo_category"), name, event.name),
            )
            time_ns[name] += event.duration_ns
            count[name] += 1
            kinds[kind] += event.duration_ns
    total = sum(time_ns.values())
    if not total:
        raise RuntimeError(f"the trace holds no op events ({source} planes)")
    per_call = lambda ns: ns / calls / devices / 1e6
    return {
        "source": source,
        "devices": devices,
        "calls": calls,
        "op_ms_per_call": per_call(total),
        "ops": len(time_ns),
        "by_kind": {
            kind: {"ms_per_call": per_call(ns), "share": ns / total}
            for kind, ns in kinds.most_common()
        },
        "top_ops": [
            {
                "op": name,
                "kind": kind_of[name],
                "ms_per_call": per_call(ns),
                "share": ns / total,
                "count_per_call": count[name] / calls / devices,
            }
            for name, ns in time_ns.most_common(top)
        ],
    }


def profile(
    call: Callable[[], object], calls: int, top: int = 15, hlo_text: str | None = None
) -> dict:
    """Traces `calls` calls of `call` (the last one's result blocked on) and summarises them
    (`summarize`, with the op kinds of `hlo_text`, the compiled module's text, where given), with
    the wall time per call while tracing (`wall_ms_per_call`)."""
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            start = time.perf_counter()
            out = None
            for _ in range(calls):
                out = call()
            jax.block_until_ready(out)
            wall = time.perf_counter() - start
        (path,) = Path(trace_dir).rglob("*.xplane.pb")
        space = jax.profiler.ProfileData.from_file(str(path))
        summary = summarize(space, calls, top, hlo_kinds(hlo_text) if hlo_text else None)
    return {"wall_ms_per_call": wall / calls * 1e3} | summary


def profile_or_error(call: Callable[[], object], calls: int, **options) -> dict:
    """`profile`, or `{"error": "<type>: <message>"}` where tracing fails (e.g. a GPU without
    CUPTI): a benchmark's timings stand without their profile."""
    try:
        return profile(call, calls, **options)
    except Exception as error:
        return {"error": f"{type(error).__name__}: {error}"}


def add_calls_flag(parser: argparse.ArgumentParser, flag: str, help: str) -> None:
    """Declares `flag`: how many calls to profile (default 0: none); a negative number is a usage
    error."""

    def calls(text: str) -> int:
        value = int(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"expected 0 or more, got {value}")
        return value

    parser.add_argument(flag, type=calls, default=0, help=help)
