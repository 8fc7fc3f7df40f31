"""What the damaged-checkpoint tests share: the module-scoped `trained` run (a test module takes
it as `trained = damaged_checkpoints.trained`), its flags (`RUN`), a copy of it whose step 4 got a
damage (`copy_with`) and the damages both files use. `_truncate_data` and `_overwrite_data` keep
their names: they are the ids of the tests parametrized with them."""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import pytest
from test_train_helpers import FakeStore, tiny_config

from focalnet_jax.training import train_and_evaluate

RUN = [
    "--config.train.checkpoint_every=2",
    "--config.train.keep_checkpoints=10",
    "--config.train.steps=4",
    "--config.loss.mfl=false",  # what a checkpoint holds does not depend on the loss
]
DATA_DIR = "default/ocdbt.process_0/d"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`workdir`: 4 steps with checkpoints at 2 and 4; `final`: its state at step 4."""
    root = tmp_path_factory.mktemp("recovery")
    store = FakeStore()
    config = tiny_config(overrides=RUN)
    final = jax.device_get(train_and_evaluate(config, root / "run", store=store))
    return {"root": root, "workdir": root / "run", "store": store, "config": config, "final": final}


def largest_data_file(step_dir: Path) -> Path:
    return max((step_dir / DATA_DIR).iterdir(), key=lambda p: p.stat().st_size)


def truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


def _truncate_data(step_dir: Path) -> str:
    path = largest_data_file(step_dir)
    truncate(path, path.stat().st_size // 2)
    return f"{path.relative_to(step_dir)}: truncated ({path.stat().st_size} bytes"


def _overwrite_data(step_dir: Path) -> str:
    """4 KiB of zeros in the middle of the largest data file: the size stays, the content not."""
    path = largest_data_file(step_dir)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = bytes(min(4096, len(data) - middle))
    path.write_bytes(bytes(data))
    return f"{path.relative_to(step_dir)}: content changed since it was saved (sha256 differs)"


def copy_with(trained, name: str, damage) -> tuple[Path, str]:
    """A copy of the trained workdir whose step 4 got `damage`; the expected file and reason."""
    workdir = trained["root"] / name
    shutil.copytree(trained["workdir"], workdir)
    return workdir, damage(workdir / "checkpoints" / "4")
