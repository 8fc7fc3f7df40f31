"""The preprocessing worker pool ends without hanging: closed when its work is done (no signal),
and when terminated, a worker that missed its SIGTERM gets it again."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from focalnet_jax.data import worker_pool
from focalnet_jax.data.worker_pool import WorkerDiedError, WorkerError, stop_pool, worker_results


def _spawn_pool(initializer=worker_pool._init_worker, initargs=()):
    return multiprocessing.get_context("spawn").Pool(2, initializer=initializer, initargs=initargs)


def test_results_come_in_input_order():
    with worker_results(abs, [-3, 1, -2, 5], 2) as results:
        assert list(results) == [3, 1, 2, 5]
    with worker_results(abs, [-3, 1], 1) as results:
        assert list(results) == [3, 1]


def test_a_pool_whose_work_is_done_is_closed_without_a_signal():
    """Terminating a finished pool signalled its idle workers; one signalled just before it
    blocked on the task queue's lock never woke (3 of 100 `preprocess --workers 2` runs hung at
    their end). Closed, its workers leave on the pool's sentinel, exit status 0."""
    pool = _spawn_pool()
    assert pool.map(abs, [-1, -2, -3]) == [1, 2, 3]
    processes = list(pool._pool)
    stop_pool(pool, terminate=False)
    assert [p.exitcode for p in processes] == [0, 0]


def _init_losing_first_sigterm(ready: str) -> None:
    """`_init_worker`, then a worker that waits and drops its first SIGTERM, as one whose SIGTERM
    reached it just before it blocked on the task queue's lock (handled once that wait returns:
    never, while the terminating parent holds the lock)."""
    worker_pool._init_worker()

    def lose(signum, frame):
        signal.signal(signal.SIGTERM, worker_pool._exit_on_sigterm)

    signal.signal(signal.SIGTERM, lose)
    Path(ready, str(os.getpid())).touch()
    time.sleep(600)  # resumed after `lose`; the next SIGTERM unwinds the worker


def test_a_terminated_pool_sends_sigterm_again_to_a_worker_that_missed_it(tmp_path):
    pool = _spawn_pool(_init_losing_first_sigterm, (str(tmp_path),))
    processes = list(pool._pool)
    deadline = time.monotonic() + 60
    while len(list(tmp_path.iterdir())) < 2:  # both workers initialised
        assert time.monotonic() < deadline, "the workers did not start"
        time.sleep(0.05)
    stopping = threading.Thread(target=stop_pool, args=(pool,), kwargs={"terminate": True})
    stopping.start()
    stopping.join(timeout=30)
    try:
        assert not stopping.is_alive(), "terminate waited for ever for a worker"
        assert all(p.exitcode not in (None, 0) for p in processes)  # ended by SIGTERM
    finally:
        for process in processes:
            if process.exitcode is None:
                process.kill()


def _ends_its_worker_on_3(job: int) -> int:
    if job == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer, or a crash
    return job


def test_a_worker_that_dies_in_a_job_is_reported_not_waited_for():
    """`multiprocessing.Pool` replaces a worker that died and waits for its job's result for
    ever; the results name the job and how its worker ended."""
    outcome = {}

    def consume():
        try:
            with worker_results(_ends_its_worker_on_3, [0, 1, 2, 3, 4], 2) as results:
                outcome["results"] = list(results)
        except WorkerDiedError as error:
            outcome["error"] = error

    consuming = threading.Thread(target=consume, daemon=True)
    consuming.start()
    consuming.join(timeout=60)
    assert not consuming.is_alive(), "the results waited for ever for the lost job"
    error = outcome["error"]
    assert (error.index, error.how) == (3, "killed by SIGKILL")
    assert str(error) == "a worker process ended in job 3 (killed by SIGKILL)"


def test_a_job_lost_with_its_worker_is_given_lost_s_result_and_the_others_go_on():
    """Given `lost`, the job whose worker died yields `lost(index, how)` in its place, the jobs
    after it are done by the worker the pool starts, in input order, and the pool stops."""
    outcome = {}

    def consume():
        lost = lambda index, how: ("lost", index, how)  # noqa: E731
        with worker_results(_ends_its_worker_on_3, list(range(8)), 2, lost) as results:
            outcome["results"] = list(results)

    consuming = threading.Thread(target=consume, daemon=True)
    consuming.start()
    consuming.join(timeout=60)
    assert not consuming.is_alive(), "the results or the pool's end waited for the lost job"
    assert outcome["results"] == [0, 1, 2, ("lost", 3, "killed by SIGKILL"), 4, 5, 6, 7]


def _slow_job_ending_its_worker_on_3(job: tuple[int, str]) -> int:
    index, done = job
    if index == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.2)
    (Path(done) / str(index)).touch()
    return index


def test_a_dead_worker_is_found_while_the_other_jobs_keep_finishing(tmp_path):
    """Looked for only once no result came for a second, a dead worker was found when nearly
    every other job was done, their results held in memory until the lost one (60 jobs of
    0.2 s, 2 workers: found after 9 s, 59 jobs done). Now within about a second."""
    jobs = [(k, str(tmp_path)) for k in range(60)]
    with pytest.raises(WorkerDiedError) as died:
        with worker_results(_slow_job_ending_its_worker_on_3, jobs, 2) as results:
            list(results)
    assert died.value.index == 3
    done = len(list(tmp_path.iterdir()))
    assert done <= 30, f"{done} of 59 jobs were done before the lost one was noticed"


class _Unsendable(Exception):
    """Its pickle is rebuilt as `_Unsendable(message)`, which its `__init__` refuses."""

    def __init__(self, what: str, why: str):
        super().__init__(f"{what}: {why}")


def _fails_on_1(job: int) -> int:
    if job == 1:
        raise _Unsendable("job 1", "a bug")
    if job == 2:
        return len(job)  # TypeError
    return job


def test_a_job_s_exception_reaches_the_parent_with_the_worker_s_traceback():
    """An exception whose pickle cannot be rebuilt stopped the pool's result thread, and the
    results waited for ever; it comes as a `WorkerError` naming it, and another as itself, each
    with the worker's traceback as its cause."""
    outcome = {}

    def consume(jobs):
        try:
            with worker_results(_fails_on_1, jobs, 2) as results:
                outcome["results"] = list(results)
        except Exception as error:
            outcome["error"] = error

    for jobs, kind, message, line in [
        (
            [0, 1, 3],
            WorkerError,
            "_Unsendable: job 1: a bug",
            'raise _Unsendable("job 1", "a bug")',
        ),
        ([0, 2, 3], TypeError, "object of type 'int' has no len()", "return len(job)"),
    ]:
        outcome.clear()
        consuming = threading.Thread(target=consume, args=(jobs,), daemon=True)
        consuming.start()
        consuming.join(timeout=60)
        assert not consuming.is_alive(), "the results waited for ever for the failed job"
        error = outcome["error"]
        assert type(error) is kind and str(error) == message
        worker = str(error.__cause__)  # multiprocessing's RemoteTraceback
        assert "in _fails_on_1" in worker and line in worker, worker
