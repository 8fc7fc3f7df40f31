"""Failures in a process group: every process ends, each with one line, when one fails alone.

A failure of one process (`leave_group_on_failure`): a process whose command fails tells every
other process its reason in the group's key-value store (a notice each, which keeps the first
failure it is told of) and waits up to `FAILURE_WAIT_S` seconds for the others to fail too (the same
refusal in each: they then exit as a single one does). A process that is still at work (a
collective waiting for the failed one, on any backend) learns of it from a watch thread on its
notice: after the same wait for a failure of its own, it prints one line naming the failed
process and its reason, and ends with status 1, without JAX's shutdown barrier; so does the
failing process. Process 0, which holds the store, ends last: had it gone first (it failed alone),
the others ended with JAX's coordination-service abort (status -6, a C++ stack trace). Before
any of this, a lone failure waited at JAX's shutdown barrier (5 minutes) while the others waited
in their collective for it. A process that crashes without a word (killed, out of memory)
notifies nobody: the others' collective fails on its closed connection (their line then names
the first failure they were notified of, if any, else their traceback). A SIGTERM outside the
training loop is such a failure (`_end_the_group_on_sigterm`), not a silent end.

Work only some processes do (`together`): process 0's writes at a run's start (`store.json`,
`config.json`, TensorBoard events) are followed by an exchange of every process's outcome through
the group's key-value store, so that a failure there ends every process with one line (the others
name the process that failed and its error) instead of leaving them in a collective. A value
every process must agree on (the run's config) is compared with process 0's (`process0_value`).
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import os
import signal
import sys
import threading
import time
import traceback

import jax

from focalnet_jax.errors import PrintedExit, UserError, is_user_error

# Seconds a failing process of a group waits for the others to fail too (module docstring).
FAILURE_WAIT_S = 30.0


def _group_client():
    """JAX's client of the process group this process joined; None outside one."""
    from jax._src import distributed as jax_distributed  # the client Orbax's barriers use too

    return jax_distributed.global_state.client


_NOTICE = "focalnet_notice/"  # + process: the group's first failure "<process> <reason>", or "exit"
_LEFT = "focalnet_left/"  # a process other than 0 that leaves the group for a failure, as it goes
_WATCH_POLL_MS = 3_600_000  # the watch's wait on the store, renewed until the process ends


class _FailureWatch:
    """What `leave_group_on_failure` hands the watch: its `prog` and `wait_s`; who reports the
    end of this process (`reporter`), decided once under `lock`: its own failure ("failure",
    which also sets `failed_here`) or the watch ("watch", for another's failure)."""

    prog: str | None = None
    wait_s: float = 0.0
    failed_here = threading.Event()
    reporter: str | None = None
    lock = threading.Lock()
    started = False

    @classmethod
    def claim(cls, who: str) -> bool:
        """Whether `who` ("failure", "sigterm" or "watch") reports this process's end: the first
        to ask (any but the watch: this process failed, `failed_here`)."""
        with cls.lock:
            cls.reporter = cls.reporter or who
            if cls.reporter != "watch":
                cls.failed_here.set()
            return cls.reporter == who


class LoopSigterm:
    """The training loop's stop (`graceful_stop.SigtermStop`, an object with a `received` flag)
    while the loop takes SIGTERM itself, at a step boundary; None outside the loop."""

    stop = None


_SIGTERM_REASON = "stopped by SIGTERM outside the training loop"


def watch_for_group_failures() -> None:
    """Inside `leave_group_on_failure`, in a process group: a daemon thread waits on the group's
    store for the notice of another process's failure (`_NOTICE` + this process). This process,
    still at work (in a collective that waits for the failed one, on any backend), then gives its
    own failure `wait_s` seconds to come (the same refusal everywhere: each leaves as usual);
    else it prints one line naming the failed process and its reason, and ends with status 1.
    Process 0, which holds the group's store, ends last (`end_process`), so no other process
    meets JAX's coordination-service abort. At a normal exit the watch is woken ("exit") and
    joined before the interpreter ends. Idempotent; started by whichever comes second of
    `initialize` and `leave_group_on_failure`."""
    client = _group_client()
    if _FailureWatch.prog is None or client is None or _FailureWatch.started:
        return
    _FailureWatch.started = True
    rank, prog, wait_s = jax.process_index(), _FailureWatch.prog, _FailureWatch.wait_s
    key = f"{_NOTICE}{rank}"

    def watch() -> None:
        while True:
            try:
                notice = client.blocking_key_value_get(key, _WATCH_POLL_MS)
                break
            except Exception as error:  # renewed at its deadline; else the group ended
                if "DEADLINE_EXCEEDED" not in str(error):
                    return
        if notice == "exit" or _FailureWatch.failed_here.wait(wait_s):
            return  # a normal exit, or this process failed too: it says so itself
        if not _FailureWatch.claim("watch"):
            return
        process, reason = notice.split(" ", 1)
        print(f"{prog}: error: process {process} failed ({reason}); this process stopped with it",
              file=sys.stderr)  # fmt: skip
        end_process(1)

    thread = threading.Thread(target=watch, name="focalnet-group-failures", daemon=True)
    thread.start()
    _end_the_group_on_sigterm(client, prog)

    def wake_and_join() -> None:  # a thread still in the client's call at exit would abort
        with contextlib.suppress(Exception):  # the store gone: its call has ended with it
            client.key_value_set(key, "exit")
        thread.join(timeout=10)

    atexit.register(wake_and_join)


def _end_the_group_on_sigterm(client, prog: str) -> None:
    """A SIGTERM to this process alone outside a training loop (start-up, compilation, between
    the runs of `cv`) ended it at once, and the others waited for it until JAX's heartbeat
    timeout (about 100 s), then aborted with a C++ stack trace. Now it ends with status 143 and
    one line, the others told (`_notify_group`) and ended with theirs. The signal number reaches
    a thread through `signal.set_wakeup_fd`, so a main thread held in JAX's C++ code does not
    delay it. A signal whose byte the thread reads while a loop takes SIGTERM (`LoopSigterm`:
    it arrived as the loop was taking SIGTERM over) is the loop's: its stop is set. Main thread
    only (signal handlers are set there)."""
    if threading.current_thread() is not threading.main_thread():
        return
    read, write = os.pipe()
    os.set_blocking(write, False)

    def wait_for_sigterm() -> None:
        while True:
            if os.read(read, 1) != bytes([signal.SIGTERM]):
                continue
            if (loop := LoopSigterm.stop) is None:
                break
            loop.received = True
        if not _FailureWatch.claim("sigterm"):  # this process is ending already, its way
            return
        print(f"{prog}: {_SIGTERM_REASON}", file=sys.stderr)
        _notify_group(client, _SIGTERM_REASON)
        # As a failure (`leave_group_on_failure`): the others' watches wait as long for a failure
        # of their own before they say they leave, which process 0 then waits for.
        with contextlib.suppress(Exception):  # timed out (they are in a collective), or gone
            client.wait_at_barrier("focalnet_command_failed", int(_FailureWatch.wait_s * 1000))
        end_process(143)

    thread = threading.Thread(target=wait_for_sigterm, name="focalnet-group-sigterm", daemon=True)
    thread.start()
    signal.set_wakeup_fd(write)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)  # the thread acts on it


def _notify_group(client, reason: str) -> None:
    """This process's failure, the group's first, in every other process's notice."""
    for process in range(jax.process_count()):
        if process != jax.process_index():
            with contextlib.suppress(Exception):  # held already: another process failed first
                client.key_value_set(f"{_NOTICE}{process}", f"{jax.process_index()} {reason}")


def command_name() -> str:
    """The running command's name for its one-line errors (`focalnet train`), as given to
    `leave_group_on_failure`; `focalnet` outside it."""
    return _FailureWatch.prog or "focalnet"


def end_process(status: int) -> None:
    """Ends this process at once with `status` (no exit handlers, no JAX shutdown barrier), its
    output flushed. In a process group, a process other than 0 says in the store that it leaves;
    process 0, whose end takes the group's store with it (a process still there would end with
    JAX's abort), first waits up to `wait_s` seconds for every other to have said so, then half a
    second for them to be gone."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    client = _group_client()
    with contextlib.suppress(Exception):  # the store gone: nobody left to wait for
        if client is not None and jax.process_index():
            client.key_value_set(f"{_LEFT}{jax.process_index()}", "left")
        elif client is not None:
            deadline = time.monotonic() + _FailureWatch.wait_s
            for process in range(1, jax.process_count()):
                remaining_ms = max(1, int((deadline - time.monotonic()) * 1000))
                client.blocking_key_value_get(f"{_LEFT}{process}", remaining_ms)
            time.sleep(0.5)
    os._exit(status)


def _reason(error: BaseException) -> str:
    """One line saying why a command (or a `together` block) failed: the message of its printed
    line (a user error's, an interruption's: "stopped by SIGTERM at step ..."), else type and
    message."""
    if isinstance(error, PrintedExit):
        return error.message
    if isinstance(error, SystemExit):
        return f"exit status {error.code}"
    text = str(error) if is_user_error(error) else f"{type(error).__name__}: {error}"
    return " ".join(text.split())


def _first_other_failure(client) -> tuple[int, str] | None:
    """(process, reason) of the first failure another process of the group notified this one
    of (`_notify_group`); None where none did, or the group's store cannot be read."""
    try:
        notice = client.key_value_try_get(f"{_NOTICE}{jax.process_index()}")
    except Exception:  # no notice (NOT_FOUND), or the group's store gone
        return None
    if notice == "exit":  # woken at this process's exit: nobody failed before it
        return None
    process, reason = notice.split(" ", 1)
    return int(process), reason


@contextlib.contextmanager
def leave_group_on_failure(prog: str, wait_s: float = FAILURE_WAIT_S):
    """Around a command whose failures have been printed (`errors.one_line_user_errors` inside
    it): in a process group, a failure (an exception, a non-zero `SystemExit`) is notified to
    every other process (`_notify_group`), then waits up to `wait_s` seconds at a barrier for every
    process to fail too, and leaves as usual; when the others do not come (they wait for this
    one in a collective), the process ends at once with its status without JAX's shutdown
    barrier. An exception there is printed as its traceback, but where another process
    notified this one of its failure (this one's collective failed with it) as one line of `prog`
    naming that process and its reason. Only for a command that ends its process (`os._exit`)."""
    _FailureWatch.prog, _FailureWatch.wait_s = prog, wait_s
    watch_for_group_failures()
    try:
        yield
    except BaseException as error:
        client = _group_client()
        status = error.code if isinstance(error, SystemExit) else 1
        if client is None or not status:
            raise
        if not _FailureWatch.claim("failure"):  # the watch is ending this process
            time.sleep(2 * wait_s + 10)
            raise
        _notify_group(client, _reason(error))
        try:
            client.wait_at_barrier("focalnet_command_failed", int(wait_s * 1000))
        except Exception:  # timed out, or the group is gone: this process failed alone
            first = None if isinstance(error, SystemExit) else _first_other_failure(client)
            if first is not None:
                print(
                    f"{prog}: error: process {first[0]} failed ({first[1]}); this process "
                    f"stopped with it ({_reason(error)})",
                    file=sys.stderr,
                )
            elif not isinstance(error, SystemExit):
                traceback.print_exception(error)
            end_process(status if isinstance(status, int) else 1)
        raise


# Seconds a process waits for the others' outcomes of a `together` block.
OUTCOME_WAIT_S = 600.0
_together_blocks = itertools.count()  # the same sequence in every process of a group


@contextlib.contextmanager
def together(what: str, wait_s: float = OUTCOME_WAIT_S):
    """Around work that may fail in one process alone and that holds no collective: in a process
    group every process leaves it failing when any one failed in it. Each process records its
    outcome in the group's key-value store; a process that failed raises its own error, the others
    a `UserError` "process <i> could not <what>: <its error>" (the first failed process), so that
    every one fails together (`leave_group_on_failure`). No-op in a single process."""
    client = _group_client() if jax.process_count() > 1 else None
    if client is None:
        yield
        return
    prefix = f"focalnet_together/{next(_together_blocks)}/"
    try:
        yield
    except BaseException as error:
        # Unrecorded (the group's service gone), this process still ends with its own error.
        with contextlib.suppress(Exception):
            client.key_value_set(prefix + str(jax.process_index()), "failed: " + _reason(error))
        raise
    client.key_value_set(prefix + str(jax.process_index()), "ok")
    for process in range(jax.process_count()):
        try:
            outcome = client.blocking_key_value_get(prefix + str(process), int(wait_s * 1000))
        except Exception as error:  # timed out, or the group's service gone
            reason = str(error).replace("\n", " ")
            raise UserError(
                f"process {process} did not say whether it could {what} (waited up to "
                f"{wait_s:.0f} s: {reason})"
            ) from error
        if outcome != "ok":
            reason = outcome.removeprefix("failed: ")
            raise UserError(f"process {process} could not {what}: {reason}")


def process0_value(value: str, wait_s: float = OUTCOME_WAIT_S) -> str:
    """Process 0's `value` (a text every process of the group computes, e.g. its config), passed
    through the group's key-value store; this process's own outside a group. Every process calls
    it at the same point (the keys follow one sequence)."""
    client = _group_client() if jax.process_count() > 1 else None
    if client is None:
        return value
    key = f"focalnet_process0/{next(_together_blocks)}"
    if jax.process_index() == 0:
        client.key_value_set(key, value)
        return value
    return client.blocking_key_value_get(key, int(wait_s * 1000))
