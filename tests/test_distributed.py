"""Where a process group meets: the coordinator of a SLURM step (focalnet_jax/training/
distributed.py): the first host of the step's node list, expanded here; its port the same in every
task of a step, different in each step of a job; two 2-task steps of one job running at once on
the one-node test cluster (tests/slurm_cluster.py) both join their own process group and sum
across it; a coordinator port that is busy or free.
"""

from __future__ import annotations

import errno
import os
import shlex
import socket
import subprocess
import sys

import pytest
from slurm_cluster import OneNodeCluster, missing_binaries

from focalnet_jax.training import distributed


def _task(job: str, step: str, rank: str, **extra) -> dict:
    return {"SLURM_JOB_ID": job, "SLURM_STEP_ID": step, "SLURM_PROCID": rank, **extra}


def test_each_step_of_a_job_gets_its_own_port_and_each_task_the_same():
    port = distributed.slurm_coordinator_port
    # 61440 + (77 + 2531 * step) % 4096, by hand: step 0 is JAX's own pick (61440 + 77).
    assert port(_task("77", "0", "0")) == 61517
    assert port(_task("77", "1", "0")) == 61440 + 2608
    assert port(_task("77", "2", "0")) == 61440 + 5139 - 4096
    assert port(_task("77", "1", "3", SLURM_LOCALID="1")) == port(_task("77", "1", "0"))
    assert port({"SLURM_JOB_ID": "77", "SLURM_STEPID": "1"}) == 61440 + 2608  # older name
    ports = [port(_task("123456", str(step), "0")) for step in range(4096)]
    assert len(set(ports)) == 4096 and min(ports) == 61440 and max(ports) == 65535
    # Jobs at most 32 ids apart (e.g. sharing a node) never meet in their steps 0..88.
    near = {port(_task(str(job), str(step), "0")) for job in range(100, 133) for step in range(89)}
    assert len(near) == 33 * 89
    # The user's port wins; outside a job there is none to pick.
    assert port(_task("77", "1", "0", JAX_COORDINATOR_PORT="12345")) is None
    assert port({"SLURM_STEP_ID": "1"}) is None


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("node001", ["node001"]),
        ("node001,host2", ["node001", "host2"]),
        ("node[01-02]-ib", ["node01-ib", "node02-ib"]),
        ("node[08-10]", ["node08", "node09", "node10"]),  # padding as written
        ("node[8-10]", ["node8", "node9", "node10"]),
        (
            "gpu-a[001-003,007]-ib,gpu-b12",
            ["gpu-a001-ib", "gpu-a002-ib", "gpu-a003-ib", "gpu-a007-ib", "gpu-b12"],
        ),
        ("a[1,3],b[09-10]-x,c", ["a1", "a3", "b09-x", "b10-x", "c"]),
        ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
        ("rack[1-2]-node[01-02]", ["rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02"]),
    ],
)
def test_slurm_node_lists_expand_to_their_hosts_in_order(nodelist, hosts):
    assert distributed.slurm_hostnames(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["node[01-02", "node01]", "a[[1]]", "a[3-1]", "a[]", "a,,b"])
def test_a_node_list_that_cannot_be_read_is_refused_in_one_line(nodelist):
    from focalnet_jax.errors import UserError

    with pytest.raises(UserError, match=r"^SLURM node list '.*': "):
        distributed.slurm_hostnames(nodelist)


def _in_step(monkeypatch, task: dict) -> None:
    """This process as the SLURM task `task` (`_task`), without the user's JAX settings."""
    for name, value in task.items():
        monkeypatch.setenv(name, value)
    for name in ("JAX_COORDINATOR_PORT", "JAX_COORDINATOR_ADDRESS", "JAX_LOCAL_DEVICE_IDS"):
        monkeypatch.delenv(name, raising=False)


def test_a_slurm_steps_coordinator_is_checked_as_the_flags_one(monkeypatch):
    """`JAX_COORDINATOR_PORT=abc` crashed JAX (status 139), `=70000` hung, and a
    `JAX_COORDINATOR_ADDRESS` without a port ended in JAX's IndexError; a port in use on task 0's
    node ended in JAX's traceback. Each is refused naming where it came from."""
    task = _task(
        "77", "0", "0", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2",
        SLURM_STEP_NUM_TASKS="2", SLURM_STEP_TASKS_PER_NODE="2", SLURM_LOCALID="0",
    )  # fmt: skip
    _in_step(monkeypatch, task)
    monkeypatch.setattr(distributed, "_configure_group", lambda: None)
    monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda *a, **k: None)
    for port in ("abc", "70000"):
        monkeypatch.setenv("JAX_COORDINATOR_PORT", port)
        with pytest.raises(ValueError) as refused:
            distributed.initialize()
        assert str(refused.value) == (
            f"the SLURM step's coordinator (JAX_COORDINATOR_PORT={port}) 'localhost:{port}': "
            "expected HOST:PORT, e.g. node01:12345 (process 0's host, and a free port there)"
        )
    monkeypatch.delenv("JAX_COORDINATOR_PORT")
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost")
    with pytest.raises(ValueError, match=r"^JAX_COORDINATOR_ADDRESS 'localhost': expected HOST"):
        distributed.initialize()
    with socket.socket(socket.AF_INET6) as taken:
        taken.bind(("::", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", f"localhost:{port}")
        busy = rf"^JAX_COORDINATOR_ADDRESS 'localhost:{port}': the coordinator \(process 0\) "
        with pytest.raises(ValueError, match=busy + f"cannot listen on port {port} here"):
            distributed.initialize()
        monkeypatch.setenv("SLURM_PROCID", "1")  # another task: it connects, binds nothing
        assert distributed.initialize() == "slurm"


def test_jax_is_given_the_first_host_of_the_step_and_its_port(monkeypatch):
    """JAX 0.10's own parse gave `node01` for `node[01-02]-ib` and `rack1` for
    `rack[1-2]-node[01-02]` (it drops what follows the first bracket): every task then looked for
    the coordinator on a host that is not the first node. The step's port (or the user's
    `JAX_COORDINATOR_PORT`) goes with the host; a `JAX_COORDINATOR_ADDRESS` of the user's is left
    to JAX. Nothing is set in the environment (child processes inherit nothing)."""
    from jax._src import clusters

    task = _task(
        "77", "2", "1", SLURM_STEP_NODELIST="node[01-02]-ib", SLURM_NTASKS="2",
        SLURM_STEP_NUM_TASKS="2", SLURM_STEP_TASKS_PER_NODE="1(x2)", SLURM_LOCALID="0",
    )  # fmt: skip
    _in_step(monkeypatch, task)
    jax_own = clusters.ClusterEnv.auto_detect_unset_distributed_params(
        None, None, None, None, None, 300
    )
    assert jax_own[0] == "node01:61517"  # JAX's own: no `-ib`, and its port, 61440 + 77
    calls = []
    monkeypatch.setattr(distributed, "_configure_group", lambda: None)
    monkeypatch.setattr(
        distributed.jax.distributed, "initialize", lambda *a, **k: calls.append((a, k))
    )
    before = dict(os.environ)
    assert distributed.initialize() == "slurm"
    # The step's port: 61440 + (77 + 2531 * 2) % 4096.
    timeout = distributed.JOIN_TIMEOUT_S + 60  # past the one-line end of `_join`
    expected = {"local_device_ids": [], "initialization_timeout": timeout}
    assert calls == [(("node01-ib:62483", None, None), expected)]
    assert dict(os.environ) == before
    monkeypatch.setenv("SLURM_STEP_NODELIST", "rack[1-2]-node[01-02]")
    jax_own = clusters.ClusterEnv.auto_detect_unset_distributed_params(
        None, None, None, None, None, 300
    )
    assert jax_own[0] == "rack1:61517"
    assert distributed.slurm_coordinator_address() == "rack1-node01:62483"
    monkeypatch.setenv("JAX_COORDINATOR_PORT", "12345")
    assert distributed.slurm_coordinator_address() == "rack1-node01:12345"
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "head:999")
    assert distributed.slurm_coordinator_address() is None
    # What JAX then does with the given address: it keeps it, and reads the ranks.
    detected = clusters.ClusterEnv.auto_detect_unset_distributed_params(
        "node01-ib:62483", None, None, [], None, 300
    )
    assert detected == ("node01-ib:62483", 2, 1, [])


_FLAGS_MEMBER = """
import sys, jax
from focalnet_jax.training import distributed
distributed.initialize(f"localhost:{sys.argv[1]}", 2, int(sys.argv[2]))
print("GPUs", jax.config.values["jax_cuda_visible_devices"], flush=True)
"""


@pytest.mark.parametrize(
    ("slurm", "expected"),
    [
        # An `srun --pty` shell, or one task of a job: JAX's SLURM rule kept GPU SLURM_LOCALID 0.
        ({"SLURM_NTASKS": "2", "SLURM_LOCALID": "0"}, "all"),
        # A step of 2 tasks on 2 nodes (one a node): each drives every GPU it sees, as in the
        # SLURM path (`slurm_local_device_ids`).
        ({"SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
          "SLURM_LOCALID": "0"}, "all"),
        # A step of 2 tasks on one node: one GPU each, JAX's rule (0 here, SLURM_LOCALID).
        ({"SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_TASKS_PER_NODE": "2",
          "SLURM_LOCALID": "0"}, "0"),
        ({"SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "JAX_LOCAL_DEVICE_IDS": "1"}, "1"),
    ],
)  # fmt: skip
def test_processes_started_with_flags_inside_slurm_drive_the_gpus_they_see(slurm, expected):
    """`--coordinator_address ... --process_id $SLURM_PROCID` inside a SLURM allocation: JAX
    applied its SLURM rule to the flags too, so a process alone on its node drove only GPU
    `SLURM_LOCALID` of it (read here as JAX's `jax_cuda_visible_devices`)."""
    from test_train_helpers import cpu_devices_env, free_port

    port = str(free_port())
    env = {**cpu_devices_env(1), "SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "localhost", **slurm}
    if "JAX_LOCAL_DEVICE_IDS" not in slurm:
        env.pop("JAX_LOCAL_DEVICE_IDS", None)
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _FLAGS_MEMBER, port, str(rank)],
            env={**env, "SLURM_PROCID": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [process.communicate(timeout=120)[0] for process in processes]
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0 and f"GPUs {expected}\n" in output, output


# Each task: join the step's process group, sum the process ranks + 1 across it, then wait (at
# most 240 s) until the other step's tasks got that far, so that both coordinators were up at once.
TASK = """
import os, sys, time
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from focalnet_jax.training import distributed
how = distributed.initialize()
mesh = jax.make_mesh((jax.device_count(),), ("p",))
local = np.full((jax.local_device_count(),), jax.process_index() + 1.0, np.float32)
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("p")), local)
total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
step, rank = os.environ["SLURM_STEP_ID"], os.environ["SLURM_PROCID"]
folder = sys.argv[1]
open(os.path.join(folder, f"ready-{step}-{rank}"), "w").close()
deadline = time.time() + 240
while len([f for f in os.listdir(folder) if f.startswith("ready-")]) < 4:
    assert time.time() < deadline, "the other step never joined"
    time.sleep(0.1)
result = f"{how} {jax.process_index()} {jax.process_count()} {float(total)}"
open(os.path.join(folder, f"result-{step}-{rank}"), "w").write(result)
"""


@pytest.mark.slow
def test_two_steps_of_one_job_run_at_once_on_one_node(tmp_path):
    if missing_binaries() or os.geteuid() != 0:
        reason = "needs the SLURM binaries and root (tests/slurm_cluster.py)"
        if os.environ.get("FOCALNET_REQUIRE_SLURM", "") not in ("", "0"):
            pytest.fail(reason + " (FOCALNET_REQUIRE_SLURM=1)")
        pytest.skip(reason)
    cluster = OneNodeCluster(tmp_path / "cluster")
    env = {**os.environ, **cluster.env, "PYTHONPATH": os.getcwd(), "JAX_PLATFORMS": "cpu"}
    env.pop("JAX_COORDINATOR_PORT", None)
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    (tmp_path / "task.py").write_text(TASK)
    task = f"{shlex.quote(sys.executable)} {tmp_path / 'task.py'} {tmp_path}"
    # Two 2-task steps of one 2-CPU job at once (--overlap: they share its CPUs).
    step = f"srun --overlap -N1 -n2 timeout 300 {task}"
    script = tmp_path / "job.sh"
    script.write_text(f"#!/bin/bash\n{step} &\n{step} &\nwait %1 && wait %2\n")
    batch = ["sbatch", "-N1", "-n2", "--wait", f"--output={tmp_path}/job.out", str(script)]
    try:
        cluster.start()
        done = subprocess.run(batch, env=env, capture_output=True, text=True, timeout=420)
    finally:
        cluster.stop()
    log = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert done.returncode == 0, done.stderr[-2000:] + log[-3000:]
    results = {f.name: f.read_text() for f in tmp_path.glob("result-*")}
    steps = sorted({name.split("-")[1] for name in results})
    assert len(steps) == 2, results
    # Each step is its own group of 2 processes (SLURM rank = JAX rank): 1 + 2 = 3 in each.
    assert results == {f"result-{s}-{r}": f"slurm {r} 2 3.0" for s in steps for r in (0, 1)}


def test_a_port_held_on_ipv6_alone_is_free_for_the_coordinator():
    """gRPC binds `[::]`, else `0.0.0.0`: a port another service holds on IPv6 alone leaves the
    coordinator IPv4, and JAX's group starts; the check refused it."""
    with socket.socket(socket.AF_INET6) as v6_only:
        v6_only.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        v6_only.bind(("::1", 0))
        v6_only.listen()
        distributed.check_coordinator_port_free(f"127.0.0.1:{v6_only.getsockname()[1]}")


def test_a_busy_port_on_a_host_without_ipv6_is_named_busy(monkeypatch):
    """The refusal gave the IPv6 socket's 'Address family not supported', not the port's own
    reason."""
    real_socket = socket.socket

    def no_ipv6(family=socket.AF_INET, *args, **kwargs):
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, os.strerror(errno.EAFNOSUPPORT))
        return real_socket(family, *args, **kwargs)

    with real_socket(socket.AF_INET) as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setattr(distributed.socket, "socket", no_ipv6)
        with pytest.raises(ValueError, match=r"port \d+ here \(Address already in use\)"):
            distributed.check_coordinator_port_free(f"host:{port}")
