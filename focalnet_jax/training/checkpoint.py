"""Train-state checkpoints of a run directory (`focalnet_jax.run.workdir`): save, resume.

Saves are collective: every process calls `save`, Orbax writes each array once. Resume order
(`resume_or_initialize`): the newest intact checkpoint in the workdir, else `model.pretrained`
(torchvision ResNet weights), else a fresh initialisation.

Damaged checkpoints (`workdir.UnreadableCheckpointError`): `resume` moves such a step aside to
`checkpoints/corrupt-<step>/` (Orbax lists only all-digit folder names, so neither `latest_step`
nor keep-N garbage collection sees it again; nothing is deleted) and resumes from the newest
intact step. When no step is intact it refuses, moving nothing: starting from scratch would drop
all progress, so that takes the user moving `checkpoints/` away (or a new workdir).
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from focalnet_jax.errors import UserError
from focalnet_jax.run import RunSpec, checkpoint_digests
from focalnet_jax.run.workdir import CheckpointMismatchError, UnreadableCheckpointError, restore
from focalnet_jax.training import group_failures, save_failures, train_state

CORRUPT_PREFIX = "corrupt-"

log = logging.getLogger(__name__)


def save(manager: ocp.CheckpointManager, step: int, state, *, newer_than: int) -> None:
    """Save `state` at `step` (asynchronous; `finish_saves` before exiting). The steps saved
    before (past `newer_than`, the step the session started from) get their digests first
    (`finish_saves`). A full disk (or another environment failure of this save or the one
    before) is an `OSError` naming the checkpoint folder (`save_failures`)."""
    finish_saves(manager, newer_than=newer_than)
    with save_failures.naming_the_checkpoint(manager.directory, f"saving checkpoint step {step}"):
        manager.save(int(step), args=ocp.args.StandardSave(state))


def write_finished_digests(manager: ocp.CheckpointManager, *, newer_than: int) -> None:
    """(Process 0) the content digests of each step saved past `newer_than` (the step the
    session started from) without them, unless a save is still being written (then at a later
    call): called at each log step, so that a run killed later (SIGKILL, a lost node) leaves its
    newest step checked, not only at the next save."""
    if jax.process_index() == 0 and not manager.is_saving_in_progress():
        checkpoint_digests.write_missing(manager.directory, newer_than=newer_than)


def finish_saves(manager: ocp.CheckpointManager, *, newer_than: int) -> None:
    """Wait until every pending save is on disk, then (process 0) write the content digests of
    each step saved past `newer_than` (the step the session started from) without them
    (`checkpoint_digests`), which `restore` checks. A save that failed for the environment is an
    `OSError` naming the checkpoint folder (`save_failures`)."""
    with save_failures.naming_the_checkpoint(manager.directory):
        manager.wait_until_finished()
    if jax.process_index() == 0:
        checkpoint_digests.write_missing(manager.directory, newer_than=newer_than)


def resume(manager: ocp.CheckpointManager, abstract_state, checked_step: int | None = None):
    """The newest intact checkpoint restored into `abstract_state` (None when there is none).

    Damaged newer steps are moved aside to `corrupt-<step>/` and one warning names each (file and
    reason) and the step resumed from. Raises `UnreadableCheckpointError` naming every step, and
    moving nothing, when all are damaged. `checked_step`: a step whose files were just found whole
    (`workdir.resumable_step`), not checked again.
    """
    unreadable = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            state = restore(manager, abstract_state, step, checked=step == checked_step)
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
    sync_processes(f"checkpoint_name_aside_{step_dir.name}")  # every process has seen the old names
    if jax.process_index() == 0:
        step_dir.rename(target)
    sync_processes(f"checkpoint_moved_aside_{step_dir.name}")
    return target


def sync_processes(name: str) -> None:
    """Barrier over all processes (no-op in a single process)."""
    if jax.process_count() > 1:
        ocp.multihost.sync_global_processes(name)


def resume_or_initialize(
    spec: RunSpec,
    manager: ocp.CheckpointManager,
    mesh: Mesh,
    init_key: jax.Array,
    checked_step: int | None = None,
) -> train_state.TrainState:
    """The state a run starts from: its newest intact checkpoint (`resume`; `checked_step`: one
    found whole already), else the pretrained backbone of `model.pretrained`, else
    `model.init(init_key)`; replicated over `mesh`.

    A `UserError` when the newest intact checkpoint holds another model or optimiser state (a
    workdir whose `config.json` was replaced; `workdir.check_resumed_config` catches the
    others before)."""
    try:
        state = resume(manager, train_state.abstract_train_state(spec, mesh), checked_step)
    except CheckpointMismatchError as error:
        raise UserError(
            f"{error}; a resumed run trains the state it saved: train this config in another "
            "workdir"
        ) from error
    if state is not None:
        return state
    variables = None
    model_config = spec.config.model
    # Both blocks run in every process of a group, given weights or not (`group_failures`: the
    # processes' blocks are paired by their order); a file one process cannot load ends every
    # process (the others would wait in a collective).
    with group_failures.together("load its pretrained weights"):
        if model_config.pretrained:
            from focalnet_jax.models.pretrained import load_torchvision_resnet

            variables = load_torchvision_resnet(
                train_state.init_variables(spec.model, init_key, spec.input_shape),
                model_config.pretrained,
                components=spec.components,
                model_config=model_config,
            )
    with group_failures.together("load the weights of process 0"):
        _check_same_weights(variables, model_config.pretrained)
    return train_state.create_train_state(spec, init_key, mesh, variables=variables)


def _check_same_weights(variables, path: str) -> None:
    """A `UserError` in a process of a group whose pretrained `variables` (loaded from `path`;
    None without weights) differ from process 0's: each process replicates its own host values,
    so the group trained replicas that never agreed. Their paths may differ (a node-local copy),
    and are not compared; the values are (`checkpoint_digests.variables_digest`)."""
    if jax.process_count() == 1:
        return
    mine = "none" if variables is None else checkpoint_digests.variables_digest(variables)
    first = group_failures.process0_value(mine)
    if first == mine:
        return
    process = jax.process_index()
    if "none" in (first, mine):
        given = "without pretrained weights"
        if variables is not None:
            given = f"with pretrained weights {path}"
        first_given = "without them" if first == "none" else "with them"
        raise UserError(
            f"process {process} was started {given}, process 0 {first_given}; start every "
            "process with the same command"
        )
    raise UserError(
        f"process {process}'s pretrained weights {path} hold other values than process 0's; "
        "give every process the same weights"
    )
