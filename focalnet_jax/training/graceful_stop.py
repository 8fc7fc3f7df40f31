"""Stop a training run at a step boundary on SIGTERM (a SLURM time limit or preemption, `scancel`,
`kill`), so that the steps since the last checkpoint are not lost.

Inside `SigtermStop` (the training loop and the run's last writes) the first SIGTERM only sets a
flag and puts SIGTERM's default back, so a second one ends the process at once, as one outside it
does (data loading, compilation of the state). The loop asks `stop_now` at
step boundaries: a single process stops after the step it is in; the processes of a multi-process
run take the OR of their flags (`multihost_utils.process_allgather`) only at the loop's log steps
(`train.log_every`), where they all call it and the loop already waits for the devices to read
the logged values, so all stop after the same step, and once the run is complete (below). The
stop then comes up to `train.log_every` steps after the signal; SLURM sends SIGKILL `KillWait`
seconds (default 30) after SIGTERM, so `log_every` steps and a checkpoint write must fit in that
time.

On a stop the loop saves a checkpoint at that step and raises `TrainingStopped`; `focalnet` prints
its message as one line on stderr and exits with status 143 (128 + SIGTERM). The last step is not
stopped: it goes on to its checkpoint and validation, and `train_and_evaluate` checks for a SIGTERM
once more (every process, so all agree) after the run's checkpoint writes have finished and its
logs are closed. A SIGTERM by then (in the last step, its checkpoint, its validation or those
writes) raises `TrainingStopped` with `complete` set: the run is complete, its last checkpoint
(what a rerun and evaluation take as finished, `ensemble.final_step`) is on disk. `focalnet train`,
and `cv` after its last fold, then print `TrainingStopped.completed` and exit with status 0; `cv`
before another fold stops with 143, as above. After that last run a SIGTERM during the process's
exit (JAX's shutdown; in a multi-process run its barrier) ends it at once, with status 0 and that
line (`exit_zero_on_sigterm`): a finished run is not reported as killed.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from focalnet_jax.errors import Interrupted, Terminated
from focalnet_jax.training.group_failures import LoopSigterm


class TrainingStopped(Terminated):
    """The run stopped after step `step` on SIGTERM; its checkpoint at that step is saved.
    `complete`: `step` is the run's last, its checkpoint written and logs closed (module
    docstring); `completed` is then the line that says so."""

    def __init__(self, step: int, workdir: str | Path, *, complete: bool = False):
        super().__init__(
            f"stopped by SIGTERM at step {step} in {workdir}; checkpoint saved, run again to resume"
        )
        self.step, self.complete = step, complete
        self.completed = (
            f"completed at step {step} in {workdir} although a SIGTERM arrived; nothing to resume"
        )


class SigtermStop:
    """Context manager: a SIGTERM inside it sets `received` (once: the next one ends the process).
    One that `stop_now` never reported (it came after the loop's last check) is sent again as
    the block ends, to the handler outside it: the process ends as for a SIGTERM after the loop.
    Off the main thread, where Python cannot take signals, it changes nothing."""

    def __init__(self):
        self.received = False
        self._reported = False  # `received` as `stop_now` last read it
        self._previous = None
        self._wakeup_fd = -1
        self._installed = False

    def __enter__(self) -> SigtermStop:
        if threading.current_thread() is threading.main_thread():
            # Not the process group's handler outside the loop (`group_failures`): it is told
            # first (a signal byte already in its pipe then sets `received`), and no signal byte
            # reaches its pipe while the loop takes SIGTERM.
            LoopSigterm.stop = self
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._wakeup_fd = signal.set_wakeup_fd(-1)
            self._installed = True
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        if self._installed:
            signal.set_wakeup_fd(self._wakeup_fd)
            # None: the handler before was not Python's (it cannot be put back): the default.
            previous = signal.SIG_DFL if self._previous is None else self._previous
            signal.signal(signal.SIGTERM, previous)
            LoopSigterm.stop = None
            # After the loop's last check: lost otherwise (`cv` trained its next fold on).
            if exc_type is None and self.received and not self._reported:
                os.kill(os.getpid(), signal.SIGTERM)

    def _on_sigterm(self, signum, frame) -> None:
        if self.received:  # the first came through the process group's thread: this is the second
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        self.received = True
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def stop_now(self, agreement_point: bool) -> bool:
        """Whether the run stops after this step: this process's flag in a single process; in a
        multi-process run, at an `agreement_point` (a step at which every process calls this
        with True), whether any process has its flag set, else False."""
        if jax.process_count() == 1:
            self._reported = self.received
            return self._reported
        if not agreement_point:
            return False
        self._reported = self.received
        flags = multihost_utils.process_allgather(np.int32(self._reported))
        return bool(np.any(flags))


def exit_zero_on_sigterm(line: str) -> None:
    """From now to the process's end (its exit: JAX's shutdown, in a multi-process run its barrier)
    a SIGTERM ends the process at once with status 0 after `line` (if not empty) on stderr: call it
    once the command's work is complete and on disk. Python's signal handler writes the signal
    number to a pipe (`signal.set_wakeup_fd`) as the signal arrives, and a thread waiting on it
    exits, so a main thread held in JAX's C++ code does not delay it. Off the main thread it
    changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        return
    read, write = os.pipe()
    os.set_blocking(write, False)
    message = (line + "\n").encode() if line else b""

    def wait_for_sigterm() -> None:
        while os.read(read, 1) != bytes([signal.SIGTERM]):  # SIGINT keeps its own way
            pass
        if message:
            os.write(2, message)
        os._exit(0)

    threading.Thread(target=wait_for_sigterm, name="sigterm-after-completion", daemon=True).start()
    signal.set_wakeup_fd(write)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)  # the thread acts on it


def ctrl_c_interrupt(latest: int | None, workdir: str | Path) -> Interrupted:
    """The line of Ctrl-C during the steps, which stops at once (not at a step boundary): the
    steps since the latest checkpoint are lost, and SIGTERM would have saved them."""
    kept = f"checkpoint {latest} kept" if latest is not None else "no checkpoint saved yet"
    return Interrupted(
        f"interrupted by Ctrl-C: {kept} in {workdir}, run again to resume from it (SIGTERM, "
        "`kill PID`, stops after the current step with its checkpoint)"
    )
