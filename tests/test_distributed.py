"""The coordinator of a SLURM step (focalnet_jax/training/distributed.py): the first host of the
step's node list, expanded here; its port the same in every task of a step, different in each step
of a job; two 2-task steps of one job running at once on the one-node test cluster
(tests/slurm_cluster.py) both join their own process group and sum across it.
"""

from __future__ import annotations

import errno
import os
import shlex
import signal
import socket
import subprocess
import sys

import pytest
from slurm_cluster import OneNodeCluster, missing_binaries

from focalnet_jax.training import distributed, group_failures


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


# A process of a group of 2 or more: `failing` ("0", "1" or "both") names who fails (process 0
# with a user error, process 1 with a bug) after a first collective; the others go on to their
# next one, as training does. A failing process waits 2 s for the others to fail too (a lone
# failure waits all of it), or 60 s where both fail (they meet as soon as both have failed; 2 s
# would fail the test when one of them is that much later).
_GROUP_MEMBER = """
import atexit, sys
from jax.experimental import multihost_utils
from focalnet_jax.errors import UserError, one_line_user_errors
from focalnet_jax.training import distributed, group_failures
port, rank, failing, count = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
distributed.initialize(f"localhost:{port}", count, rank)
atexit.register(lambda: print("left as usual", flush=True))
multihost_utils.sync_global_devices("the start")  # as the checkpoint manager's opening barrier
wait_s = 60 if failing == "both" else 2
with group_failures.leave_group_on_failure("focalnet train", wait_s), one_line_user_errors(
    "focalnet train"
):
    if failing in ("both", str(rank)):
        raise (UserError if rank == 0 else RuntimeError)(f"process {rank} cannot go on")
    if failing == f"{rank} interrupted":
        raise KeyboardInterrupt  # Ctrl-C in this process's terminal
    multihost_utils.sync_global_devices("the next step")
"""


def _run_group(failing: str, member: str = _GROUP_MEMBER, count: int = 2) -> list[tuple[int, str]]:
    """(exit status, output) of each process of a `count`-process group running `member` (its
    arguments: port, rank, `failing`, `count`); at 200 s they
    are killed (JAX's shutdown barrier, which a failing process is not to wait at, lasts 300 s)."""
    from test_train_helpers import cpu_devices_env, free_port

    port, env = str(free_port()), cpu_devices_env(1)
    command = [sys.executable, "-c", member, port]
    processes = [
        subprocess.Popen(
            [*command, str(rank), failing, str(count)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for rank in range(count)
    ]
    results = []
    for process in processes:
        try:
            output, _ = process.communicate(timeout=200)
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            output, _ = process.communicate()
        results.append((process.returncode, output.decode(errors="replace")))
    return results


@pytest.mark.slow
@pytest.mark.parametrize("failing", ["0", "1"])
def test_a_process_that_fails_alone_ends_the_group_at_once(failing):
    """Process 0 alone refused a start (a write only it does), or process 1 alone hit a bug,
    while the other waited for it in a collective: the failing one waited 5 minutes at JAX's
    shutdown barrier and the other in its collective (both killed at 200 s here). Now it leaves
    after `wait_s` (2 s) with its status and message, and the other, told by the group's store,
    names it and its error in one line and ends with status 1: where process 1 is the other, it
    ended with JAX's abort (status -6, "the JAX distributed service detected fatal errors" and a
    C++ stack trace), as process 0, which holds the group's store, left first; where process 0 is
    the other, with its collective's traceback (Gloo's "Connection closed by peer")."""
    results = _run_group(failing)  # a process still there at 200 s is killed: status -9
    status, output = results[int(failing)]
    if failing == "0":
        assert status == 2 and "focalnet train: error: process 0 cannot go on" in output, output
        reason = "process 0 cannot go on"
    else:
        assert status == 1 and "RuntimeError: process 1 cannot go on" in output, output
        reason = "RuntimeError: process 1 cannot go on"
    assert "left as usual" not in output
    other_status, other_output = results[1 - int(failing)]
    lines = [line for line in other_output.splitlines() if "focalnet train" in line]
    assert lines == [
        f"focalnet train: error: process {failing} failed ({reason}); this process stopped with it"
    ], other_output
    assert other_status == 1 and "Traceback" not in other_output, other_output
    assert "fatal" not in other_output, other_output


@pytest.mark.slow
def test_a_process_interrupted_alone_is_named_with_its_interruption():
    """Ctrl-C in process 0's terminal alone: the other names what ended it, not its exit status
    ("process 0 failed (130)")."""
    (status, output), (other_status, other_output) = _run_group("0 interrupted")
    assert status == 130 and "focalnet train: interrupted by Ctrl-C" in output, output
    lines = [line for line in other_output.splitlines() if "focalnet train" in line]
    expected = "process 0 failed (interrupted by Ctrl-C); this process stopped with it"
    assert lines == [f"focalnet train: error: {expected}"], other_output
    assert other_status == 1 and "fatal" not in other_output, other_output


_SIGNALLED_MEMBER = """
import os, signal, sys
from jax.experimental import multihost_utils
from focalnet_jax.errors import one_line_user_errors
from focalnet_jax.training import distributed, group_failures
port, rank, signalled, count = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
distributed.initialize(f"localhost:{port}", count, rank)
with group_failures.leave_group_on_failure("focalnet train", 2), one_line_user_errors(
    "focalnet train"
):
    multihost_utils.sync_global_devices("the start")
    if str(rank) == signalled:  # `kill PID` during start-up, its main thread then in C++
        os.kill(os.getpid(), signal.SIGTERM)
        group_failures._group_client().blocking_key_value_get("never set", 120_000)
    multihost_utils.sync_global_devices("the next step")
"""


@pytest.mark.slow
@pytest.mark.parametrize("signalled", ["0", "1"])
def test_a_process_signalled_alone_before_the_training_loop_ends_the_group(signalled):
    """SIGTERM to one process of a group outside the training loop (start-up, compilation): it
    ended at once, and the other waited in its collective until JAX's heartbeat timeout (about
    100 s), then aborted with a C++ stack trace. Now the signalled one ends with status 143 and
    one line, and the other names it in one line and ends with status 1."""
    results = _run_group(signalled, _SIGNALLED_MEMBER)
    status, output = results[int(signalled)]
    assert status == 143, output
    assert "focalnet train: stopped by SIGTERM outside the training loop" in output, output
    other_status, other_output = results[1 - int(signalled)]
    lines = [line for line in other_output.splitlines() if "focalnet train" in line]
    assert lines == [
        f"focalnet train: error: process {signalled} failed (stopped by SIGTERM outside the "
        "training loop); this process stopped with it"
    ], other_output
    assert other_status == 1 and "fatal" not in other_output, other_output


# A process with the group's SIGTERM handler outside the training loop (`focalnet PROG`, argv 1),
# then the BODY of one test (argv 2 on: its own).
_WITH_THE_GROUPS_SIGTERM_HANDLER = """
import os, signal, sys, time
from focalnet_jax.training import group_failures
from focalnet_jax.training.graceful_stop import SigtermStop

class Client:  # the group's store, as far as the SIGTERM handler outside the loop uses it
    def wait_at_barrier(self, *args): pass
    def key_value_set(self, *args): pass

group_failures._end_the_group_on_sigterm(Client(), f"focalnet {sys.argv[1]}")
"""


def _signalled(body: str, prog: str = "train", *args: str) -> subprocess.CompletedProcess:
    script = _WITH_THE_GROUPS_SIGTERM_HANDLER + body
    return subprocess.run(
        [sys.executable, "-c", script, prog, *args], capture_output=True, text=True, timeout=120
    )


_LOOP_SIGNALLED = """
with SigtermStop() as stop:
    os.kill(os.getpid(), signal.SIGTERM)  # in the loop's last moments
    took = stop.stop_now(agreement_point=True)  # its last check
time.sleep(1)  # the thread outside the loop would act meanwhile
print("loop took it:", took)
"""


def test_a_sigterm_the_loop_takes_is_not_taken_again_outside_it():
    """A SIGTERM the training loop took just before it ended also reached the process group's
    handler outside the loop (its byte waited in the wakeup pipe): a complete run ended with
    status 143 as "stopped by SIGTERM outside the training loop", the others told it failed."""
    done = _signalled(_LOOP_SIGNALLED)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "loop took it: True\n" and "outside" not in done.stderr


_SIGNALLED_AS_THE_LOOP_STARTS = """
os.kill(os.getpid(), signal.SIGTERM)  # its byte read once the loop has taken SIGTERM over
with SigtermStop() as stop:
    for step in range(100):
        if stop.stop_now(agreement_point=True):
            break
        time.sleep(0.02)  # a step: the thread reads the byte meanwhile
print("stopped at step", step, stop.received, flush=True)
if sys.argv[2] == "again":  # a second SIGTERM, in the loop: it ends the process at once
    with SigtermStop() as stop:
        stop.received = True  # as the group's thread left it
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    print("not ended")
"""


@pytest.mark.parametrize("then", ["once", "again"])
def test_a_sigterm_that_arrives_as_the_loop_starts_stops_the_loop(then):
    """A SIGTERM that arrived just before the loop took SIGTERM over, its byte read by the
    group's thread only after: the thread took it for the loop's and dropped it, and the loop
    never saw it (trained on without a checkpoint until SLURM's SIGKILL). The loop stops; a
    second SIGTERM ends the process at once (it only set the flag again: the thread cannot put
    SIGTERM's default back)."""
    done = _signalled(_SIGNALLED_AS_THE_LOOP_STARTS, "train", then)
    assert done.stdout.startswith("stopped at step") and done.stdout.endswith(" True\n"), (
        done.stdout,
        done.stderr,
    )
    assert done.returncode == (0 if then == "once" else -signal.SIGTERM), done.stderr


_SIGNALLED_AFTER_THE_LAST_CHECK = """
with SigtermStop() as stop:
    assert not stop.stop_now(agreement_point=True)  # the loop's last check
    os.kill(os.getpid(), signal.SIGTERM)  # then the run's last writes
time.sleep(5)  # the next fold of `cv`
print("not ended")
"""


def test_a_sigterm_after_the_loops_last_check_ends_the_process_as_one_after_the_loop():
    """The loop's flag, set after its last check, was read by nobody: `cv` went on with its next
    fold until SLURM's SIGKILL. It ends the process as a SIGTERM outside the loop does."""
    done = _signalled(_SIGNALLED_AFTER_THE_LAST_CHECK, "cv")
    assert done.returncode == 143 and done.stdout == "", (done.stdout, done.stderr)
    assert done.stderr == "focalnet cv: stopped by SIGTERM outside the training loop\n"


@pytest.mark.slow
def test_process_0_failing_alone_in_a_group_of_three_ends_the_others_first():
    """Process 0, which holds the group's store, waits for both others to say they leave: each
    ends with the one line and status 1, none with JAX's abort."""
    results = _run_group("0", count=3)
    assert results[0][0] == 2 and "focalnet train: error: process 0 cannot go on" in results[0][1]
    for status, output in results[1:]:
        lines = [line for line in output.splitlines() if "focalnet train" in line]
        expected = "process 0 failed (process 0 cannot go on); this process stopped with it"
        assert lines == [f"focalnet train: error: {expected}"], output
        assert status == 1 and "fatal" not in output and "Traceback" not in output, output


@pytest.mark.slow
def test_processes_that_all_fail_leave_as_usual():
    """The same refusal in every process (a config error, a refused resume): each prints its line
    and leaves as a single process does (exit status 2, Python's exit handlers run)."""
    results = _run_group("both")
    assert results[0][0] == 2 and "focalnet train: error: process 0 cannot go on" in results[0][1]
    assert results[1][0] == 1 and "RuntimeError: process 1 cannot go on" in results[1][1]
    assert all("left as usual" in output for _, output in results), results


# Every process of the group refuses, then ends at once as a training command does
# (`cli.main`); process 1 gets there 2 s after process 0, as on a loaded machine.
_ENDING_MEMBER = """
import sys, time
from focalnet_jax.errors import UserError, one_line_user_errors
from focalnet_jax.training import distributed, group_failures
port, rank, failing, count = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
distributed.initialize(f"localhost:{port}", count, rank)
try:
    with group_failures.leave_group_on_failure("focalnet train", 60), one_line_user_errors(
        "focalnet train"
    ):
        raise UserError(f"process {rank} stopped")
except SystemExit as stop:
    time.sleep(2 * rank)
    group_failures.end_process(stop.code)
"""


@pytest.mark.slow
def test_processes_that_all_fail_and_end_at_once_end_process_0_last():
    """Every process stopped (a SIGTERM for all) and ends at once: process 0, which holds the
    group's store, waits for the later process 1 to leave; it ended first, and process 1 with
    JAX's abort (status -6, "Polled an error from coordination service")."""
    results = _run_group("both", member=_ENDING_MEMBER)
    for rank, (status, output) in enumerate(results):
        assert status == 2 and f"focalnet train: error: process {rank} stopped" in output, output
        assert "coordination service" not in output and "Traceback" not in output, output


# As _GROUP_MEMBER, the failure inside `distributed.together` (process 0's start-up writes), the
# first collective after it.
_TOGETHER_MEMBER = """
import atexit, sys
from jax.experimental import multihost_utils
from focalnet_jax.errors import UserError, one_line_user_errors
from focalnet_jax.training import distributed, group_failures
port, rank, failing, count = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
distributed.initialize(f"localhost:{port}", count, rank)
atexit.register(lambda: print("left as usual", flush=True))
with group_failures.leave_group_on_failure("focalnet train", 20), one_line_user_errors(
    "focalnet train"
):
    for block in range(2):  # each block has its own keys
        with group_failures.together("start the run"):
            if failing == f"{rank} in block {block}":
                raise (UserError if rank == 0 else RuntimeError)(f"process {rank} cannot write")
    multihost_utils.sync_global_devices("the first step")
print("trained", flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("block", [0, 1])
def test_a_failure_in_a_together_block_ends_every_process_with_one_line(block):
    """Process 0 alone fails to write: the other, instead of waiting for it in the next
    collective, stops with a line naming it and its error; both leave as usual."""
    results = _run_group(f"0 in block {block}", _TOGETHER_MEMBER)
    assert results[0][0] == 2, results
    assert "focalnet train: error: process 0 cannot write" in results[0][1]
    assert results[1][0] == 2, results
    line = "focalnet train: error: process 0 could not start the run: process 0 cannot write\n"
    assert line in results[1][1]
    assert all("left as usual" in out and "trained" not in out for _, out in results), results


@pytest.mark.slow
def test_a_bug_in_a_together_block_is_named_with_its_type():
    results = _run_group("1 in block 0", _TOGETHER_MEMBER)
    assert results[1][0] == 1 and "RuntimeError: process 1 cannot write" in results[1][1]
    assert results[0][0] == 2, results
    line = "could not start the run: RuntimeError: process 1 cannot write\n"
    assert "focalnet train: error: process 1 " + line in results[0][1]
    assert all("left as usual" in output for _, output in results), results


@pytest.mark.slow
def test_together_blocks_that_succeed_everywhere_go_on():
    results = _run_group("none", _TOGETHER_MEMBER)
    assert [status for status, _ in results] == [0, 0], results
    assert all("trained" in output for _, output in results), results


@pytest.mark.slow
def test_a_run_whose_tensorboard_folder_process_0_cannot_make_ends_in_every_process(tmp_path):
    """A file `tb` in a new run's workdir: only process 0 makes the TensorBoard folder. The other
    process stops with the same reason instead of waiting for process 0 in the first step."""
    from test_train_helpers import finish, free_port, process_flags, start_worker

    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "tb").write_text("not a folder")
    port = free_port()
    processes = [
        start_worker(tmp_path / f"unused{i}.npz", workdir, 1, process_flags(port, i))
        for i in range(2)
    ]
    outputs = finish(processes, timeout=240, returncode=1)  # the workers' uncaught errors
    exists = f"[Errno 17] File exists: '{workdir / 'tb'}'"
    assert f"FileExistsError: {exists}" in outputs[0]
    assert f"UserError: process 0 could not start the run: {exists}" in outputs[1]


@pytest.mark.slow
def test_processes_started_with_other_configs_end_before_training(tmp_path):
    """Another `seed` in one process trained the checkpoint with mixed seeds while config.json
    recorded process 0's; other `train.steps` ended in an Orbax traceback at the first save.
    Every process now ends before anything is written, naming the keys that differ."""
    from test_train_helpers import finish, free_port, process_flags, start_worker

    workdir, port = tmp_path / "run", free_port()
    processes = [
        start_worker(
            tmp_path / f"unused{i}.npz",
            workdir,
            1,
            [*process_flags(port, i), f"--config.seed={7 * i}"],
        )  # fmt: skip
        for i in range(2)
    ]
    outputs = finish(processes, timeout=240, returncode=1)  # the workers' uncaught errors
    reason = (
        "process 1 was started with another config than process 0: seed 0 -> 7; start every "
        "process with the same command"
    )
    assert (
        f"UserError: process 1 could not start with the config of process 0: {reason}"
        in (outputs[0])
    )
    assert f"UserError: {reason}" in outputs[1]
    assert not (workdir / "config.json").exists() and not (workdir / "checkpoints").exists()


@pytest.mark.parametrize("process_id", [0, 1])
def test_a_group_that_does_not_join_ends_in_one_line(process_id):
    """Process 1 given another port than process 0's (or process 0 whose process 1 never came)
    waited 5 minutes without a word, then JAX aborted it with a C++ stack trace naming neither
    the address nor a flag. Here alone, with a 3 s limit: one line, status 1."""
    from test_train_helpers import cpu_devices_env, free_port

    address = f"localhost:{free_port()}"
    script = (
        "from focalnet_jax.training import distributed\n"
        "distributed.JOIN_TIMEOUT_S = 3\n"
        f"distributed.initialize({address!r}, 2, {process_id})\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=cpu_devices_env(1),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert done.stderr.splitlines()[-1] == (
        f"focalnet: error: process {process_id} could not join its group of 2 processes at "
        f"{address} within 3 s: a process not started (or ended), or started with another "
        "coordinator address (host or port) or process count; start every process with the same "
        "ones"
    )
    assert "Check failure" not in done.stderr


_COUNT_MEMBER = """
import sys
from jax.experimental import multihost_utils
from focalnet_jax.errors import one_line_user_errors
from focalnet_jax.training import distributed, group_failures
port, rank, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[4])
with group_failures.leave_group_on_failure("focalnet train", 2), one_line_user_errors(
    "focalnet train"
):
    distributed.initialize(f"localhost:{port}", count + rank, rank)
    multihost_utils.sync_global_devices("the start")
"""


@pytest.mark.slow
def test_a_process_given_another_process_count_than_process_0_ends_the_group():
    """Process 1 given `--num_processes 3` joined process 0's group of 2: JAX took process 0's
    count and the flag was ignored without a word. Now it ends in one line naming the flag, and
    process 0 with it."""
    (status0, output0), (status1, output1) = _run_group("none", _COUNT_MEMBER)
    reason = (
        "--num_processes=3, but process 0 started a group of 2 processes: start every process "
        "with the same --num_processes"
    )
    assert status1 == 2 and f"focalnet train: error: {reason}" in output1, output1
    assert status0 == 1, output0
    assert f"error: process 1 failed ({reason}); this process stopped with it" in output0, output0


@pytest.mark.slow
def test_processes_given_other_workdirs_or_device_counts_end_before_training(tmp_path):
    """Two processes given two workdirs each wrote its share of the checkpoints into its own;
    they hung at the checkpoint's commit (20 minutes, then killed) and the run was lost. Two
    processes of 2 and 1 devices ended in a traceback of the first collective. Both are refused
    in every process before anything is written; a link to process 0's workdir is the same."""
    from test_train_helpers import finish, free_port, process_flags, start_worker

    cases = [  # (workdir of process 1, devices of process 1, process 1's reason)
        (
            tmp_path / "other",
            1,
            f"process 1's workdir {tmp_path / 'other'} holds no training lock of process 0, "
            f"which trains in {tmp_path / 'run'}: another folder, or one on a disk process 0 does "
            "not see; give every process the same --workdir, on a file system every process sees",
        ),
        (
            tmp_path / "run",
            2,
            "process 1 drives 2 devices, process 0 1 device: every process of a group drives as "
            "many (give each the same GPUs: CUDA_VISIBLE_DEVICES, --gpus-per-task, XLA_FLAGS)",
        ),
    ]
    for workdir, devices, reason in cases:
        port = free_port()
        processes = [
            start_worker(tmp_path / "unused0.npz", tmp_path / "run", 1, process_flags(port, 0)),
            start_worker(tmp_path / "unused1.npz", workdir, devices, process_flags(port, 1),
                         workdir_wait_s=2),
        ]  # fmt: skip
        outputs = finish(processes, timeout=240, returncode=1)  # the workers' uncaught errors
        assert f"UserError: {reason}" in outputs[1], outputs[1][-2000:]
        assert f": {reason}" in outputs[0] and "UserError: process 1 could not " in outputs[0]
        for folder in {tmp_path / "run", workdir}:
            assert not (folder / "checkpoints").exists() and not (folder / "config.json").exists()
    (tmp_path / "link").symlink_to(tmp_path / "run")
    port = free_port()
    flags = ["--config.train.steps=2"]
    processes = [
        start_worker(tmp_path / f"linked{i}.npz", tmp_path / name, 1, [*process_flags(port, i),
                     *flags])
        for i, name in enumerate(("run", "link"))
    ]  # fmt: skip
    finish(processes, timeout=240)


@pytest.mark.slow
def test_processes_reach_one_store_by_any_path_but_not_another_store(tmp_path):
    """`data.store` by another path in one process (a link, another mount) is the same store;
    a store of other data in one process is refused in every process before training."""
    from test_train_helpers import finish, free_port, process_flags, start_worker

    (tmp_path / "stlink").symlink_to(tmp_path / "st")
    for name, seeds, status in (("same", (0, 0), 0), ("other", (0, 1), 1)):
        port = free_port()
        processes = [
            start_worker(
                tmp_path / f"{name}{i}.npz",
                tmp_path / name,
                1,
                [
                    *process_flags(port, i),
                    "--config.train.steps=2",
                    f"--config.data.store={tmp_path / ('st', 'stlink')[i]}",
                ],
                store_seed=seeds[i],
            )  # fmt: skip
            for i in range(2)
        ]
        outputs = finish(processes, timeout=240, returncode=status)
    reason = (
        "process 1's store memory:/fake-store holds other settings, cases or data than process "
        "0's; give every process the same store"
    )
    assert f"UserError: process 1 could not open the store of process 0: {reason}" in outputs[0]
    assert f"UserError: {reason}" in outputs[1]
    assert (tmp_path / "same" / "checkpoints").is_dir()


def test_a_failure_in_a_together_block_stays_its_own_when_it_cannot_be_recorded(monkeypatch):
    """The group's key-value store gone (its coordinator, process 0, ended): the block's error
    was replaced by the store's, a traceback instead of the error's one line."""
    from focalnet_jax.errors import UserError

    class Gone:
        def key_value_set(self, key, value):
            raise RuntimeError("UNAVAILABLE: failed to connect to the coordination service")

    monkeypatch.setattr(group_failures.jax, "process_count", lambda: 2)
    monkeypatch.setattr(group_failures, "_group_client", lambda: Gone())
    with pytest.raises(UserError, match="^cannot write store.json$"):
        with group_failures.together("start the run"):
            raise UserError("cannot write store.json")


def test_an_outcome_that_never_comes_is_a_line_with_the_stores_reason(monkeypatch):
    """Process 1 never records its outcome: process 0 stops after `wait_s` with a line naming it
    and what the key-value store said."""
    from focalnet_jax.errors import UserError

    class Silent:
        def __init__(self):
            self.values = {}

        def key_value_set(self, key, value):
            self.values[key] = value

        def blocking_key_value_get(self, key, timeout_ms):
            if key in self.values:
                return self.values[key]
            raise RuntimeError(f"DEADLINE_EXCEEDED: no {key} after {timeout_ms} ms\nmore")

    monkeypatch.setattr(group_failures.jax, "process_count", lambda: 2)
    monkeypatch.setattr(group_failures, "_group_client", lambda: Silent())
    with pytest.raises(UserError) as raised:
        with group_failures.together("start the run", wait_s=3):
            pass
    assert str(raised.value).startswith(
        "process 1 did not say whether it could start the run (waited up to 3 s: "
        "DEADLINE_EXCEEDED: no focalnet_together/"
    )
    assert str(raised.value).endswith("/1 after 3000 ms more)")


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


def _save_weights(tmp_path, seeds) -> None:
    """Random backbone weights of the workers' tiny model as `tmp_path / "w<seed>.safetensors"`."""
    import jax
    import numpy as np
    from test_pretrained import random_variables
    from test_train_helpers import tiny_config

    from focalnet_jax.models.pretrained import save_torchvision_resnet
    from focalnet_jax.run.spec import RunSpec
    from focalnet_jax.training import train_state

    spec = RunSpec.from_config(tiny_config(), image_size=(32, 32))
    init = train_state.init_variables(spec.model, jax.random.key(1), spec.input_shape)
    for seed in seeds:
        saved = random_variables(init, np.random.default_rng(seed))
        path = tmp_path / f"w{seed}.safetensors"
        save_torchvision_resnet(saved, path, components=spec.components)


def _start_with_weights(tmp_path, weights: list[str]) -> list[str]:
    """The outputs of two processes training 2 steps in `tmp_path / "run"`, process i from the
    pretrained weights file `weights[i]` ('' for none), which end with status 1."""
    from test_train_helpers import finish, free_port, process_flags, start_worker

    port = free_port()
    processes = [
        start_worker(
            tmp_path / f"unused{i}.npz",
            tmp_path / "run",
            1,
            [
                *process_flags(port, i),
                "--config.train.steps=2",
                f"--config.model.pretrained={weights[i]}",
            ],
        )  # fmt: skip
        for i in range(2)
    ]
    return finish(processes, timeout=240, returncode=1)


@pytest.mark.slow
@pytest.mark.parametrize("process0", ["other", "none"])
def test_processes_started_from_other_pretrained_weights_end_before_training(tmp_path, process0):
    """`model.pretrained` naming other weights in one process (its path is left out of the config
    comparison: a node-local copy is the same file): each process replicated its own weights, and
    the group trained replicas that never agreed, without a word. Every process now compares the
    weights it loaded with process 0's. Process 0 without weights: only process 1 ran the
    comparison's blocks, and every later block of the group was paired with another."""
    _save_weights(tmp_path, (0, 1))
    first = "" if process0 == "none" else str(tmp_path / "w0.safetensors")
    outputs = _start_with_weights(tmp_path, [first, str(tmp_path / "w1.safetensors")])
    reason = (
        f"process 1's pretrained weights {tmp_path / 'w1.safetensors'} hold other values than "
        "process 0's; give every process the same weights"
    )
    if process0 == "none":
        reason = (
            f"process 1 was started with pretrained weights {tmp_path / 'w1.safetensors'}, "
            "process 0 without them; start every process with the same command"
        )
    assert f"UserError: process 1 could not load the weights of process 0: {reason}" in outputs[0]
    assert f"UserError: {reason}" in outputs[1]
    assert not list((tmp_path / "run" / "checkpoints").glob("*/"))


@pytest.mark.slow
def test_a_process_that_cannot_load_its_pretrained_weights_ends_the_group(tmp_path):
    """Process 0's copy of the weights damaged (each host its own copy): the other process went
    on into the first collective and waited there for it; now every process ends, each with one
    line."""
    _save_weights(tmp_path, (1,))
    (tmp_path / "w0.safetensors").write_bytes(b"not safetensors")
    weights = [str(tmp_path / f"w{i}.safetensors") for i in range(2)]
    outputs = _start_with_weights(tmp_path, weights)
    assert f"PretrainedWeightsError: pretrained weights {weights[0]}" in outputs[0]
    assert (
        "UserError: process 0 could not load its pretrained weights: pretrained weights"
        in (outputs[1])
    )
