"""Shared fixtures. The real ProstateX exam lives in ../shared/data beside the checkout; tests that
need it skip where it is absent, and fail instead under FOCALNET_REQUIRE_REAL_DATA=1 (CI).

The session shares one persistent XLA compilation cache (`$JAX_COMPILATION_CACHE_DIR`, a temporary
folder made at the start and removed at the end; a value set before is kept): the test worker
processes and every child process they start then compile each of the tiny models' steps once
per session, not once per test. It keeps every compilation, also those under JAX's 1 s floor
(`JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0`, unless set before), most of the tiny models'
compilations. It has no size bound: with one, JAX takes a file lock and, at every write, reads
the size and last use of every entry, a cost that grows with the cache (two in-process files of
many small compilations, tests/test_models_upsample.py and tests/test_data_parallel_losses.py,
took 63 s with the bound against 36 s without). Without the lock a process may read an entry
another is still writing: JAX then warns and compiles it again, and that one warning is ignored
(`PYTHONWARNINGS`, in every child process too).
Tests that count compilations, or check where a command puts its own cache, take
`without_compilation_cache`.

XLA compiles with its most expensive optimisations off (`JAX_DISABLE_MOST_OPTIMIZATIONS=true`,
unless set before) in the test processes and every child process they start: the tiny models
compile in a fraction of the time, and the values are those of the same JAX program (the tests
compare against references with tolerances). For the same reason XLA's CPU backend emits its
fusions with its LLVM emitters rather than its MLIR ones (`--xla_cpu_use_fusion_emitters=false`
added to `XLA_FLAGS`, unless `XLA_FLAGS` already sets it): the tiny models' train steps compile in
about 60 % of the time (3.3 s against 5.5 s for one FL+MFL step on 2 cores). Outside the tests
(`make demo`, a benchmark run by hand) XLA keeps its defaults.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import warnings
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FOCALNET_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
CACHE_DIR, CACHE_MAX_SIZE = "JAX_COMPILATION_CACHE_DIR", "JAX_COMPILATION_CACHE_MAX_SIZE"
CACHE_MIN_TIME = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"
PARTIAL_ENTRY = "Error reading persistent compilation cache entry"  # JAX's warning
FAST_COMPILES = "JAX_DISABLE_MOST_OPTIMIZATIONS"
# A flag of XLA:CPU in jaxlib 0.10; a jaxlib without it stops at start-up, naming it as unknown.
FAST_FUSIONS = "--xla_cpu_use_fusion_emitters"
_CACHE_FOLDER = pytest.StashKey[str]()


def pytest_configure(config):
    # A shell without job control starts a background command with Ctrl-C ignored, and a child
    # process inherits that: the tests that send SIGINT to their children would see it do
    # nothing (one waited forever). A handler here makes it the default again in every child.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.setdefault(FAST_COMPILES, "true")  # before any test module imports jax
    os.environ.setdefault(CACHE_MIN_TIME, "0")
    flags = os.environ.get("XLA_FLAGS", "")
    if FAST_FUSIONS not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {FAST_FUSIONS}=false".strip()
    if CACHE_DIR in os.environ:  # the user's, or made by the xdist controller
        return
    folder = tempfile.mkdtemp(prefix="focalnet-tests-xla-cache-")
    config.stash[_CACHE_FOLDER] = folder
    os.environ[CACHE_DIR] = folder
    # A reader that meets an entry still being written (no size bound: no lock) warns and compiles.
    ignored = [os.environ.get("PYTHONWARNINGS"), f"ignore:{PARTIAL_ENTRY}"]
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, ignored))
    warnings.filterwarnings("ignore", PARTIAL_ENTRY)


# The files that run for minutes (multi-process and end-to-end runs), longest first (as measured
# by `make test`'s `--durations` on 2 cores; the parts of a file split by concept keep its place,
# the order that measured fastest). Under `pytest -n 2 --dist loadfile` each file goes
# whole to the next free worker, in collection order: started first, they share out evenly between
# the workers; in alphabetical order a long one started near the end and ran on alone.
LONG_FILES = (
    "test_benchmark_steps.py",
    "test_benchmarks.py",
    "test_benchmark_arguments.py",
    "test_train_loop.py",
    "test_train_loop_logs.py",
    "test_evaluation_inference.py",
    "test_evaluation_ensemble.py",
    "test_train_sigterm.py",
    "test_group_failures.py",
    "test_group_start.py",
    "test_launch_scripts.py",
    "test_study.py",
    "test_predict_resume.py",
    "test_predict_bad_cases.py",
    "test_train_configs.py",
    "test_checkpoint_recovery.py",
    "test_checkpoint_damage.py",
    "test_study_slurm_tasks.py",
    "test_study_slurm_submission.py",
    "test_study_attempts.py",
    "test_mfl_many.py",
    "test_train_demo.py",
)


def pytest_collection_modifyitems(items):
    """The `LONG_FILES` first, in that order; the order within each file is kept."""
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))


def pytest_unconfigure(config):
    folder = config.stash.get(_CACHE_FOLDER, None)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def without_compilation_cache(monkeypatch):
    """JAX's defaults (no persistent cache, no size bound) in this test and its child processes."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    for name in (CACHE_DIR, CACHE_MAX_SIZE, CACHE_MIN_TIME):
        monkeypatch.delenv(name, raising=False)
    defaults = {  # JAX's
        "jax_compilation_cache_dir": None,
        "jax_compilation_cache_max_size": -1,
        "jax_persistent_cache_min_compile_time_secs": 1.0,
    }
    previous = {key: getattr(jax.config, key) for key in defaults}
    compilation_cache.reset_cache()  # the cache reads its settings once, when first used
    for key, value in defaults.items():
        jax.config.update(key, value)
    yield
    compilation_cache.reset_cache()
    for key, value in previous.items():
        jax.config.update(key, value)


def _require_real_data() -> bool:
    return os.environ.get("FOCALNET_REQUIRE_REAL_DATA", "") not in ("", "0")


@pytest.fixture(scope="session")
def prostatex_case_dir() -> Path:
    """Folder of the ProstateX-0000 exam: `t2w/`, `adc/`, `hbv/` DICOM series."""
    path = SHARED_DATA / "prostatex" / "ProstateX-0000"
    if not (path / "t2w").is_dir():
        message = f"real ProstateX exam not found at {path}"
        if _require_real_data():
            pytest.fail(message + " (FOCALNET_REQUIRE_REAL_DATA=1)")
        pytest.skip(message)
    return path
