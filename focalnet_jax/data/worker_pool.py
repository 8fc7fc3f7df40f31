"""A `spawn` process pool for per-case work that Ctrl-C and SIGTERM stop cleanly
(`worker_results`).

- Ctrl-C or SIGTERM while the pool is being built waits until it stands, then stops it like any
  other interrupt: raised inside `Pool()` it left the workers and the thread that respawns them
  running, with nothing to terminate them.
- Workers ignore Ctrl-C (it reaches the whole process group; the parent stops them, without a
  traceback from each).
- SIGTERM to the whole process group (`kill -- -PGID`, a container stop, a job script's trap)
  reaches every worker. Within a case it ends the worker at once (a Python handler would wait
  until a read in C++, e.g. SimpleITK's, returns: a FIFO or a hung network file system never
  does). Between cases a worker holds a lock of the pool's queues: waiting for its next case it
  holds the task queue's, sending a result the result queue's. Killed there it left the lock taken
  (and a half-sent result), and the parent's `Pool.terminate` waited for ever; so there SIGTERM
  unwinds the worker, releasing the lock, once a result being sent is sent (`_exit_on_sigterm`).
- A pool whose work is done is closed, not terminated: its workers leave on the pool's sentinel,
  with no signal (`stop_pool`). A SIGTERM that reaches a worker just before it blocks on the task
  queue's lock is handled only once that wait returns (CPython's semaphore wait checks signals
  only when interrupted), which it never does while the terminating parent holds that lock (3 of
  100 runs of `preprocess --workers 2` on 2 cases hung so at their end). Where the pool must be
  terminated (an error or an interrupt), a worker still alive after `_RESEND_S` gets SIGTERM
  again, which interrupts the wait.
- A worker that dies (a crash in a reader, the kernel's out-of-memory killer) loses the job it
  had: `multiprocessing.Pool` replaces the worker and waits for that result for ever. Each worker
  notes the job it works on in a file named by its pid, and the parent, waiting, looks for a
  worker that ended every `_POLL_S`: `WorkerDiedError` names its job and how it ended, or, where
  the caller gives `lost`, what `lost` makes of the job stands for its result and the other jobs
  go on (in a new worker the pool starts).
- An exception of a job reaches the parent as itself, the worker's traceback its `__cause__`
  (`multiprocessing`'s `RemoteTraceback`). One that does not survive pickling (e.g. one whose
  `__init__` takes other arguments than its `args`) stopped the pool's result thread, the parent
  waiting for ever: it comes as a `WorkerError` naming its type and message (`_run_case`).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import multiprocessing
import os
import signal
import tempfile
import threading
import time
from multiprocessing import resource_tracker
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import SimpleITK as sitk

from focalnet_jax.data.deferred_signals import DEFERRED, signals_deferred

# Functions of multiprocessing/connection.py that write a message to a pipe.
_SENDING = frozenset({"send", "send_bytes", "_send", "_send_bytes"})
_RETRY_S = 0.02  # how soon a SIGTERM deferred during a send is acted on
_RESEND_S = 0.5  # how often a terminated pool's workers still alive get SIGTERM again
_POLL_S = 1.0  # how often the parent, waiting for a result, looks for a worker that died
_JOB_NOTES: Path | None = None  # in a worker: the folder where it notes its job (`_run_case`)


class WorkerDiedError(RuntimeError):
    """Worker process `pid` ended while the pool ran: inside job `index` of `worker_results`'s
    `jobs` (None: between jobs, or its job unknown), as `how` says (e.g. 'killed by SIGSEGV',
    'exit status 3')."""

    def __init__(self, index: int | None, how: str, pid: int | None = None):
        self.index, self.how, self.pid = index, how, pid
        where = f"in job {index}" if index is not None else "in no job it noted"
        super().__init__(f"a worker process ended {where} ({how})")


class WorkerError(RuntimeError):
    """A job's exception that cannot be sent from its worker process as itself: '<type>:
    <message>', the worker's traceback its `__cause__`."""


def _within(frame, file: str, functions: frozenset) -> bool:
    """Whether `frame` (the one a signal interrupted) or a caller runs one of `functions` of the
    standard library's module `file`."""
    while frame is not None:
        code = frame.f_code
        if code.co_name in functions and Path(code.co_filename).name == file:
            return True
        frame = frame.f_back
    return False


def _exit_on_sigterm(signum, frame) -> None:
    """In the pool's loop (`multiprocessing.pool.worker`), unwinds the worker (`SystemExit`: its
    locks released), after the message it is sending, if any (retried by SIGALRM every
    `_RETRY_S`; a SIGTERM during the send is deferred the same way); elsewhere (exiting) ends it
    at once. Once it has acted, SIGTERM takes its default action: a second one ends the worker."""
    if _within(frame, "connection.py", _SENDING):
        signal.signal(signal.SIGALRM, _exit_on_sigterm)
        signal.setitimer(signal.ITIMER_REAL, _RETRY_S)
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if _within(frame, "pool.py", frozenset({"worker"})):
        raise SystemExit(128 + signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)  # no lock held: an exception would print as ignored


def _init_worker(job_notes: str | None = None) -> None:
    """A worker's setup; `job_notes`: the folder where `_run_case` notes its job."""
    global _JOB_NOTES
    _JOB_NOTES = Path(job_notes) if job_notes else None
    # A worker starts with the parent's signals held (inherited while the pool was built):
    # ignoring SIGINT first drops a pending one; a pending SIGTERM (the pool's terminate) then
    # ends the worker once unblocked.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, DEFERRED)
    # One core per worker process: SimpleITK would otherwise start a thread per core in each.
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def _run_case(work, indexed_job):
    """`(index, work(job))` of `(index, job)` in a worker, its index noted meanwhile
    (`_JOB_NOTES`): SIGTERM ends the worker at once within, unwinds it outside. An exception of
    `work` that would not survive pickling is raised as a `WorkerError`."""
    index, job = indexed_job
    _note_job(str(index))
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        return index, work(job)
    except Exception as error:
        if _survives_pickling(error):
            raise
        raise WorkerError(f"{type(error).__name__}: {error}") from error
    finally:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        _note_job("")


def _survives_pickling(error: Exception) -> bool:
    """Whether `error` is rebuilt from its pickle, as the parent receives a worker's result."""
    try:
        ForkingPickler.loads(ForkingPickler.dumps(error))
    except Exception:
        return False
    return True


def _note_job(text: str) -> None:
    """In a worker: `text` (a job's index, '' between jobs) as its note in `_JOB_NOTES`; a note
    that cannot be written (a full temporary folder) leaves the job unnamed, the work going on."""
    if _JOB_NOTES is not None:
        with contextlib.suppress(OSError):
            (_JOB_NOTES / str(os.getpid())).write_text(text)


@contextlib.contextmanager
def _signals_deferred():
    """`deferred_signals.signals_deferred` for building or stopping the pool: processes started
    in the block inherit both signals blocked (their mask, set by `_init_worker`)."""
    # multiprocessing's resource tracker, started with the pool's first lock, unblocks both
    # signals after starting (bpo-33613): start it before blocking them.
    resource_tracker.ensure_running()
    with signals_deferred():
        yield


@contextlib.contextmanager
def worker_results(work, jobs: list, workers: int, lost=None, notes_in: Path | None = None):
    """Yield `work(job)` for each of `jobs` in input order: computed in this process (1 worker)
    or in a `spawn` pool of `workers` processes, closed when all are consumed, else terminated.
    `work` is a module-level function (it is pickled to the workers). A worker that dies in a job
    raises `WorkerDiedError` while the results are read; or, given `lost`, `lost(index, how)`
    (e.g. 'killed by SIGKILL') is yielded as that job's result and the others go on. The
    workers note their jobs in a temporary folder inside `notes_in` (default: the system's)."""
    if workers == 1:
        yield map(work, jobs)
        return
    pool, failed, lost_jobs = None, True, []
    with tempfile.TemporaryDirectory(prefix="focalnet-workers-", dir=notes_in) as notes:
        try:
            with _signals_deferred():  # raised once `pool` is set, so that it is terminated
                pool = multiprocessing.get_context("spawn").Pool(
                    workers, initializer=_init_worker, initargs=(notes,)
                )
            indexed = pool.imap_unordered(
                functools.partial(_run_case, work), enumerate(jobs), chunksize=1
            )
            yield _watched(indexed, len(jobs), pool, Path(notes), lost, lost_jobs)
            failed = False
        finally:
            if pool is not None:
                # A signal meanwhile would be raised inside a finalizer of the pool's (which
                # prints it and goes on); it is raised once they have run. A pool that lost a
                # job is terminated: closed, it would wait for that job's result for ever.
                with _signals_deferred():
                    stop_pool(pool, terminate=failed or bool(lost_jobs))
                    pool = None
                    gc.collect()  # the workers' finalizers (closing their pipes) run now


def _watched(results, count: int, pool, notes: Path, lost, lost_jobs: list):
    """The results of jobs 0 .. `count` - 1 in input order, from `results` (`pool`'s
    `imap_unordered` of (index, result)). Once a worker of `pool` has ended (while the pool runs,
    none ends but by dying: one the pool still lists or listed when looked at, or one whose note
    in `notes` names a job while its process is gone, the pool replacing a dead worker within
    0.1 s), `WorkerDiedError`; or, where `lost` is given and the job is known, `lost(index, how)`
    stands for the job's result, and the job is appended to `lost_jobs`."""
    seen: dict = {}  # pid -> process: every worker looked at, also one the pool has replaced since
    gone: set[int] = set()  # pids of the workers whose death was dealt with
    arrived: dict = {}  # index -> result, of jobs done before an earlier one
    looked = time.monotonic()
    for index in range(count):
        while index not in arrived:
            seen |= {p.pid: p for p in pool._pool if p.pid not in gone}  # no public accessor
            with contextlib.suppress(multiprocessing.TimeoutError):
                done, result = results.next(timeout=_POLL_S)
                arrived[done] = result
            # Looked for every _POLL_S while results keep coming, not only once they stop: a
            # lost job is found while the later jobs' results, held until it, are few.
            if index in arrived or time.monotonic() - looked < _POLL_S:
                continue
            looked = time.monotonic()
            if (died := _died(seen, notes)) is None:
                continue
            if lost is None or died.index is None:
                raise died
            arrived[died.index] = lost(died.index, died.how)
            lost_jobs.append(died.index)
            gone.add(died.pid)
            seen.pop(died.pid, None)
            (notes / str(died.pid)).unlink(missing_ok=True)
        yield arrived.pop(index)


def _died(seen: dict, notes: Path) -> WorkerDiedError | None:
    """The first worker found ended: of `seen` (pid -> process), or noted in `notes` in a job
    with no process left."""
    for pid, process in seen.items():
        if process.exitcode is not None:
            return WorkerDiedError(_noted_job(notes, pid), _how(process.exitcode), pid)
    for note in notes.iterdir():
        job = _noted_job(notes, int(note.name))
        if job is not None and not _exists(int(note.name)):
            return WorkerDiedError(job, _how(None), int(note.name))
    return None


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _noted_job(notes: Path, pid: int) -> int | None:
    """The job worker `pid` noted it works on (None: none, or between jobs)."""
    note = notes / str(pid)
    text = note.read_text() if note.is_file() else ""
    return int(text) if text else None


def _how(exitcode: int | None) -> str:
    """'killed by SIGKILL' for -9, 'exit status 3' for 3 (a process's `exitcode`), 'exit status
    unknown' for None (its process was reaped by the pool)."""
    if exitcode is None:
        return "exit status unknown"
    if exitcode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-exitcode).name}"
        return f"killed by signal {-exitcode}"
    return f"exit status {exitcode}"


def stop_pool(pool, *, terminate: bool) -> None:
    """Ends `pool` (a `multiprocessing.pool.Pool` of `_init_worker` workers) and waits for its
    workers: closed, they finish the cases sent and leave on the pool's sentinel; terminated
    (`terminate`), SIGTERM ends them, sent again while one is alive (module docstring)."""
    if not terminate:
        pool.close()
        pool.join()
        return
    stopped = threading.Event()
    resender = threading.Thread(target=_resend_sigterm, args=(pool, stopped), daemon=True)
    resender.start()
    try:
        pool.terminate()
        pool.join()
    finally:
        stopped.set()
        resender.join()


def _resend_sigterm(pool, stopped: threading.Event) -> None:
    """Every `_RESEND_S` until `stopped`: SIGTERM to each worker of `pool` still alive."""
    while not stopped.wait(_RESEND_S):
        for process in list(pool._pool):  # the pool's processes (no public accessor)
            if process.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)
