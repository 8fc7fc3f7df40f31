"""The cells of a study folder and their state.

Layout of a study folder DIR:

- `DIR/study.json`: the validated spec (`spec.validate`), written by the first `study run`;
- `DIR/<arm>/rep<r>/fold<k>/`: one training run (`focalnet train` workdir) with its evaluation in
  `eval/` (`metrics.json`, `predictions/`), its state in `study_cell.json` and its output in
  `cell.log`;
- `DIR/<ensemble>/rep<r>/fold<k>/eval/`: the ensemble's averaged predictions and metrics;
- `DIR/slurm/`: job array scripts, task lists, `jobs.json` and the tasks' SLURM output;
- `DIR/report/`: `focalnet study report`.

A cell's state: `done` (its state file says so and `eval/metrics.json` exists), `failed` (the last
attempt failed: the error and the log path are in the state file), `running` (a live process on
this host, or a process on another host that has not finished), `interrupted` (its process on
this host is gone without finishing: a re-run resumes it from its latest checkpoint), `pending`.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import time
from collections.abc import Mapping
from pathlib import Path

from focalnet_jax.data.atomic_files import write_json_atomic
from focalnet_jax.processes import pid_alive, pid_space
from focalnet_jax.study.spec import StudyError, seed_for

STUDY_FILE = "study.json"
STATE_FILE = "study_cell.json"
LOG_FILE = "cell.log"
METRICS_JSON = Path("eval") / "metrics.json"
PREDICTIONS = Path("eval") / "predictions"


def _read_study_file(path: Path) -> dict:
    """The spec recorded in `path`; a file that is not a JSON object is a `StudyError`."""
    try:
        plain = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise StudyError(f"{path}: not a readable study file ({error})") from None
    if not isinstance(plain, dict):
        raise StudyError(f"{path}: not a readable study file (expected a JSON object)")
    return plain


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


@dataclasses.dataclass(frozen=True)
class CellState:
    state: str  # done | failed | running | interrupted | pending
    record: dict  # the state file's contents ({} when there is none)


def _recorded_here(record: Mapping) -> bool:
    """Whether the pid of a running cell's state can be checked from this process: it was taken
    in this pid space (states written before the space was kept: on this host name)."""
    if "pid_space" in record:
        return record["pid_space"] == pid_space()
    return record.get("host") == socket.gethostname()


class Study:
    """A study folder: its validated spec (`plain`) and its cells."""

    def __init__(self, root: str | Path, plain: Mapping):
        self.root = Path(root)
        self.plain = dict(plain)

    @classmethod
    def open(cls, root: str | Path) -> Study:
        path = Path(root) / STUDY_FILE
        if not path.is_file():
            raise StudyError(f"{root}: not a study folder (no {STUDY_FILE}; run `study run`)")
        return cls(root, _read_study_file(path))

    @staticmethod
    def check_recorded(root: str | Path, plain: Mapping) -> bool:
        """Whether `root` records a study; raises when it records one other than `plain`."""
        path = Path(root) / STUDY_FILE
        if not path.is_file():
            return False
        recorded = _read_study_file(path)
        changed = sorted(
            k
            for k in set(recorded) | set(plain)
            if recorded.get(k) != plain.get(k) and k != "spec_file"  # where it was read
        )
        if changed:
            raise StudyError(
                f"{path}: this folder holds a study with other {changed}; use a new --workdir"
            )
        return True

    @classmethod
    def create(cls, root: str | Path, plain: Mapping) -> Study:
        """Record `plain` in `root`, or check that it equals the one recorded there."""
        if not cls.check_recorded(root, plain):
            write_json_atomic(dict(plain), Path(root) / STUDY_FILE)
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
        record = json.loads(state_file.read_text()) if state_file.is_file() else {}
        state = record.get("state", "pending")
        if state == "done" and not (path / METRICS_JSON).is_file():
            state = "pending"
        elif state == "running" and _recorded_here(record):
            if not pid_alive(int(record.get("pid", -1))):
                state = "interrupted"
        return CellState(state, record)

    def write_state(self, cell: Cell, state: str, **fields) -> None:
        record = {"state": state, "cell": cell.name, "time": time.time(), **fields}
        write_json_atomic(record, self.path(cell) / STATE_FILE)

    def log_path(self, cell: Cell) -> Path:
        return self.path(cell) / LOG_FILE
