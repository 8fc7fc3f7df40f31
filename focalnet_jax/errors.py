"""`UserError`: bad input or settings that the user can fix, as opposed to a bug.

`focalnet` prints a user error as one line, `focalnet <command>: error: <message>`, and exits with
status 2 (`UserErrorExit`; `--verbose` adds the traceback); any other exception keeps its
traceback. Raise it (every package error class that means bad input subclasses it) with a message
naming the case, file or setting and the reason. It is a `ValueError`, so callers that catch
`ValueError` keep working. `plural` words the counts of such messages.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import signal
import sys
import threading
import traceback
from pathlib import Path


class UserError(ValueError):
    """Input, files or settings the user must fix; the message says which and why."""


def plural(count: int, noun: str) -> str:
    """`count` and its (regular) noun as a message writes them: '1 patient', '0 patients'."""
    return f"{count} {noun if count == 1 else noun + 's'}"


class LayoutError(UserError):
    """The input folder or manifest as a whole cannot be read (names the path and the reason)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C whose message says what was kept (replacing `interrupted by Ctrl-C`)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a SLURM time limit) raised like Ctrl-C, so temporary files are removed.
    A message, where given, says what was done and replaces `interrupted by SIGTERM`."""


_SIGTERM_RAISED: list[bool] = []  # `sigterm_as_interrupt` raised `Terminated` in its block


def as_interrupt(error: BaseException) -> BaseException:
    """`error`, or `Terminated` where `sigterm_as_interrupt` raised one in code that turned it
    into an exception of its own (matplotlib's drawing ends in 'Invalid affine transformation
    matrix' when a signal handler raises inside it)."""
    if _SIGTERM_RAISED and not isinstance(error, KeyboardInterrupt):
        terminated = Terminated()
        terminated.__cause__ = error
        return terminated
    return error


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM raises `Terminated` in the main thread inside the block (the default handler ends
    the process at once, leaving temporary folders and orphaned worker processes behind); an
    exception that leaves the block after it was raised is that `Terminated` (`as_interrupt`)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):
        _SIGTERM_RAISED.append(True)
        raise Terminated()

    _raise.defer_in_collection = True  # `ctrl_c_never_dropped` keeps it pending in a collection

    def _dropped(unraisable):  # raised where Python drops it (a garbage-collector callback)
        if isinstance(unraisable.exc_value, Terminated):
            _SIGTERM_RAISED.clear()  # the command went on: a later error is its own
        previous_hook(unraisable)

    _SIGTERM_RAISED.clear()
    previous, previous_hook = signal.signal(signal.SIGTERM, _raise), sys.unraisablehook
    sys.unraisablehook = _dropped
    try:
        yield
    except Exception as error:
        if (stop := as_interrupt(error)) is not error:
            raise stop from error
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        sys.unraisablehook = previous_hook
        _SIGTERM_RAISED.clear()


_RETRY_S = 0.02  # how soon a Ctrl-C that came inside a garbage-collector callback is raised


@contextlib.contextmanager
def ctrl_c_never_dropped():
    """Ctrl-C raises `KeyboardInterrupt` as Python's own handler does, except during a collection
    of the garbage collector (JAX registers a callback of it; weakref callbacks and finalizers of
    its garbage run in it too), where Python prints an exception as ignored and drops it, and the
    command went on to its end with status 0: there it is kept pending and raised `_RETRY_S` later
    (SIGALRM), once the collection has ended, or when the block ends, whichever comes first. (A
    finalizer that a reference count reaching 0 runs, outside a collection, is not looked for.) A
    Ctrl-C ignored (a script's background job) stays ignored; off the main thread nothing
    changes. A SIGTERM that `sigterm_as_interrupt`, entered around this block, raises as
    `Terminated` is kept pending alike."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    pending, collecting = [], []

    def on_start(phase, info):  # the collector's first callback
        if phase == "start":
            collecting.append(True)

    def on_stop(phase, info):  # its last
        if phase == "stop":
            collecting.clear()

    def in_collection(frame) -> bool:
        return bool(collecting) or _in_gc_callback(frame)

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    # SIGTERM raised as `Terminated` (`sigterm_as_interrupt`, entered around this block) is kept
    # pending in a collection alike: dropped there, `kill` or a time limit went unheeded.
    on_term = signal.getsignal(signal.SIGTERM)
    deferred_term = getattr(on_term, "defer_in_collection", False)

    def deferring(handler):
        def on_signal(signum, frame):
            if in_collection(frame):
                pending.append((handler, signum))
                signal.setitimer(signal.ITIMER_REAL, _RETRY_S)
                return
            handler(signum, frame)

        return on_signal

    def on_sigalrm(signum, frame):
        if not pending:  # an alarm of someone else's: its default action
            signal.signal(signal.SIGALRM, previous)
            signal.raise_signal(signal.SIGALRM)
            return
        if in_collection(frame):
            signal.setitimer(signal.ITIMER_REAL, _RETRY_S)
            return
        handler, signum = pending[0]
        pending.clear()
        handler(signum, frame)

    previous = signal.signal(signal.SIGALRM, on_sigalrm)
    previous = signal.SIG_DFL if previous is None else previous
    signal.signal(signal.SIGINT, deferring(interrupt))
    if deferred_term:
        signal.signal(signal.SIGTERM, deferring(on_term))
    gc.callbacks.insert(0, on_start)
    gc.callbacks.append(on_stop)
    try:
        yield
    finally:
        gc.callbacks.remove(on_start)
        gc.callbacks.remove(on_stop)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if deferred_term:
            signal.signal(signal.SIGTERM, on_term)
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    if pending:  # the block ended before the alarm
        handler, signum = pending[0]
        handler(signum, None)


def _in_gc_callback(frame) -> bool:
    """Whether `frame` (where a signal came) or a caller runs one of `gc.callbacks`."""
    codes = {getattr(callback, "__code__", None) for callback in gc.callbacks}
    while frame is not None:
        if frame.f_code in codes:
            return True
        frame = frame.f_back
    return False


class PrintedExit(SystemExit):
    """Exit status `status` once `line`, `<prog>: <message>`, is on stderr; `str()` is the line,
    `message` what a process group tells its other processes."""

    def __init__(self, line: str, message: str, status: int):
        super().__init__(status)
        self.line, self.message = line, message

    def __str__(self) -> str:
        return self.line


class UserErrorExit(PrintedExit):
    """Exit status 2 once a user error's line `<prog>: error: <message>` is on stderr."""

    def __init__(self, line: str, message: str):
        super().__init__(line, message, 2)


# Errors of the file system the user fixes: no space, no quota, a read-only mount, a file size
# limit (`ulimit -f`).
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})
# A path that cannot be written for its permissions, or named at all (too long, a link loop).
PATH_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.ENAMETOOLONG, errno.ELOOP})


def is_user_error(error: BaseException) -> bool:
    """Whether `error` is the user's to fix: a `UserError` (every error class of the package that
    means bad input subclasses it), a missing, clashing or unwritable file, a file where a folder
    belongs (or the reverse), a full or read-only disk (`DISK_ERRNOS`), or a path refused for
    its permissions, length or a link loop (`PATH_ERRNOS`), where the error names the path (a
    `write` or `close` names none: `naming_the_disk`)."""
    if isinstance(error, UserError):
        return True
    file_errors = (FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError)
    if isinstance(error, (*file_errors, IsADirectoryError)):
        # The package's own message (no errno), or the system's naming the file; not a call on
        # no file (`os.kill` of another user's process, a semaphore), which names nothing.
        return error.errno is None or bool(error.filename)
    errnos = DISK_ERRNOS | PATH_ERRNOS
    return isinstance(error, OSError) and error.errno in errnos and bool(error.filename)


@contextlib.contextmanager
def naming_the_disk(path, temporary=None):
    """A full disk, quota or read-only mount met in the block by a call that names no file (a
    `write` or `close`) is raised again naming `path`, the output being written; one naming a
    file in (or at) `temporary`, where `path` is written before its rename, names that file at
    `path` instead (the temporary name is gone by the time the user reads it), also a folder
    that refuses the temporary for its permissions or a name too long."""
    try:
        yield
    except OSError as error:
        named_file = error.errno in PATH_ERRNOS and error.filename  # not `os.kill`'s EPERM
        if error.errno not in DISK_ERRNOS and not named_file:
            raise
        named = _output_name(error.filename, path, temporary)
        if named is None:
            raise
        raise OSError(error.errno, error.strerror, named) from error


def _output_name(filename, path, temporary) -> str | None:
    """`path` for an error naming no file, the file's name at `path` for one in `temporary`,
    None for another file (it names itself)."""
    if not filename:
        return str(path)
    if temporary is None:
        return None
    try:
        return str(Path(path) / Path(filename).relative_to(temporary))
    except ValueError:
        return None


@contextlib.contextmanager
def one_line_user_errors(prog: str, *, verbose: bool = False):
    """A user error (`is_user_error`) raised in the block is printed as `<prog>: error: <message>`
    on one line of stderr (after its traceback when `verbose`) and ends the program with exit
    status 2 (`UserErrorExit`); Ctrl-C or `Terminated` as `<prog>: interrupted by ...` (or
    `<prog>: <the Interrupted's or Terminated's message>`) with status 130 or 143
    (`PrintedExit`); any other exception passes unchanged."""
    try:
        yield
    except KeyboardInterrupt as interrupt:
        if verbose:
            traceback.print_exc()
        terminated = isinstance(interrupt, Terminated)
        message = str(interrupt) or f"interrupted by {'SIGTERM' if terminated else 'Ctrl-C'}"
        line = f"{prog}: {message}"
        print(line, file=sys.stderr)
        status = 128 + (signal.SIGTERM if terminated else signal.SIGINT)
        raise PrintedExit(line, message, status) from None
    except Exception as error:
        if not is_user_error(error):
            raise
        if verbose:
            traceback.print_exc()
        message = str(error).replace("\n", " ")
        line = f"{prog}: error: {message}"
        print(line, file=sys.stderr)
        raise UserErrorExit(line, message) from None
