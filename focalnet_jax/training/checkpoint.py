"""Checkpoints of a run directory: the resolved config and Orbax train-state checkpoints.

Layout of a workdir: `config.json` (the resolved config of the run), `checkpoints/<step>/` (Orbax,
the latest `train.keep_checkpoints` kept), `tb/` (TensorBoard events). Saves are collective: every
process calls `save`, Orbax writes each array once.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


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

    `step=None` = the latest. Returns None when the manager has no checkpoint.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        return None
    return manager.restore(int(step), args=ocp.args.StandardRestore(abstract_state))


def load_for_inference(workdir: str | Path, step: int | None = None):
    """`(config, variables)` of a training run: the saved config and the params and batch_stats of
    the latest (or the given) checkpoint as host NumPy arrays.

    Raises FileNotFoundError naming the workdir when it has no config or no checkpoint (or not the
    step asked for), ValueError when the checkpoint does not fit the model its config describes.
    """
    from focalnet_jax.training import sharding, train_state

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
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(
                f"workdir {workdir}: checkpoint does not match the model of its {CONFIG_FILE} "
                f"({config.model.name}, depth {config.model.depth}): {error}"
            ) from error
    finally:
        manager.close()
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return config, jax.tree.map(np.asarray, variables)
