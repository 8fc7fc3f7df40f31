"""Checkpoints of a run directory: the resolved config and Orbax train-state checkpoints.

Layout of a workdir: `config.json` (the resolved config of the run), `checkpoints/<step>/` (Orbax,
the latest `train.keep_checkpoints` kept), `tb/` (TensorBoard events). Saves are collective: every
process calls `save`, Orbax writes each array once.

Damaged checkpoints: a step whose restore fails and whose files show the damage (a missing, empty
or truncated file, invalid JSON metadata) raises `UnreadableCheckpointError` naming the step
folder, the file and the reason. A resuming run (`resume`) moves such a step aside to
`checkpoints/corrupt-<step>/` (Orbax lists only all-digit folder names, so neither `latest_step`
nor keep-N garbage collection sees it again; nothing is deleted) and resumes from the newest
intact step. When no step is intact it refuses, moving nothing: starting from scratch would drop
all progress, so that takes the user moving `checkpoints/` away (or a new workdir).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from focalnet_jax.errors import UserError

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
ITEM_DIR = "default"  # the folder of the train state inside a step folder (Orbax's single item)
CORRUPT_PREFIX = "corrupt-"
# The JSON files Orbax writes into a step folder (relative paths; globs allowed).
_JSON_FILES = ("_CHECKPOINT_METADATA", f"{ITEM_DIR}/_METADATA", f"{ITEM_DIR}/_sharding")
_REQUIRED_FILES = (f"{ITEM_DIR}/_METADATA", f"{ITEM_DIR}/manifest.ocdbt")

log = logging.getLogger(__name__)


class UnreadableCheckpointError(ValueError):
    """A checkpoint step folder that cannot be restored: damaged files (message names them)."""

    def __init__(self, step_dir: Path, reason: str):
        self.step_dir, self.reason = Path(step_dir), reason
        super().__init__(f"checkpoint {step_dir} is unreadable: {reason}")


def save_config(config: ml_collections.ConfigDict, workdir: str | Path) -> Path:
    """Write the resolved config as `workdir/config.json` (process 0 only); returns the path."""
    path = Path(workdir) / CONFIG_FILE
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(config.to_json(indent=2, sort_keys=True) + "\n")
    return path


def read_config(workdir: str | Path) -> ml_collections.ConfigDict:
    """The config saved by `save_config` (lists where the original had tuples)."""
    path = Path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"workdir {workdir}: no {CONFIG_FILE} (not a training run directory)"
        )
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def make_manager(
    workdir: str | Path, *, keep: int | None = None, read_only: bool = False
) -> ocp.CheckpointManager:
    """Orbax manager for `workdir/checkpoints`, keeping the latest `keep` steps (None = all);
    `read_only` creates and deletes nothing."""
    directory = (Path(workdir) / CHECKPOINT_DIR).resolve()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=not read_only, read_only=read_only
    )
    return ocp.CheckpointManager(directory, options=options)


def save(manager: ocp.CheckpointManager, step: int, state) -> None:
    """Save `state` at `step` (asynchronous; `manager.wait_until_finished()` before exiting)."""
    manager.save(int(step), args=ocp.args.StandardSave(state))


def restore(manager: ocp.CheckpointManager, abstract_state, step: int | None = None):
    """Restore into `abstract_state` (ShapeDtypeStructs with shardings): arrays land placed.

    `step=None` = the latest. Returns None when the manager has no checkpoint. Raises
    `UnreadableCheckpointError` when the step's files are damaged; other failures (e.g. a state
    of another shape) propagate unchanged.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        return None
    try:
        return manager.restore(int(step), args=ocp.args.StandardRestore(abstract_state))
    except Exception as error:
        step_dir = Path(manager.directory) / str(step)
        damage = find_damage(step_dir)
        if damage is None:
            raise
        raise UnreadableCheckpointError(step_dir, damage) from error


def resume(manager: ocp.CheckpointManager, abstract_state):
    """The newest intact checkpoint restored into `abstract_state` (None when there is none).

    Damaged newer steps are moved aside to `corrupt-<step>/` and one warning names each (file and
    reason) and the step resumed from. Raises `UnreadableCheckpointError` naming every step, and
    moving nothing, when all are damaged.
    """
    unreadable = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            state = restore(manager, abstract_state, step)
        except UnreadableCheckpointError as error:
            unreadable.append(error)
            continue
        if unreadable:
            moved = [f"{error} (moved to {_move_aside(error.step_dir)})" for error in unreadable]
            manager.reload()
            if jax.process_index() == 0:
                log.warning("resuming from step %d: %s", step, "; ".join(moved))
        return state
    if unreadable:
        directory = Path(manager.directory)
        raise UnreadableCheckpointError(
            directory,
            "no step is intact ("
            + "; ".join(f"step {error.step_dir.name}: {error.reason}" for error in unreadable)
            + f"); nothing was moved or deleted; to train from scratch, move {directory} away "
            "or use another workdir",
        )
    return None


def _move_aside(step_dir: Path) -> Path:
    """Rename `step_dir` to `corrupt-<step>` beside it (process 0; atomic); returns the new path."""
    target = step_dir.with_name(f"{CORRUPT_PREFIX}{step_dir.name}")
    number = 1
    while target.exists():
        number += 1
        target = step_dir.with_name(f"{CORRUPT_PREFIX}{step_dir.name}.{number}")
    _sync(f"checkpoint_name_aside_{step_dir.name}")  # every process has seen the old names
    if jax.process_index() == 0:
        step_dir.rename(target)
    _sync(f"checkpoint_moved_aside_{step_dir.name}")
    return target


def _sync(name: str) -> None:
    """Barrier over all processes (no-op in a single process)."""
    if jax.process_count() > 1:
        ocp.multihost.sync_global_processes(name)


def find_damage(step_dir: str | Path) -> str | None:
    """`"<file>: <reason>"` for the first damaged file of an Orbax step folder, or None when its
    files look whole (a missing or empty file, invalid JSON metadata, an OCDBT data file shorter
    than the data it is said to hold)."""
    step_dir = Path(step_dir)
    for name in _REQUIRED_FILES:
        if not (step_dir / name).is_file():
            return f"{name}: missing"
    for path in sorted(p for p in step_dir.rglob("*") if p.is_file()):
        if path.stat().st_size == 0:
            return f"{path.relative_to(step_dir)}: empty file (0 bytes)"
    json_files = [*_JSON_FILES, f"{ITEM_DIR}/array_metadatas/*"]
    for path in sorted(p for pattern in json_files for p in step_dir.glob(pattern)):
        try:
            json.loads(path.read_bytes())
        except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
            return f"{path.relative_to(step_dir)}: invalid JSON ({error})"
    return _ocdbt_damage(step_dir / ITEM_DIR)


def _ocdbt_damage(database: Path) -> str | None:
    """First missing or truncated file the OCDBT database at `database` refers to, or None."""
    try:
        kvstore = ts.KvStore.open({"driver": "file", "path": f"{database}/"}).result()
        manifest = ts.ocdbt.dump(kvstore).result()
        pending = [v["root"]["location"] for v in manifest["versions"] if "location" in v["root"]]
        while pending:
            location = pending.pop()
            damage = _reference_damage(database, location)
            if damage is not None:
                return damage
            for entry in ts.ocdbt.dump(kvstore, location).result()["entries"]:
                for value in entry.values():
                    if isinstance(value, str) and value.startswith("btreenode:"):
                        pending.append(value)
                    elif isinstance(value, str) and value.startswith("value:"):
                        damage = _reference_damage(database, value)
                        if damage is not None:
                            return damage
    except ValueError as error:  # TensorStore errors name the file they could not decode
        return f"{database.name}/: {str(error).split(' [tensorstore_spec', 1)[0]}"
    return None


def _reference_damage(database: Path, location: str) -> str | None:
    """Damage of one OCDBT reference `kind:<base>:<file>:<offset>:<length>`, or None."""
    head, file, offset, length = location.rsplit(":", 3)
    path = database / head.split(":", 1)[1] / file
    name = path.relative_to(database.parent)
    if not path.is_file():
        return f"{name}: missing"
    size, end = path.stat().st_size, int(offset) + int(length)
    if size < end:
        return f"{name}: truncated ({size} bytes; the checkpoint refers to bytes up to {end})"
    return None


def load_for_inference(workdir: str | Path, step: int | None = None):
    """`(config, variables)` of a training run: the saved config and the params and batch_stats of
    the latest (or the given) checkpoint as host NumPy arrays.

    Raises FileNotFoundError naming the workdir when it has no config or no checkpoint (or not the
    step asked for), ValueError when the checkpoint does not fit the model its config describes.
    """
    from focalnet_jax import sharding
    from focalnet_jax.training import train_state

    workdir = Path(workdir)
    config = read_config(workdir)
    if not (workdir / CHECKPOINT_DIR).is_dir():
        raise FileNotFoundError(f"workdir {workdir}: no checkpoint under {CHECKPOINT_DIR}/")
    manager = make_manager(workdir, read_only=True)
    try:
        steps = manager.all_steps()
        if not steps:
            raise FileNotFoundError(f"workdir {workdir}: no checkpoint under {CHECKPOINT_DIR}/")
        if step is not None and step not in steps:
            raise FileNotFoundError(f"workdir {workdir}: no checkpoint at step {step}; has {steps}")
        model, _ = train_state.build_run_model(config)
        mesh = jax.make_mesh((1,), (sharding.DATA_AXIS,), devices=jax.local_devices()[:1])
        tx = train_state.make_optimizer(config.optim)
        # Parameter shapes do not depend on the image size: any input size describes the state.
        shape = (1, 128, 128, len(config.data.components))
        abstract = train_state.abstract_train_state(model, tx, shape, mesh)
        try:
            state = restore(manager, abstract, step)
        except UnreadableCheckpointError:
            raise
        except (ValueError, KeyError, TypeError) as error:
            raise UserError(
                f"workdir {workdir}: checkpoint does not match the model of its {CONFIG_FILE} "
                f"({config.model.name}, depth {config.model.depth}): {error}"
            ) from error
    finally:
        manager.close()
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return config, jax.tree.map(np.asarray, variables)
