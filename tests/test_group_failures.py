"""Failures of a process group (focalnet_jax/training/group_failures.py, `distributed._join`):
a process that fails, is interrupted or signalled alone ends the others with one line naming it;
`together` blocks; a group that does not join, or whose processes were given other process
counts. Real groups of local processes on CPU devices."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from focalnet_jax.training import group_failures

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
