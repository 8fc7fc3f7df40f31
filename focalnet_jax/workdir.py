"""A run directory: its resolved config and its Orbax checkpoints, written by training and read by
inference.

Layout of a workdir: `config.json` (the resolved config of the run), `checkpoints/<step>/` (Orbax,
the latest `train.keep_checkpoints` kept), `tb/` (TensorBoard events). Training saves and resumes
the whole train state (`focalnet_jax.training.checkpoint`); inference reads only the variables
(`load_for_inference`), so evaluation needs nothing from training.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from focalnet_jax.run import DATA_AXIS, RunSpec

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


def _abstract_checkpoint(spec: RunSpec) -> dict:
    """The saved train state's tree (`step`, `params`, `batch_stats`, `opt_state`) as
    ShapeDtypeStructs on one local device: what Orbax restores into."""
    model, tx = spec.model, spec.tx

    def tree(key):
        variables = model.init(key, jax.numpy.zeros(spec.input_shape), train=False)
        params = variables["params"]
        step = jax.numpy.zeros((), jax.numpy.int32)
        batch_stats = variables.get("batch_stats", {})
        return {
            "step": step,
            "params": params,
            "batch_stats": batch_stats,
            "opt_state": tx.init(params),
        }

    mesh = jax.make_mesh((1,), (DATA_AXIS,), devices=jax.local_devices()[:1])
    one_device = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    shapes = jax.eval_shape(tree, jax.random.key(0))
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=one_device), shapes
    )


def load_for_inference(workdir: str | Path, step: int | None = None):
    """`(spec, variables)` of a training run: the `RunSpec` of its saved config and the params and
    batch_stats of the latest (or the given) checkpoint as host NumPy arrays.

    Raises FileNotFoundError naming the workdir when it has no config or no checkpoint (or not the
    step asked for), ValueError when the checkpoint does not fit the model its config describes.
    """
    workdir = Path(workdir)
    config = read_config(workdir)
    # Parameter shapes do not depend on the image size: the default crop describes the state.
    spec = RunSpec.from_config(config, num_devices=1)
    if not (workdir / CHECKPOINT_DIR).is_dir():
        raise FileNotFoundError(f"workdir {workdir}: no checkpoint under {CHECKPOINT_DIR}/")
    manager = make_manager(workdir, read_only=True)
    try:
        steps = manager.all_steps()
        if not steps:
            raise FileNotFoundError(f"workdir {workdir}: no checkpoint under {CHECKPOINT_DIR}/")
        if step is not None and step not in steps:
            raise FileNotFoundError(f"workdir {workdir}: no checkpoint at step {step}; has {steps}")
        step = max(steps) if step is None else step
        try:
            state = manager.restore(
                int(step), args=ocp.args.StandardRestore(_abstract_checkpoint(spec))
            )
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(
                f"workdir {workdir}: checkpoint does not match the model of its {CONFIG_FILE} "
                f"({config.model.name}, depth {config.model.depth}): {error}"
            ) from error
    finally:
        manager.close()
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    return spec, jax.tree.map(np.asarray, variables)
