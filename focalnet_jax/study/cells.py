"""The cells of a study folder and their state.

Layout of a study folder DIR:

- `DIR/study.json`: the validated spec (`spec.validate`), written by the first `study run`;
- `DIR/<arm>/rep<r>/fold<k>/`: one training run (`focalnet train` workdir) with its evaluation in
  `eval/` (`metrics.json`, `predictions/`), its state in `study_cell.json` and its output in
  `cell.log`;
- `DIR/<ensemble>/rep<r>/fold<k>/eval/`: the ensemble's averaged predictions and metrics;
- `DIR/slurm/`: job array scripts, task lists, `jobs.json` and the tasks' SLURM output;
- `DIR/.study-run.lock`: held (`flock`) by the one `study run` that may start or submit cells;
- `DIR/report/`: `focalnet study report`.

A cell's state: `done` (its state file says so and `eval/metrics.json` exists), `failed` (the last
attempt failed: the error and the log path are in the state file), `running` (a live process on
this host, or a process on another host that has not finished), `interrupted` (its process on
this host is gone without finishing: a re-run resumes it from its latest checkpoint), `pending`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from focalnet_jax.data.atomic_files import write_json_atomic
from focalnet_jax.file_lock import LockHeld, acquire_lock, release_lock
from focalnet_jax.processes import boot_id, pid_alive, pid_space
from focalnet_jax.study.inputs import INPUTS, check_inputs, input_digests
from focalnet_jax.study.spec import StudyError, check_fields, seed_for, with_absolute_paths

STUDY_FILE = "study.json"
STATE_FILE = "study_cell.json"
RUN_LOCK = ".study-run.lock"
LOG_FILE = "cell.log"
METRICS_JSON = Path("eval") / "metrics.json"
PREDICTIONS = Path("eval") / "predictions"


def read_json_file(
    path: Path,
    what: str,
    kind: type = dict,
    remedy: str = "",
    check: Callable[[Any], str | None] = lambda value: None,
):
    """The JSON value of the study's file `path`, a `kind`; one that cannot be read or parsed
    (cut short by a crash), holds another type, or whose value `check` finds a problem in (its
    text), is a `StudyError` naming it as `what`, with `remedy` (what to do) where given."""
    try:
        value = json.loads(path.read_text())
        wanted = {dict: "object", list: "array"}[kind]
        problem = None if isinstance(value, kind) else f"expected a JSON {wanted}"
        problem = problem or check(value)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        problem = str(error)
    if problem is None:
        return value
    raise StudyError(f"{path}: not a readable {what} ({problem}){remedy and f'; {remedy}'}")


# What `spec.validate` records and the study's commands read (`inputs`: where recorded).
RECORDED_FIELDS = (
    "base",
    "store",
    "repeats",
    "num_folds",
    "folds",
    "seed",
    "common",
    "arms",
    "ensembles",
    "evaluate",
    "slurm",
    "spec_file",
)


def _read_study_file(path: Path) -> dict:
    """The spec recorded in `path`; a file that is not a JSON object, or one without a field of
    `RECORDED_FIELDS` or with one of another type or out of range (`spec.check_fields`; another
    program's, or one edited by hand), is a `StudyError`."""
    recorded = read_json_file(path, "study file")
    try:
        if missing := [field for field in RECORDED_FIELDS if field not in recorded]:
            raise StudyError(f"no {', '.join(missing)}")
        for key in ("base", "store", "spec_file"):
            if not isinstance(recorded[key], str) or not recorded[key]:
                raise StudyError(f"{key}={recorded[key]!r}: expected a path")
        folds = check_fields(recorded, slurm=False)
    except StudyError as error:
        raise StudyError(
            f"{path}: not a readable study file ({error}); use a new --workdir"
        ) from None
    return {**recorded, "folds": folds}


GROWING = ("repeats", "folds", "arms", "ensembles")  # the fields that may add runs
# spec_file: where it was read; inputs: what it read, checked by `check_inputs`; slurm: where
# the cells run, not what they compute (a corrected time limit is recorded for the next run).
UNCOMPARED = ("spec_file", INPUTS, "slurm")


def added_runs(recorded: Mapping, plain: Mapping, where: Path) -> list[str]:
    """What `plain` adds to the `recorded` study (e.g. `['repeats 3 -> 4']`; [] when equal).

    A spec may grow a study: more repeats, more folds, new arms, new ensembles. The cells done
    stay valid, since their configs (common, the arm's overrides, seed, fold, store) are unchanged.
    Any other difference (fewer runs, an arm's or ensemble's new definition, `common`, `base`,
    `store`, `seed`, `num_folds`, ...) is a `StudyError` naming the fields: use a new --workdir.
    The `slurm` options may change (`UNCOMPARED`).
    """
    # A study recorded before its paths were made absolute compares as if they were.
    recorded = with_absolute_paths(recorded)
    changed = sorted(
        k
        for k in set(recorded) | set(plain)
        if recorded.get(k) != plain.get(k) and k not in UNCOMPARED
    )
    if set(changed) <= set(GROWING) and _only_adds(recorded, plain):
        grown = []
        if plain["repeats"] != recorded["repeats"]:
            grown.append(f"repeats {recorded['repeats']} -> {plain['repeats']}")
        for field in ("folds", "arms", "ensembles"):
            new = [item for item in plain[field] if item not in recorded[field]]
            grown += [f"{field} {new}"] if new else []
        return grown
    raise StudyError(
        f"{where}: this folder holds a study with other {changed}; use a new --workdir "
        "(a spec may only add repeats, folds, arms or ensembles)"
    )


def _only_adds(recorded: Mapping, plain: Mapping) -> bool:
    """Whether `plain` keeps every repeat, fold, arm and ensemble of `recorded` as it was."""
    return (
        plain["repeats"] >= recorded["repeats"]
        and set(recorded["folds"]) <= set(plain["folds"])
        and all(plain["arms"].get(a) == v for a, v in recorded["arms"].items())
        and all(plain["ensembles"].get(e) == v for e, v in recorded["ensembles"].items())
    )


@dataclasses.dataclass(frozen=True)
class Cell:
    """One (arm or ensemble, repeat, fold) of a study."""

    arm: str
    repeat: int
    fold: int
    ensemble: bool = False

    @property
    def name(self) -> str:
        return f"{self.arm}/rep{self.repeat}/fold{self.fold}"


STATES = ("done", "failed", "running", "interrupted", "pending")
NUMBERS = ("seconds", "total_seconds", "attempts", "time", "started", "pid", "child_pid")


@dataclasses.dataclass(frozen=True)
class CellState:
    state: str  # one of STATES
    record: dict  # the state file's contents ({} when there is none)
    # running, and its runner or `focalnet` command seen alive by pid (in this pid space)
    seen_alive: bool = False


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _state_problem(record: Mapping) -> str | None:
    """What is wrong with a cell state file's `record` (edited by hand, another program's): a
    state not in STATES, a time, count or pid (`NUMBERS`, `attempt_seconds`) that is no number."""
    if record.get("state", "pending") not in STATES:
        return f"state {record['state']!r}: expected one of {', '.join(STATES)}"
    if wrong := next((k for k in NUMBERS if k in record and not _is_number(record[k])), None):
        return f"{wrong} {record[wrong]!r}: expected a number"
    every = record.get("attempt_seconds", [])
    if not isinstance(every, list) or not all(_is_number(s) for s in every):
        return f"attempt_seconds {every!r}: expected a list of numbers"
    return None


def _recorded_here(record: Mapping) -> bool:
    """Whether the pid of a running cell's state can be checked from this process: it was taken
    in this pid space (states written before the space was kept: on this host name)."""
    if "pid_space" in record:
        return record["pid_space"] == pid_space()
    return record.get("host") == socket.gethostname()


def _rebooted_since(record: Mapping) -> bool:
    """Whether a running cell's state was written on this host (its name) in an earlier boot:
    its processes ended with that boot (a reboot, a crash), which its pid space alone cannot
    tell from another container's (so such a cell read as running for good)."""
    written, now = record.get("boot_id"), boot_id()
    return bool(written and now) and record.get("host") == socket.gethostname() and written != now


def _with_recorded_inputs(plain: Mapping, recorded: Mapping, path: Path) -> dict:
    """`plain` with the input digests `recorded` (the study.json at `path`) holds, checked
    against the inputs now (`check_inputs`: a `StudyError` names what changed)."""
    plain = {**plain, **({INPUTS: recorded[INPUTS]} if INPUTS in recorded else {})}
    check_inputs(plain, path)
    return plain


class Study:
    """A study folder: its validated spec (`plain`) and its cells."""

    def __init__(self, root: str | Path, plain: Mapping):
        self.root = Path(root).absolute()  # recorded paths (cell logs) read from any folder
        self.plain = dict(plain)

    @classmethod
    def open(cls, root: str | Path) -> Study:
        path = Path(root) / STUDY_FILE
        if not path.is_file():
            raise StudyError(f"{root}: not a study folder (no {STUDY_FILE}; run `study run`)")
        return cls(root, _read_study_file(path))

    @staticmethod
    def check_recorded(root: str | Path, plain: Mapping) -> dict:
        """What `create` would record, writing nothing: `plain`, with the recorded input digests
        where `root` records a study. Raises when `plain` is not that study or one that only adds
        runs to it (`added_runs`), or when its inputs changed since (`check_inputs`)."""
        path = Path(root) / STUDY_FILE
        if not path.is_file():
            return dict(plain)
        recorded = _read_study_file(path)
        added_runs(recorded, plain, path)
        return _with_recorded_inputs(plain, recorded, path)

    @classmethod
    def create(cls, root: str | Path, plain: Mapping) -> Study:
        """Record `plain` in `root` with the digests of its inputs (`input_digests`), or check
        that it equals the one recorded there or only adds runs to it and that its inputs are
        unchanged (`check_inputs`; then record it: the grown study, its recorded digests kept)."""
        path = Path(root) / STUDY_FILE
        if not path.is_file():
            plain = {**plain, INPUTS: input_digests(plain)}
            write_json_atomic(plain, path)
        else:
            recorded = _read_study_file(path)
            added = added_runs(recorded, plain, path)
            plain = _with_recorded_inputs(plain, recorded, path)  # before a grown one is written
            if added:
                print(f"{path}: study grows ({'; '.join(added)})")
            # A study recorded before its paths were made absolute is recorded with them.
            if added or any(recorded.get(k) != plain[k] for k in ("common", "arms", "slurm")):
                write_json_atomic(plain, path)
        return cls(root, plain)

    @property
    def arms(self) -> list[str]:
        return list(self.plain["arms"])

    @property
    def ensembles(self) -> dict[str, list[str]]:
        return dict(self.plain["ensembles"])

    def cells(self) -> list[Cell]:
        """Training cells, repeat-major then fold then arm: a partial study has whole repeats."""
        return [
            Cell(arm, r, k)
            for r in range(self.plain["repeats"])
            for k in self.plain["folds"]
            for arm in self.arms
        ]

    def ensemble_cells(self) -> list[Cell]:
        return [
            Cell(name, r, k, ensemble=True)
            for r in range(self.plain["repeats"])
            for k in self.plain["folds"]
            for name in self.ensembles
        ]

    def cell(self, name: str) -> Cell:
        """The training cell called `name` (`arm/rep<r>/fold<k>`)."""
        for cell in self.cells():
            if cell.name == name:
                return cell
        raise StudyError(f"{self.root}: no cell {name!r} in this study")

    def seed(self, cell: Cell) -> int:
        return seed_for(self.plain, cell.repeat)

    def path(self, cell: Cell) -> Path:
        return self.root / cell.name

    def state(self, cell: Cell) -> CellState:
        path = self.path(cell)
        state_file = path / STATE_FILE
        record = {}
        if state_file.is_file():
            remedy = "remove it, and `study run` runs the cell again (resuming its checkpoint)"
            record = read_json_file(state_file, "cell state file", dict, remedy, _state_problem)
        state, seen_alive = record.get("state", "pending"), False
        if state == "done" and not (path / METRICS_JSON).is_file():
            state = "pending"
        elif state == "running" and _recorded_here(record):
            # Its runner, or the `focalnet` command that runner started (left running when the
            # runner alone was killed: a second one would train in the same folder).
            processes = [("pid", "pid_started"), ("child_pid", "child_started")]
            seen_alive = any(
                pid_alive(int(record[pid]), record.get(started))
                for pid, started in processes
                if pid in record
            )
            state = "running" if seen_alive else "interrupted"
        elif state == "running" and _rebooted_since(record):
            state = "interrupted"
        return CellState(state, record, seen_alive)

    def write_state(self, cell: Cell, state: str, **fields) -> None:
        record = {"state": state, "cell": cell.name, "time": time.time(), **fields}
        write_json_atomic(record, self.path(cell) / STATE_FILE)

    def log_path(self, cell: Cell) -> Path:
        return self.path(cell) / LOG_FILE


@contextlib.contextmanager
def run_lock(root: str | Path) -> Iterator[IO[str]]:
    """Hold `root/.study-run.lock` (an exclusive `flock`, released when the process ends, also when
    killed) while one `study run` reads the cells' states and starts or submits those not done;
    a second `study run` on the same folder meanwhile would take the same cells for its own and
    train each twice in one folder. Yields the lock's open file (its `sbatch` shares it:
    `slurm.run_sbatch`). Raises `StudyError` naming the holder when it is held."""
    try:
        lock = acquire_lock(Path(root) / RUN_LOCK)
    except LockHeld as held:
        raise StudyError(
            f"{root}: another `study run` ({held.holder}) is starting or running this study's "
            "cells; wait for it to end (`study status` shows them)"
        ) from None
    try:
        yield lock
    finally:
        release_lock(lock)
