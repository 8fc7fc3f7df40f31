"""Multi-process start-up: `jax.distributed.initialize` from flags or a SLURM allocation.

Order: explicit flags (`--coordinator_address HOST:PORT --num_processes N --process_id I`; their
devices as below inside a SLURM step, else every device the process sees), then an
`srun` step of more than one task (JAX reads the ranks from SLURM's environment; the coordinator is
given to it, `slurm_coordinator_address`), else a single process (also a job's batch script or
`salloc` shell, outside any step). Must run before anything touches a JAX device.

Devices of a SLURM task: JAX's own rule gives each task the one GPU numbered `SLURM_LOCALID`
among those it sees (one task per GPU, `--ntasks-per-node=<GPUs>`, every task seeing the node's
GPUs); a task alone on its node (`--ntasks-per-node=1`, launch/slurm_multinode.sh), or one that
sees fewer GPUs than its node has tasks (SLURM bound GPUs to tasks: `--gpus-per-task`,
`--gpu-bind`), drives every GPU it sees (`slurm_local_device_ids`).

Coordinator port of a SLURM step: JAX's own pick, `61440 + SLURM_JOB_ID % 4096`, is the same for
every step of a job, so two multi-task `srun` steps of one allocation running at once on the same
first node would meet at one coordinator. `slurm_coordinator_port` adds the step id; a
`JAX_COORDINATOR_PORT` (or `JAX_COORDINATOR_ADDRESS`) of the user's wins.

Coordinator host of a SLURM step: the first host of `SLURM_STEP_NODELIST`, expanded here
(`slurm_hostnames`). JAX 0.10's own parse keeps only the text before the first bracket and the
first number in it, so it drops what follows the bracket: `node[01-02]-ib` gave `node01`,
`rack[1-2]-node[01-02]` gave `rack1`.

Failures of a process group (`leave_group_on_failure`, `together`): `group_failures`.

SIGTERM: JAX's preemption service (on by default) would take SIGTERM in every process that joins
a group and never end it (a second SIGTERM too); it is turned off, so SIGTERM ends a process of a
group at once, as it does a single one, but in the training loop, which stops at a step boundary
with a checkpoint (`graceful_stop`).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import re
import socket
import sys
import threading
from pathlib import Path

import jax

from focalnet_jax.data.atomic_files import check_output_folder
from focalnet_jax.errors import UserError
from focalnet_jax.training.group_failures import command_name, watch_for_group_failures

# Seconds a process waits for every process of its group to join (`_join`); JAX's own limit, past
# which it aborts the process with a C++ stack trace, is set a minute later.
JOIN_TIMEOUT_S = 300


def slurm_num_tasks(environ=None) -> int:
    """Number of tasks of the enclosing SLURM job step, `srun`'s `SLURM_STEP_NUM_TASKS` (1
    outside SLURM, and outside a step: a batch script or an `salloc` shell is one process,
    whatever `--ntasks` the job holds for its `srun` steps)."""
    environ = os.environ if environ is None else environ
    if "SLURM_JOB_ID" not in environ:
        return 1
    return int(environ.get("SLURM_STEP_NUM_TASKS", "1"))


def _tasks_per_node(text: str) -> list[int]:
    """SLURM's `2(x3),1` -> [2, 2, 2, 1]: tasks on each node of the step, in node order."""
    counts = []
    for item in filter(None, text.split(",")):
        count, _, repeat = item.partition("(x")
        counts += [int(count)] * int(repeat.rstrip(")") or 1)
    return counts


def _visible_gpus(environ) -> int | None:
    """GPUs the task may see (`CUDA_VISIBLE_DEVICES`, AMD: `ROCR_VISIBLE_DEVICES`; None: unset)."""
    for name in ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"):
        if (value := environ.get(name)) is not None:
            return len([d for d in value.split(",") if d.strip() and d.strip() != "-1"])
    return None


def slurm_local_device_ids(environ=None) -> list[int] | None:
    """`local_device_ids` for `jax.distributed.initialize` in a SLURM task: [] (no restriction:
    every device the task sees) when the task is alone on its node, or SLURM gave each task its
    own GPUs (`--gpus-per-task`: `SLURM_GPUS_PER_TASK` set; or the task sees fewer GPUs than its
    node has tasks, or than the job has on the node, `SLURM_GPUS_ON_NODE`, e.g. `--gpu-bind`:
    JAX's rule would ask task k for a GPU k it cannot see, or give a task of 4 GPUs one), else
    None (JAX's rule: the device numbered `SLURM_LOCALID`, one per task). None too when
    `JAX_LOCAL_DEVICE_IDS` is set: JAX then takes the user's choice. A `UserError` when JAX's
    rule would leave GPUs idle: several tasks on the node, none given its own GPUs, each seeing
    more GPUs than the node has tasks (`--ntasks-per-node=2 --gpus-per-node=8`: 2 of 8 GPUs
    would train)."""
    environ = os.environ if environ is None else environ
    if environ.get("JAX_LOCAL_DEVICE_IDS"):
        return None
    text = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE", "")
    counts = _tasks_per_node(text)
    node = int(environ.get("SLURM_NODEID", 0))
    here = counts[node] if node < len(counts) else max(counts, default=0)
    visible = _visible_gpus(environ)
    on_node = int(environ.get("SLURM_GPUS_ON_NODE") or 0)
    bound = bool(environ.get("SLURM_GPUS_PER_TASK")) or (
        visible is not None and 0 < visible < max(here, on_node)
    )
    if here > 1 and not bound and visible is not None and visible > here:
        raise UserError(
            f"SLURM step: {here} tasks on node {node} see the same {visible} GPUs and each drives "
            f"only the GPU numbered by its SLURM_LOCALID, so {visible - here} would sit idle; give "
            f"--ntasks-per-node={visible} (one task per GPU) or 1 (one task drives them all), "
            "--gpus-per-task, or JAX_LOCAL_DEVICE_IDS"
        )
    return [] if here == 1 or bound else None


# JAX's range for SLURM: IANA's dynamic ports, above Linux's default range for outgoing connections
# (32768-60999), so that the kernel does not hand the port to a client first.
_PORT_BASE, _PORT_COUNT = 61440, 4096
# Odd, so a job's steps 0..4095 all differ; near 4096 / golden ratio, so a step's port lands far
# from the ports of neighbouring job ids (jobs at most 32 ids apart meet only when their step ids
# differ by 89 or more).
_STEP_STRIDE = 2531


def slurm_coordinator_port(environ=None) -> int | None:
    """The coordinator port of a SLURM step: `61440 + (SLURM_JOB_ID + 2531 * SLURM_STEP_ID) % 4096`,
    the same in every task of the step, different in each step of a job (step 0: JAX's own pick).
    None when the user set `JAX_COORDINATOR_PORT` (the port then) or outside a job."""
    environ = os.environ if environ is None else environ
    if environ.get("JAX_COORDINATOR_PORT") or "SLURM_JOB_ID" not in environ:
        return None
    step = int(environ.get("SLURM_STEP_ID", environ.get("SLURM_STEPID", "0")))
    job = int(environ["SLURM_JOB_ID"])
    return _PORT_BASE + (job + _STEP_STRIDE * step) % _PORT_COUNT


# One item of a host list's brackets: `7`, `001-003`.
_HOST_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


def _bracket_values(text: str, nodelist: str) -> list[str]:
    """`001-003,7` -> ['001', '002', '003', '7']: each number as wide as the range's start
    (zero padding as written: `[08-10]` -> 08, 09, 10; `[8-10]` -> 8, 9, 10)."""
    values = []
    for item in text.split(","):
        match = _HOST_RANGE.fullmatch(item)
        if not match or int(match[2] or match[1]) < int(match[1]):
            raise UserError(f"SLURM node list {nodelist!r}: cannot read [{text}]")
        width = len(match[1])
        values += [f"{n:0{width}d}" for n in range(int(match[1]), int(match[2] or match[1]) + 1)]
    return values


def slurm_hostnames(nodelist: str) -> list[str]:
    """SLURM's compact node list expanded in SLURM's order (`scontrol show hostnames`):
    `gpu-a[001-003,007]-ib,gpu-b12` -> gpu-a001-ib, gpu-a002-ib, gpu-a003-ib, gpu-a007-ib, gpu-b12.
    A name of several brackets (`rack[1-2]-node[01-02]`) gives every combination, the last
    bracket fastest. A `UserError` for text that is no node list (unbalanced bracket, `[3-1]`)."""
    names, depth, start = [], 0, 0
    for index, char in enumerate(nodelist + ","):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise UserError(f"SLURM node list {nodelist!r}: unbalanced brackets")
        if char == "," and depth == 0:
            names.append(nodelist[start:index])
            start = index + 1
    if depth or not all(names):
        raise UserError(f"SLURM node list {nodelist!r}: unbalanced brackets or an empty name")
    hosts = []
    for name in names:
        parts = re.split(r"\[([^\]]*)\]", name)  # literal, bracket, literal, ..., literal
        choices = [[p] if i % 2 == 0 else _bracket_values(p, nodelist) for i, p in enumerate(parts)]
        hosts += ["".join(combination) for combination in itertools.product(*choices)]
    return hosts


def slurm_coordinator_address(environ=None) -> str | None:
    """`HOST:PORT` of process 0 of a SLURM step: the first host of `SLURM_STEP_NODELIST` (where
    JAX puts it), at the user's `JAX_COORDINATOR_PORT`, else `slurm_coordinator_port`. None when
    the user set `JAX_COORDINATOR_ADDRESS` (JAX reads it), and outside a step."""
    environ = os.environ if environ is None else environ
    nodelist = environ.get("SLURM_STEP_NODELIST")
    port = environ.get("JAX_COORDINATOR_PORT") or slurm_coordinator_port(environ)
    if environ.get("JAX_COORDINATOR_ADDRESS") or not nodelist or port is None:
        return None
    return f"{slurm_hostnames(nodelist)[0]}:{port}"


def _configure_group() -> None:
    """JAX settings for a process group, before `jax.distributed.initialize`."""
    # CPU collectives across processes need gloo; GPU/TPU backends ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # Its SIGTERM handler would keep a stopped process running (module docstring).
    jax.config.update("jax_enable_preemption_service", False)


def _flags_device_ids(environ=None) -> list[int] | None:
    """`local_device_ids` of a process started with flags. JAX applies its SLURM rule to them too
    (the one GPU numbered `SLURM_LOCALID`, also in a step of one task or an `srun --pty` shell):
    in a step of several tasks, the SLURM path's choice (`slurm_local_device_ids`); elsewhere []
    (every device the process sees), or None where `JAX_LOCAL_DEVICE_IDS` gives them."""
    environ = os.environ if environ is None else environ
    if slurm_num_tasks(environ) > 1:
        return slurm_local_device_ids(environ)
    return None if environ.get("JAX_LOCAL_DEVICE_IDS") else []


def check_coordinator_address(
    address: str, what: str = "--coordinator_address", resolve: bool = False
) -> None:
    """Raises `ValueError` (naming `what` gave it) unless `address` is HOST:PORT (HOST anything
    before the last ':', e.g. a host name, an IPv4 address or an [IPv6] one; PORT 1..65535), as
    process 0 binds it and the others connect to it (JAX ended in an IndexError traceback on an
    address without a port, and a crash on a port it cannot parse); with `resolve`, unless HOST
    resolves here (JAX waited 5 minutes for a host that is not found)."""
    host, colon, port = address.rpartition(":")
    if not (colon and host and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(
            f"{what} {address!r}: expected HOST:PORT, e.g. node01:12345 (process 0's host, and a "
            "free port there)"
        )
    if resolve:
        try:
            socket.getaddrinfo(host.removeprefix("[").removesuffix("]"), int(port))
        except (socket.gaierror, UnicodeError) as error:
            reason = getattr(error, "strerror", None) or str(error)
            raise ValueError(f"{what} {address!r}: host {host!r} not found ({reason})") from None


def check_coordinator_port_free(address: str, what: str = "--coordinator_address") -> None:
    """Process 0: raises `ValueError` unless the port of `address` is free here, where JAX's
    coordinator binds it on every interface (`[::]:PORT`): a port in use ended in JAX's
    traceback, and a JAX left half-started crashed as the process ended."""
    port, errors = int(address.rpartition(":")[2]), []
    # As gRPC binds `[::]`: IPv6 (with IPv4 where dual-stack), else IPv4 alone.
    for family, everywhere in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                # As gRPC binds it: a port of a connection in TIME_WAIT is free.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((everywhere, port))
            return
        except OSError as error:  # also: no IPv6 on this host
            errors.append(error)
    # The port's own reason, not that the host has no IPv6.
    why = next((e for e in errors if e.errno != errno.EAFNOSUPPORT), errors[0])
    raise ValueError(
        f"{what} {address!r}: the coordinator (process 0) cannot listen on port {port} here "
        f"({why.strerror}); choose another port"
    )


def _check_slurm_coordinator(address: str | None, environ=None) -> None:
    """The coordinator of a SLURM step checked as the flags' is: `address` (from the node list
    and `JAX_COORDINATOR_PORT`, else the step's port), else the user's `JAX_COORDINATOR_ADDRESS`
    (host resolved); its port free here in task 0. Nothing where JAX finds it alone."""
    environ = os.environ if environ is None else environ
    given = environ.get("JAX_COORDINATOR_ADDRESS")
    if address is None and not given:
        return
    if address is None:
        what = "JAX_COORDINATOR_ADDRESS"
        check_coordinator_address(given, what, resolve=True)
    else:
        port = environ.get("JAX_COORDINATOR_PORT")
        what = "the SLURM step's coordinator" + (f" (JAX_COORDINATOR_PORT={port})" if port else "")
        check_coordinator_address(address, what)
    if environ.get("SLURM_PROCID") == "0":
        check_coordinator_port_free(address or given, what)


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> str:
    """Join the process group when there is one; returns how ('flags', 'slurm' or 'single')."""
    given = [coordinator_address is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise ValueError(
            "--coordinator_address, --num_processes and --process_id go together; got "
            f"coordinator_address={coordinator_address!r}, num_processes={num_processes!r}, "
            f"process_id={process_id!r}"
        )
    if all(given):
        if not 0 <= process_id < num_processes:
            raise ValueError(
                f"--process_id={process_id} not in [0, --num_processes={num_processes})"
            )
        if num_processes == 1:
            return "single"
        check_coordinator_address(coordinator_address, resolve=True)
        if process_id == 0:
            check_coordinator_port_free(coordinator_address)
        _configure_group()
        _join(coordinator_address, num_processes, process_id, _flags_device_ids())
        watch_for_group_failures()
        _check_process_count(num_processes)
        return "flags"
    if slurm_num_tasks() > 1:
        device_ids = slurm_local_device_ids()  # refuses a layout that leaves GPUs idle
        address = slurm_coordinator_address()
        _check_slurm_coordinator(address)
        _configure_group()
        _join(address, None, None, device_ids)
        watch_for_group_failures()
        return "slurm"
    return "single"


def _join(address: str, num_processes, process_id, device_ids) -> None:
    """`jax.distributed.initialize` (`num_processes`, `process_id`: None for SLURM's), ended in one
    line and status 1 when the group is not whole within `JOIN_TIMEOUT_S`: a process not started
    (or ended), or given another address or process count. JAX waited 5 minutes without a word,
    then aborted every process with a C++ stack trace naming neither the address nor a flag."""
    count = num_processes or slurm_num_tasks()
    rank = process_id if process_id is not None else os.environ.get("SLURM_PROCID", "?")

    def not_joined() -> None:
        print(
            f"{command_name()}: error: process {rank} could not join its group of {count} "
            f"processes at {address} within {JOIN_TIMEOUT_S} s: a process not started (or "
            "ended), or started with another coordinator address (host or port) or process "
            "count; start every process with the same ones",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)  # the group's client is half made: nothing may call it (JAX would abort)

    timer = threading.Timer(JOIN_TIMEOUT_S, not_joined)
    timer.daemon = True
    timer.start()
    try:
        jax.distributed.initialize(
            address,
            num_processes,
            process_id,
            local_device_ids=device_ids,
            initialization_timeout=JOIN_TIMEOUT_S + 60,
        )
    finally:
        timer.cancel()


def _check_process_count(given: int) -> None:
    """A `UserError` in a process given another `--num_processes` than process 0: JAX takes
    process 0's count, and the flag was ignored without a word."""
    if (count := jax.process_count()) != given:
        raise UserError(
            f"--num_processes={given}, but process 0 started a group of {count} processes: "
            "start every process with the same --num_processes"
        )


def describe() -> str:
    """This process, its devices and the compilation cache in use, for the log."""
    cache = jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir
    return (
        f"process {jax.process_index()}/{jax.process_count()}, {jax.local_device_count()} local / "
        f"{jax.device_count()} global devices ({jax.devices()[0].device_kind}), "
        f"compilation cache: {cache or 'none'}"
    )


@contextlib.contextmanager
def compilation_cache(path: Path | None):
    """JAX's persistent compilation cache in `path` for the block (None: JAX's own setting,
    `$JAX_COMPILATION_CACHE_DIR`); the previous setting is restored after it. A `path` that is,
    or lies below, a file is a `UserError` (JAX would cache nothing there without a word)."""
    from jax.experimental.compilation_cache import compilation_cache as cache

    check_output_folder(path, "--compilation_cache")
    previous = jax.config.jax_compilation_cache_dir
    if path is None or str(path) == previous:
        yield
        return
    cache.reset_cache()  # the cache reads its folder once, when first used
    cache.set_cache_dir(str(path))
    try:
        yield
    finally:
        cache.reset_cache()
        cache.set_cache_dir(previous)
