"""The start of a training run in a workdir: every check that needs no train state
(`check_run_start`, also run by `focalnet cv` for each fold before the first trains), and the
workdir's training lock (`training_lock`): one training at a time writes in a workdir.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path

import jax
import ml_collections

from focalnet_jax.data.run_store import check_training_store
from focalnet_jax.data.store import open_store
from focalnet_jax.data.writer_folders import missing_folders, remove_empty_folders
from focalnet_jax.errors import UserError
from focalnet_jax.file_lock import LockHeld, LocksUnsupported, acquire_lock, release_lock
from focalnet_jax.run import RunSpec
from focalnet_jax.run import workdir as workdir_lib
from focalnet_jax.run.run_folder import check_run_folder, has_checkpoint_step
from focalnet_jax.run.spec import FoldSplit
from focalnet_jax.training import group_checks, group_failures, input_pipeline

log = logging.getLogger(__name__)

LOCK_FILE = ".focalnet_train.lock"  # in the workdir, held by process 0 while the run trains


@dataclasses.dataclass(frozen=True)
class RunStart:
    """What a training start was checked with (`check_run_start`)."""

    config: ml_collections.ConfigDict  # its paths absolute
    spec: RunSpec  # with the store's image size
    store: object  # the opened store
    split: FoldSplit  # the cases and rows of `data.fold`
    batches: input_pipeline.TrainBatches
    num_steps: int  # the step training ends at
    mfl_weight: float  # lambda of eq. 4 (`RunSpec.mfl_weight`: 'auto' from the training rows)
    resumable: int | None  # the newest step found whole (`workdir.resumable_step`), or None


def open_config_store(config: ml_collections.ConfigDict):
    """The store of `config.data.store`, opened; a user error (one line) when it is unset, absent
    or not a store of the current format."""
    if not config.data.store:
        raise UserError(
            "data.store is not set: give the preprocessed store with --config.data.store=STORE"
        )
    return open_store(config.data.store)


def check_run_start(
    config: ml_collections.ConfigDict, workdir: str | Path, mesh, *, store=None
) -> RunStart:
    """Every refusal (`UserError`, one line) of a training start in `workdir` that needs neither
    a train state nor a compilation: the config, a resume's saved config, the store (unset,
    absent, without the components; in a process group, the config and the store's data the
    same as process 0's), the fold's split and batches, `loss.mfl_weight='auto'` on
    its training rows, a resume's recorded store and cases, a resume's checkpoint past the
    config's steps, and `data.slices=all` on a store of the annotated slices alone (it trained on
    those without a word). Writes nothing, so `cv` checks every fold with it before the first
    trains. `store`: an opened store (default: `open_config_store(config)`)."""
    check_run_folder(workdir)  # not another command's output folder
    config = workdir_lib.absolute_paths(config)
    with group_failures.together("drive as many devices as process 0"):
        group_checks.check_same_device_count()
    with group_failures.together("start with the config of process 0"):
        group_checks.check_same_config(config)
    spec = RunSpec.from_config(config)
    workdir_lib.check_resumed_config(config, workdir)  # a resume: the same run, extended
    store = open_config_store(config) if store is None else store
    with group_failures.together("open the store of process 0"):
        group_checks.check_same_store(store)
    spec = spec.for_store(store)
    if config.data.slices == "all" and store.settings.get("slices") == "annotated":
        raise UserError(
            f"store {store.path} holds only the annotated slices (preprocess --slices "
            "annotated; no lesion-free case): data.slices=all would train on those alone; "
            "preprocess with --slices all, or set data.slices=annotated"
        )
    split = spec.fold_split(store)
    if spec.augment.intensity and spec.t2w_channel is not None:
        input_pipeline.check_t2w_ratios(store, split.train_rows, spec.augment.intensity_range)
    reader = input_pipeline.SliceReader(store, spec.components)
    batches = input_pipeline.TrainBatches(
        reader, split.train_rows, spec.global_batch, mesh,
        seed=config.seed, prefetch=config.train.prefetch,
        name=f"the training split of data.fold={config.data.fold} in store {store.path} "
        f"(data.slices={config.data.slices}: {len(split.train_cases)} cases)",
    )  # fmt: skip
    num_steps = spec.total_steps(batches.steps_per_epoch)
    lam = spec.mfl_weight(store, split.train_rows)
    # A resume starts at its newest readable step (or an older one): past the end, refused
    # before store.json and config.json would record the shorter run.
    start = workdir_lib.resumable_step(workdir)
    if start is not None and start > num_steps:
        raise UserError(_past_the_end(workdir, start, num_steps, config, batches.steps_per_epoch))
    if has_checkpoint_step(workdir):  # a resume: the store and cases it recorded
        check_training_store(workdir, store, split=split)
    return RunStart(config, spec, store, split, batches, num_steps, lam, start)


def unused_settings(config: ml_collections.ConfigDict, spec: RunSpec) -> list[str]:
    """Settings of `config` this run does not apply, each as a warning line: a baseline given an
    MFL weight or subsets but not `loss.mfl=True`, and the T2w intensity augmentation without a
    T2w component (`config.json` records them, so the run reads as if they were used)."""
    unused = []
    loss = config.loss
    if not loss.mfl:
        given = [
            f"loss.{key}={loss[key]}"
            for key, default in (("mfl_weight", "auto"), ("subsets", None))
            if loss[key] != default
        ]
        if given:
            unused.append(f"{', '.join(given)} unused: loss.mfl is False (no MFL in this run)")
    if spec.augment.intensity and spec.t2w_channel is None:
        unused.append(
            f"augment.intensity unused: data.components={tuple(spec.components)} has no t2w "
            "(the intensity augmentation scales the T2w only)"
        )
    return unused


def _past_the_end(workdir: Path, start: int, num_steps: int, config, steps_per_epoch: int) -> str:
    """Why a run resumed at step `start` cannot train the `num_steps` of `config` (one line)."""
    train = config.train
    if train.steps > 0:
        given = f"train.steps={train.steps}"
    else:
        given = f"train.epochs={train.epochs} x {steps_per_epoch} steps per epoch"
    return (
        f"workdir {workdir}: its checkpoint is at step {start}, past the {num_steps} steps of "
        f"this config ({given}); a resumed run may extend its training, not shorten it: give "
        f"at least {start} steps, or train this config in another workdir"
    )


def _held(workdir: Path, held: LockHeld) -> UserError:
    return UserError(
        f"workdir {workdir} is being trained by {held.holder}: wait for that run to end, or "
        "train in another --workdir"
    )


def check_not_being_trained(workdirs: list[Path]) -> None:
    """A `UserError` (in every process of a group) when another process holds the training lock
    of one of `workdirs` now, checked by process 0 (`focalnet cv` checks its folds' before the
    first trains; each fold's lock is taken as it starts, `training_lock`)."""
    with group_failures.together("check the folds' training locks"):
        for workdir in workdirs if jax.process_index() == 0 else ():
            if (workdir / LOCK_FILE).is_file():
                try:
                    release_lock(acquire_lock(workdir / LOCK_FILE))
                except LockHeld as held:
                    raise _held(workdir, held) from None
                except LocksUnsupported:  # `training_lock` says so as the fold starts
                    continue


@contextlib.contextmanager
def training_lock(workdir: Path) -> Iterator[None]:
    """Process 0 holds the lock of `workdir` (created) while the block trains there (`file_lock`:
    released when the process ends, also killed). A second `train` or `cv` fold in it meanwhile
    (a job submitted twice, a requeue while the old job runs) is refused in one line naming the
    holder, in every process of its group: both runs' checkpoints and event files were lost.
    The folders this created are removed again where the block leaves them empty (a refused
    start). On a file system without locks the run trains unguarded, with a warning. Every
    other process of a group must find process 0's lock in its own workdir where it names it
    by another path (`group_checks.check_same_workdir`)."""
    lock, created = None, missing_folders(workdir)
    first = jax.process_index() == 0
    with group_failures.together("take the workdir's training lock"):
        if first:
            workdir.mkdir(parents=True, exist_ok=True)
            existed = (workdir / LOCK_FILE).exists()
            try:
                lock = acquire_lock(workdir / LOCK_FILE)
            except LockHeld as held:
                raise _held(workdir, held) from None
            except LocksUnsupported as unsupported:
                if not existed:  # made by the attempt: no lock file is left in the run
                    (workdir / LOCK_FILE).unlink(missing_ok=True)
                log.warning(
                    "the file system of %s has no file locks (%s): training without the "
                    "workdir's lock, so a second run started in it meanwhile is not refused",
                    workdir,
                    unsupported.reason,
                )
    try:
        with group_failures.together("train in the workdir of process 0"):
            group_checks.check_same_workdir(workdir, workdir / LOCK_FILE)
        yield
    finally:
        if lock is not None:
            release_lock(lock, remove=True)
        if first:
            remove_empty_folders(created)  # not empty: the run's folder, kept
