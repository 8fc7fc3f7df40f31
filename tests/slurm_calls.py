"""What the SLURM study tests share: the `cluster` fixture (a one-node cluster of
tests/slurm_cluster.py for one test; a test module takes it as `cluster = slurm_calls.cluster`),
the cells of the array tasks in the queue (`queued_cells`), a poll until a condition holds
(`wait_for`) and a file's text, empty while it is absent (`text`)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from slurm_cluster import OneNodeCluster
from study_calls import require_slurm


@pytest.fixture
def cluster(tmp_path):
    require_slurm()
    started = OneNodeCluster(tmp_path / "cluster")
    try:
        yield started.start()
    finally:
        started.stop()


def queued_cells(workdir: Path, env: dict) -> list[str]:
    """The cell of every array task in the queue (from each job's task list)."""
    listed = subprocess.run(
        ["squeue", "-h", "-r", "-o", "%i"], env=env, capture_output=True, text=True, check=True
    )
    cells = []
    for job in json.loads((workdir / "slurm" / "jobs.json").read_text()):
        for index, name in enumerate(job["cells"]):
            cells += [name] if f"{job['job_id']}_{index}" in listed.stdout.split() else []
    return cells


def text(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


def wait_for(condition, stage: str, detail=lambda: "", timeout_s=600.0, task=None) -> None:
    """Polls `condition()` every 0.2 s until it holds; fails naming `stage` (with `detail()`)
    after `timeout_s` (generous: a loaded machine starts and stops tasks slowly), or at once
    when job `task` ((job id, env)) has left the queue (its task failed: it will not hold)."""
    deadline = checked = time.time()
    deadline += timeout_s
    while not condition():
        assert time.time() < deadline, (f"{stage}: not within {timeout_s:.0f} s", detail())
        if task and time.time() > checked + 5:
            checked = time.time()
            assert _in_queue(*task) or condition(), (f"{stage}: the job left the queue", detail())
        time.sleep(0.2)


def _in_queue(job: str, env: dict) -> bool:
    """Whether `job` is in the queue (pending, running or completing); True while unknown."""
    listed = ["squeue", "-h", "-o", "%i", "-j", job]
    queued = subprocess.run(listed, env=env, capture_output=True, text=True)
    if queued.returncode == 0:
        return bool(queued.stdout.strip())  # nothing listed: ended, slurmctld still knows it
    return "Invalid job id" not in queued.stderr  # not known any more: ended
