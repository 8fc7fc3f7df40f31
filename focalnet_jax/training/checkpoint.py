"""Train-state checkpoints of a run directory (`focalnet_jax.workdir`): save, restore, resume.

Saves are collective: every process calls `save`, Orbax writes each array once. Resume order
(`resume_or_initialize`): the latest checkpoint in the workdir, else `model.pretrained`
(torchvision ResNet weights), else a fresh initialisation.
"""

from __future__ import annotations

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from focalnet_jax.run import RunSpec
from focalnet_jax.training import train_state
from focalnet_jax.workdir import make_manager

__all__ = ["make_manager", "restore", "resume_or_initialize", "save"]


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


def resume_or_initialize(
    spec: RunSpec, manager: ocp.CheckpointManager, mesh: Mesh, init_key: jax.Array
) -> train_state.TrainState:
    """The state a run starts from: its latest checkpoint, else the pretrained backbone of
    `model.pretrained`, else `model.init(init_key)`; replicated over `mesh`."""
    state = restore(manager, train_state.abstract_train_state(spec, mesh))
    if state is not None:
        return state
    variables = None
    model_config = spec.config.model
    if model_config.pretrained:
        from focalnet_jax.models.pretrained import load_torchvision_resnet

        variables = load_torchvision_resnet(
            train_state.init_variables(spec.model, init_key, spec.input_shape),
            model_config.pretrained,
            num_components=len(spec.components),
            model_config=model_config,
        )
    return train_state.create_train_state(spec, init_key, mesh, variables=variables)
