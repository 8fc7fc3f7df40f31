"""SIGTERM stops training at a step boundary (focalnet_jax/training/graceful_stop.py): real
`focalnet train` processes on a tiny synthetic store, signalled mid-run, exit with status 143 and
one line, leave a checkpoint at the step they stopped and the TensorBoard events up to it; the
rerun reaches the parameters of an uninterrupted run. Two processes of one run, only one of them
signalled, stop at the same log step. A SIGTERM during the last step's checkpoint or validation
completes the run (status 0, one line); in `cv` one at a fold's end stops before the next fold
unless that fold is the last; one during the process's exit after the run ends it at once with
status 0. A second SIGTERM, or one outside the loop, ends the process at once."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from test_train_helpers import REPO, cpu_devices_env, free_port, small_synthetic_store

from focalnet_jax.evaluation.ensemble import final_step
from focalnet_jax.run import workdir as workdir_lib
from focalnet_jax.training.tb_logging import read_scalars

STEPS = 30
TINY_RUN = [
    "--config.data.num_folds=2",
    "--config.data.slices=all",
    "--config.model.depth=18",
    "--config.model.width=0.125",
    "--config.model.output_stride=16",
    "--config.train.batch_size=4",
    "--config.train.checkpoint_every=1000",
    "--config.train.eval_every=0",
    f"--config.train.steps={STEPS}",
    "--config.loss.mfl=false",  # a stop does not depend on the loss; MFL's step compiles longer
]
STOPPED = re.compile(
    r"focalnet (?:train|cv): stopped by SIGTERM at step (\d+) in (\S+); checkpoint saved, "
    r"run again to resume"
)
COMPLETED = "completed at step {} in {} although a SIGTERM arrived; nothing to resume"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return small_synthetic_store(tmp_path_factory.mktemp("sigterm_data"), cases=6, seed=3)


def _train_argv(
    store: Path, workdir: Path, log_every: int, flags=(), command: str = "train"
) -> list[str]:
    """`focalnet train` (or `cv`) of the tiny run (the session's compilation cache)."""
    return [
        sys.executable, "-m", "focalnet_jax.cli", command, "--config", "configs/focalnet.py",
        "--workdir", str(workdir), f"--config.data.store={store}",
        f"--config.train.log_every={log_every}", *TINY_RUN, *flags,
    ]  # fmt: skip


def _start(argv: list[str], stderr: Path) -> subprocess.Popen:
    env = cpu_devices_env(1)
    with open(stderr, "wb") as err:
        return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=err, cwd=REPO)


def _wait_for_step(process: subprocess.Popen, stderr: Path, step: int, timeout: float = 240):
    """Until the progress bar on `stderr` shows step `step` of the run (or more)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        shown = re.findall(rf"\b(\d+)/{STEPS}\b", stderr.read_text(errors="replace"))
        if shown and max(map(int, shown)) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"no step {step} (exit {process.poll()}): {_text(stderr)[-2000:]}")


def _text(path: Path) -> str:
    return path.read_text(errors="replace")


def _stopped_step(process: subprocess.Popen, stderr: Path, workdir: Path) -> int:
    """The step of the one `stopped by SIGTERM` line of a process that exited with 143."""
    try:
        status = process.wait(timeout=180)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"no stop after SIGTERM: {_text(stderr)[-2000:]}") from None
    lines = [line for line in re.split(r"[\r\n]", _text(stderr)) if "SIGTERM" in line]
    assert status == 143 and len(lines) == 1, (status, _text(stderr)[-2000:])
    match = STOPPED.fullmatch(lines[0])
    assert match and match.group(2) == str(workdir), lines[0]
    return int(match.group(1))


def _variables(workdir: Path, step: int) -> dict:
    return jax.device_get(workdir_lib.load_for_inference(workdir, step=step)[1])


def test_sigterm_saves_the_step_it_stops_at_and_the_rerun_equals_an_uninterrupted_run(
    store, tmp_path
):
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    done = subprocess.run(
        _train_argv(store, full, 1), env=cpu_devices_env(1),
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    stderr = tmp_path / "stopped.err"
    process = _start(_train_argv(store, stopped, 1), stderr)
    _wait_for_step(process, stderr, 2)
    process.send_signal(signal.SIGTERM)
    step = _stopped_step(process, stderr, stopped)
    assert 2 <= step < STEPS
    # The stop's own checkpoint (checkpoint_every is 1000) and every logged step up to it.
    assert [p.name for p in (stopped / "checkpoints").iterdir()] == [str(step)]
    assert read_scalars(stopped / "tb", "train/loss")[0].tolist() == list(range(1, step + 1))
    rerun = subprocess.run(
        _train_argv(store, stopped, 1), env=cpu_devices_env(1),
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"start at {step}" in rerun.stderr
    assert read_scalars(stopped / "tb", "train/loss")[0].tolist() == list(range(1, STEPS + 1))
    want, got = _variables(full, STEPS), _variables(stopped, STEPS)
    for collection in ("params", "batch_stats"):
        flat = jax.tree_util.tree_flatten_with_path(want[collection])[0]
        assert len(flat) > 0
        for (path, a), b in zip(flat, jax.tree.leaves(got[collection]), strict=True):
            np.testing.assert_array_equal(b, a, err_msg=f"{collection}{jax.tree_util.keystr(path)}")
    assert not np.array_equal(  # and the stopped step's parameters are not the last ones
        jax.tree.leaves(_variables(stopped, step)["params"])[0], jax.tree.leaves(want["params"])[0]
    )


def test_ctrl_c_names_the_checkpoint_a_rerun_resumes_from(store, tmp_path):
    """Ctrl-C stops at once, not at a step boundary: it said only `interrupted by Ctrl-C`, not
    that the steps since the last checkpoint are lost, nor that a rerun resumes."""
    workdir, stderr = tmp_path / "run", tmp_path / "run.err"
    flags = ["--config.train.checkpoint_every=2"]
    process = _start(_train_argv(store, workdir, 1, flags), stderr)
    _wait_for_step(process, stderr, 3)
    process.send_signal(signal.SIGINT)
    status = process.wait(timeout=180)
    kept = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    last = [line for line in re.split(r"[\r\n]", _text(stderr)) if line][-1]
    assert (status, last) == (
        130,
        f"focalnet train: interrupted by Ctrl-C: checkpoint {kept} kept in {workdir}, run again "
        "to resume from it (SIGTERM, `kill PID`, stops after the current step with its "
        "checkpoint)",
    )
    assert kept >= 2


@pytest.mark.slow
def test_two_processes_stop_at_the_same_log_step_when_one_is_signalled(store, tmp_path):
    """Process 1 alone gets SIGTERM; both agree at the next log step (every 3 steps), save that
    step and exit with 143: neither waits for the other in a collective."""
    workdir, port = tmp_path / "two", free_port()
    processes, logs = [], []
    for rank in (0, 1):
        flags = ["--coordinator_address", f"localhost:{port}", "--num_processes", "2"]
        logs.append(tmp_path / f"process{rank}.err")
        argv = _train_argv(store, workdir, 3, [*flags, "--process_id", str(rank)])
        processes.append(_start(argv, logs[-1]))
    try:
        _wait_for_step(processes[0], logs[0], 2)  # process 0 draws the bar
        processes[1].send_signal(signal.SIGTERM)
        steps = [_stopped_step(p, log, workdir) for p, log in zip(processes, logs, strict=True)]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert steps[0] == steps[1] and steps[0] % 3 == 0 and 3 <= steps[0] < STEPS, steps
    assert [p.name for p in (workdir / "checkpoints").iterdir()] == [str(steps[0])]
    logged = read_scalars(workdir / "tb", "train/loss")[0].tolist()
    assert logged == list(range(3, steps[0] + 1, 3))


# A child process: `twice` takes one SIGTERM in `SigtermStop`, prints what it saw, then gets a
# second; `after` gets one once the block has ended.
CHILD = """
import os, signal, sys, time
from focalnet_jax.training.graceful_stop import SigtermStop

with SigtermStop() as stop:
    if sys.argv[1] == "twice":
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)
        print(stop.received, stop.stop_now(agreement_point=False), flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(5)
print("not ended", flush=True)
"""


@pytest.mark.parametrize("mode", ["twice", "after"])
def test_a_second_sigterm_or_one_outside_the_loop_ends_the_process_at_once(mode):
    done = subprocess.run(
        [sys.executable, "-c", CHILD, mode], env=cpu_devices_env(1), capture_output=True,
        text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == -signal.SIGTERM, (done.returncode, done.stderr[-2000:])
    assert done.stdout == ("True True\n" if mode == "twice" else "")


# `focalnet ARGS` in a child whose process RANK sends itself SIGTERM as its first checkpoint write
# or validation begins (argv: checkpoint|validation|exit|kill, RANK, ARGS; kill: SIGKILL as
# validation begins, once the checkpoint writes have finished; exit: SIGTERM as the process exits,
# which then takes 60 s, as a shutdown barrier may, then prints `exit waited` and exits with status
# 3 unless the signal has ended it). With `checkpoint_every` 1000 and `eval_every` 0 these are the
# last step's (in `cv`: of the first fold that trains).
SIGNAL_AT_THE_END = """
import atexit, os, signal, sys, time
import jax
from focalnet_jax import cli
from focalnet_jax.training import checkpoint, loop

where, rank = sys.argv[1], int(sys.argv[2])
fired, managers = [], []

def signalled(function):
    def wrapped(*args, **kwargs):
        if not fired and jax.process_index() == rank:
            fired.append(True)
            if where == "kill":
                managers[-1].wait_until_finished()
            os.kill(os.getpid(), signal.SIGKILL if where == "kill" else signal.SIGTERM)
        return function(*args, **kwargs)
    return wrapped

def save(manager, step, state, *, newer_than, save=checkpoint.save):
    managers.append(manager)
    return save(manager, step, state, newer_than=newer_than)

checkpoint.save = signalled(checkpoint.save) if where == "checkpoint" else save
if where in ("validation", "kill"):
    loop.evaluate = signalled(loop.evaluate)
def exit_slowly():
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(60)
    print("exit waited", flush=True)
    os._exit(3)

if where == "exit":
    atexit.register(exit_slowly)
sys.argv[1:] = sys.argv[3:]  # the process's own command line, as `focalnet` has it
sys.exit(cli.main())
"""
LAST = 4  # steps of the runs below


def _signalled_at_the_end(argv: list[str], where: str, rank: int = 0) -> list[str]:
    """`argv` (a `_train_argv`) run by SIGNAL_AT_THE_END, `LAST` steps."""
    return [
        sys.executable, "-c", SIGNAL_AT_THE_END, where, str(rank), *argv[3:],
        f"--config.train.steps={LAST}",
    ]  # fmt: skip


def _child(argv: list[str]) -> subprocess.CompletedProcess:
    """`argv` run to its end on one CPU device, its output captured."""
    return subprocess.run(
        argv, env=cpu_devices_env(1), capture_output=True,
        text=True, timeout=300, cwd=REPO,
    )  # fmt: skip


def _run(argv: list[str]) -> tuple[int, list[str]]:
    """(exit status, the lines of stderr that name SIGTERM) of `argv` on one CPU device."""
    done = _child(argv)
    assert done.returncode in (0, 143), (done.returncode, done.stderr[-3000:])
    return done.returncode, [line for line in re.split(r"[\r\n]", done.stderr) if "SIGTERM" in line]


def _complete(workdir: Path) -> None:
    """`workdir` is a finished run: its last checkpoint, the last step's logs and validation."""
    assert final_step(workdir) == (LAST, "")
    assert [p.name for p in (workdir / "checkpoints").iterdir()] == [str(LAST)]
    assert read_scalars(workdir / "tb", "train/loss")[0].tolist() == list(range(1, LAST + 1))
    steps, values = read_scalars(workdir / "tb", "val/loss")
    assert steps.tolist() == [LAST] and np.isfinite(values).all()


@pytest.mark.parametrize("where", ["checkpoint", "validation", "exit"])
def test_sigterm_during_the_last_steps_checkpoint_validation_or_exit_completes_the_run(
    store, tmp_path, where
):
    """`exit`: a SIGTERM during the process's exit after the run ends it at once, with status 0
    (it was killed by the signal, as if the run had not finished)."""
    workdir = tmp_path / "run"
    done = _child(_signalled_at_the_end(_train_argv(store, workdir, 1), where))
    assert "exit waited" not in done.stdout  # ended by the signal, not after the 60 s exit
    lines = [line for line in re.split(r"[\r\n]", done.stderr) if "SIGTERM" in line]
    assert (done.returncode, lines) == (0, [f"focalnet train: {COMPLETED.format(LAST, workdir)}"])
    _complete(workdir)


def test_a_run_killed_during_its_last_validation_validates_on_the_rerun(store, tmp_path):
    """SIGKILL as the last step's validation begins (its checkpoint written): the run is on disk
    with its train logs but no `val/` scalars; the rerun trains no step and logs the validation."""
    workdir = tmp_path / "run"
    argv = _signalled_at_the_end(_train_argv(store, workdir, 1), "kill")
    killed = _child(argv)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-3000:])
    assert final_step(workdir) == (LAST, "")
    losses = read_scalars(workdir / "tb", "train/loss")
    assert losses[0].tolist() == list(range(1, LAST + 1))
    assert read_scalars(workdir / "tb", "val/loss")[0].size == 0
    done = _child([*_train_argv(store, workdir, 1), f"--config.train.steps={LAST}"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"validation at step {LAST} is not in its TensorBoard log" in done.stderr
    _complete(workdir)
    np.testing.assert_array_equal(read_scalars(workdir / "tb", "train/loss")[1], losses[1])


def test_cv_stops_before_the_next_fold_unless_the_sigterm_comes_at_the_last_folds_end(
    store, tmp_path
):
    workdir = tmp_path / "cv"
    argv = _train_argv(store, workdir, 1, ["--folds", "0,1"], command="cv")
    status, lines = _run(_signalled_at_the_end(argv, "validation"))
    stopped = STOPPED.fullmatch(lines[0]) if lines else None
    assert status == 143 and len(lines) == 1 and stopped, (status, lines)
    assert lines[0].startswith("focalnet cv: ")
    assert stopped.groups() == (str(LAST), str(workdir / "fold0"))
    _complete(workdir / "fold0")
    assert not (workdir / "fold1").exists()
    # Run again: fold 0 is complete (no step, no validation), fold 1 trains and is signalled at
    # its last validation.
    status, lines = _run(_signalled_at_the_end(argv, "validation"))
    assert (status, lines) == (0, [f"focalnet cv: {COMPLETED.format(LAST, workdir / 'fold1')}"])
    _complete(workdir / "fold1")


@pytest.mark.slow
def test_two_processes_both_complete_when_one_is_signalled_during_the_last_validation(
    store, tmp_path
):
    """Process 1 alone gets SIGTERM as the last step's validation begins: both agree after the
    run's writes, exit with status 0 and say so; the run is complete."""
    workdir, port = tmp_path / "two", free_port()
    processes, logs = [], []
    for rank in (0, 1):
        flags = ["--coordinator_address", f"localhost:{port}", "--num_processes", "2"]
        logs.append(tmp_path / f"process{rank}.err")
        argv = _train_argv(store, workdir, 1, [*flags, "--process_id", str(rank)])
        processes.append(_start(_signalled_at_the_end(argv, "validation", rank=1), logs[-1]))
    try:
        statuses = [p.wait(timeout=300) for p in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    for status, log in zip(statuses, logs, strict=True):
        lines = [line for line in re.split(r"[\r\n]", _text(log)) if "SIGTERM" in line]
        assert (status, lines) == (0, [f"focalnet train: {COMPLETED.format(LAST, workdir)}"]), (
            status, _text(log)[-2000:],
        )  # fmt: skip
    _complete(workdir)
