"""A run directory: its resolved config and its Orbax checkpoints, written by training and read by
inference.

Layout of a workdir: `config.json` (the resolved config of the run), `checkpoints/<step>/` (Orbax,
the latest `train.keep_checkpoints` kept), `tb/` (TensorBoard events). Training saves and resumes
the whole train state (`focalnet_jax.training.checkpoint`); inference reads only the variables
(`load_for_inference`), so evaluation needs nothing from training.

Paths in a run's config (`PATH_KEYS`: the store, the split files, the pretrained weights) are made
absolute when training fixes the config (`absolute_paths`: `~` expanded, a relative path taken
against the current folder), so that `config.json` names the same files from any folder. A
`config.json` saved before, with a relative path, is read against the current folder, with a
warning naming the file and that folder where the path is not there (`read_config`).

Damaged checkpoints: a step whose files show the damage (a missing, empty or truncated file,
invalid JSON metadata, content that differs from its digests at save time: `checkpoint_digests`),
or whose arrays TensorStore fails to read, raises `UnreadableCheckpointError` naming the step
folder, the file and the reason (`restore`, `checkpoint_damage`); a resuming run moves such a step
aside (`focalnet_jax.training.checkpoint.resume`).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
from pathlib import Path

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from focalnet_jax.data.atomic_files import replaced_atomically
from focalnet_jax.data.store_settings import flat_settings
from focalnet_jax.errors import UserError
from focalnet_jax.losses import parse_mfl_weight
from focalnet_jax.run import checkpoint_damage
from focalnet_jax.run.checkpoint_damage import ITEM_DIR
from focalnet_jax.run.run_folder import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    has_checkpoint_step,
    lost_config,
)
from focalnet_jax.run.spec import DATA_AXIS, RunSpec

log = logging.getLogger(__name__)


# The JSON files Orbax writes into a step folder (relative paths; globs allowed).
class UnreadableCheckpointError(UserError):
    """A checkpoint step folder that cannot be restored: damaged files (message names them)."""

    def __init__(self, step_dir: Path, reason: str):
        self.step_dir, self.reason = Path(step_dir), reason
        super().__init__(f"checkpoint {step_dir} is unreadable: {reason}")


class CheckpointMismatchError(UserError):
    """An intact checkpoint step whose arrays do not fit the state asked for (another model or
    optimiser): the message names the step folder and the first arrays that differ."""

    def __init__(self, step_dir: Path, reason: str):
        self.step_dir, self.reason = Path(step_dir), reason
        super().__init__(f"checkpoint {step_dir} does not fit the state asked for: {reason}")


# The config keys that hold paths (module docstring).
PATH_KEYS = ("data.store", "data.splits", "model.pretrained")


def absolute_path(value):
    """A non-empty path string, `~` expanded and made absolute; anything else as it is."""
    return os.path.abspath(os.path.expanduser(value)) if isinstance(value, str) and value else value


def _relative_path(saved: dict, key: str) -> str | None:
    """The path a saved config (`config.json` as a dict) holds at `key` ('data.store', ...)
    where it is relative (saved before `absolute_paths`), else None."""
    group, leaf = key.split(".")
    value = saved.get(group, {}).get(leaf)
    if isinstance(value, str) and value and not os.path.isabs(os.path.expanduser(value)):
        return value
    return None


def absolute_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` whose `PATH_KEYS` hold absolute paths ('' stays '')."""
    config = config.copy_and_resolve_references()
    for key in PATH_KEYS:
        group, leaf = key.split(".")
        if leaf in config.get(group, {}):
            config[group][leaf] = absolute_path(config[group][leaf])
    return config


@functools.cache
def _warn_relative(path: str, key: str, value: str, cwd: str) -> None:
    """Once per saved relative path and current folder (several readers read one config)."""
    log.warning(
        "%s: %s %r is relative (saved before %s recorded absolute paths) and does not exist "
        "relative to the current folder %s: run from the folder the run was trained in, or write "
        "its absolute path into %s",
        path, key, value, CONFIG_FILE, cwd, CONFIG_FILE,
    )  # fmt: skip


def missing_path_note(workdir: str | Path, key: str) -> str:
    """Why the path of `key` ('data.store', ...) that `read_config(workdir)` gave is not there,
    where `config.json` saved it relative: ' (data.store 'x' saved relative in W/config.json
    and taken against the current folder C)'; else ''."""
    path = Path(workdir) / CONFIG_FILE
    try:
        value = _relative_path(_read_config_json(path), key)
    except (OSError, UserError):
        return ""
    if value is None:
        return ""
    return (
        f" ({key} {value!r} saved relative in {path} and taken against the current folder "
        f"{os.getcwd()})"
    )


def save_config(config: ml_collections.ConfigDict, workdir: str | Path) -> Path:
    """Write the resolved config as `workdir/config.json` (process 0 only; atomically, so a run
    killed while writing keeps the previous file); returns the path."""
    path = Path(workdir) / CONFIG_FILE
    if jax.process_index() == 0:
        with replaced_atomically(path) as tmp:
            tmp.write_text(config.to_json(indent=2, sort_keys=True) + "\n")
    return path


def _read_config_json(path: Path) -> dict:
    """The object in `path`; a `UserError` naming the file and the reason when it is not one."""
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(
            f"{path} is damaged (not JSON: {error}); it records the run's config"
        ) from None
    if not isinstance(value, dict):
        raise UserError(f"{path} is damaged: expected a JSON object, got {type(value).__name__}")
    return value


# What a resumed run may change: how long it trains, how often it logs, validates and saves, how
# many checkpoints it keeps, its prefetch depth and where its store lies (the store's settings,
# the run's cases and their data are checked by `data.run_store`), `loss.mfl_any_loss`, a guard
# that changes no computation (a run saved before it, MFL beside another loss, resumes with it
# set), and `loss.mfl_chunk`, how many MFL subsets run at once: the same losses and gradients up
# to float rounding, so a run out of memory resumes with fewer. Any other change would train
# another run in the same workdir.
RESUMABLE_KEYS = (
    "data.store",
    "loss.mfl_any_loss",
    "loss.mfl_chunk",
    "train.checkpoint_every",
    "train.epochs",
    "train.eval_every",
    "train.keep_checkpoints",
    "train.log_every",
    "train.prefetch",
    "train.steps",
)

# Keys added to the config after runs were saved, with the value the code used while they were
# absent (JSON types, or a function of the saved config): a saved config.json without one is read
# as having that value, so those runs resume and predict. (`loss.mfl_chunk` 0: every subset at
# once, as before chunking.)
IMPLIED_WHEN_ABSENT = {
    "loss.pool_size": 3,
    "data.splits": "",
    "loss.mfl_any_loss": False,
    "loss.mfl_chunk": 0,
    "loss.weights": [1.0, 1.0],
    "loss.eps": 1.0,
    "loss.batch_dice": False,
    "loss.dice_background": True,
    "optim.weight_decay_on": "all",
    # DeepLab runs saved before the aligned upsampling used the half-pixel one; a U-Net has none
    "model.upsample": lambda saved: (
        "half_pixel" if saved["model"].get("name", "deeplab") == "deeplab" else "aligned"
    ),
}


def check_resumed_config(config: ml_collections.ConfigDict, workdir: str | Path) -> None:
    """A `UserError` when `config` differs from the run's saved `config.json` in a key outside
    `RESUMABLE_KEYS` (one line: the workdir, each key with its saved and new value), or when the
    workdir has a checkpoint step but no `config.json` (lost: any config whose arrays fit would
    resume it, and be recorded as the whole run's); nothing without a checkpoint step (nothing
    to resume)."""
    if lost := lost_config(workdir):
        raise UserError(f"{lost}, or train in another workdir")
    if not has_checkpoint_step(workdir):
        return
    saved, new = saved_config(workdir), json.loads(config.to_json())
    if not (changed := config_changes(saved, new)):
        return
    # the upsampling has no parameters, and the dtype is the computation's (the parameters are
    # float32 in each): another one is another config, not another model
    keys = [change.split(" ", 1)[0] for change in changed]
    model = any(k.startswith("model.") and k not in ("model.upsample", "model.dtype") for k in keys)
    what = "its checkpoint holds another model" if model else "it was trained with another config"
    advice = "train another config in another workdir"
    upsample = saved.get("model", {}).get("upsample")
    if upsample != new.get("model", {}).get("upsample"):
        advice += f"; give --config.model.upsample={upsample}, the upsampling it trained with"
    raise UserError(
        f"workdir {workdir}: {what}; config keys differ from its {CONFIG_FILE}: "
        f"{'; '.join(changed)} (a resumed run may change only {', '.join(RESUMABLE_KEYS)}; "
        f"{advice})"
    )


def config_changes(saved: dict, new: dict, allowed: tuple[str, ...] = RESUMABLE_KEYS) -> list[str]:
    """`key 'saved' -> 'new'` for each key outside `allowed` where two configs (config.json
    objects) differ. Paths compare absolute (a run saved with a relative path resumes from the
    folder it ran in); lambda as the number it is ('130', '130.0' and 130.0 are one lambda)."""
    saved, new = ({k: _compared(k, v) for k, v in flat_settings(f).items()} for f in (saved, new))
    absent = "(absent)"
    return [
        f"{key} {saved.get(key, absent)!r} -> {new.get(key, absent)!r}"
        for key in sorted(saved.keys() | new.keys())
        if key not in allowed and saved.get(key, absent) != new.get(key, absent)
    ]


def saved_config(workdir: str | Path) -> dict:
    """A run's config.json object as saved, with the keys added since (`IMPLIED_WHEN_ABSENT`)."""
    return _with_implied(_read_config_json(Path(workdir) / CONFIG_FILE))


def _with_implied(saved: dict) -> dict:
    """`saved` (a config.json's object) with each `IMPLIED_WHEN_ABSENT` key it lacks, in a
    section it has."""
    for dotted, value in IMPLIED_WHEN_ABSENT.items():
        section, key = dotted.split(".")
        if isinstance(saved.get(section), dict) and key not in saved[section]:
            saved[section][key] = value(saved) if callable(value) else value
    return saved


def _compared(key: str, value):
    """`value` of config key `key` as a resume compares it: a path absolute, lambda a number."""
    if key in PATH_KEYS:
        return absolute_path(value)
    if key == "loss.mfl_weight":
        with contextlib.suppress(ValueError):  # an invalid lambda is refused when the run starts
            weight = parse_mfl_weight(value)
            return "auto" if weight is None else weight
    return value


def read_config(workdir: str | Path) -> ml_collections.ConfigDict:
    """The config saved by `save_config` (lists where the original had tuples), its `PATH_KEYS`
    absolute: those saved relative (before they were made absolute) taken against the current
    folder, with a warning where the path is not there. FileNotFoundError without one (a lost
    one where the workdir has a checkpoint step)."""
    path = Path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            lost_config(workdir)
            or f"workdir {workdir}: no {CONFIG_FILE} (not a training run directory)"
        )
    saved = saved_config(workdir)
    for key in PATH_KEYS:
        value = _relative_path(saved, key)
        if value is not None and not os.path.exists(absolute_path(value)):
            _warn_relative(str(path), key, value, os.getcwd())
    return absolute_paths(ml_collections.ConfigDict(saved))


def make_manager(
    workdir: str | Path, *, keep: int | None = None, read_only: bool = False
) -> ocp.CheckpointManager:
    """Orbax manager for `workdir/checkpoints`, keeping the latest `keep` steps (None = all);
    `read_only` creates and deletes nothing, and waits for no other process: a process may open
    one where another does not (`resumable_step` finds the folder another process has just
    created), and a barrier there would meet the other's next one."""
    directory = (Path(workdir) / CHECKPOINT_DIR).resolve()
    # Read-only: the saving options are off (Orbax would warn while turning each one off), and
    # so is the root metadata, whose barrier Orbax makes even when it writes nothing.
    saving = {"max_to_keep": keep, "create": True}
    if read_only:
        saving = {
            "max_to_keep": None, "create": False, "save_interval_steps": 0,
            "save_root_metadata": False,
        }  # fmt: skip
    options = ocp.CheckpointManagerOptions(read_only=read_only, **saving)
    if not read_only:
        return ocp.CheckpointManager(directory, options=options)
    absl_log = logging.getLogger("absl")  # Orbax's "Given directory is read only" warning
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)
    try:
        return ocp.CheckpointManager(directory, options=options)
    finally:
        absl_log.setLevel(level)


def restore(
    manager: ocp.CheckpointManager, abstract_state, step: int | None = None, *, checked=False
):
    """Restore into `abstract_state` (ShapeDtypeStructs with shardings): arrays land placed.

    `step=None` = the latest. Returns None when the manager has no checkpoint. Raises
    `UnreadableCheckpointError` when the step's files are damaged or its values unusable
    (`checkpoint_damage.unusable_values`: NaN in a step saved without digests was trained on,
    and the next step blamed), `CheckpointMismatchError` when they hold arrays of other names or
    shapes than `abstract_state` (another model). `checked`: the step's files were found whole
    just before (`resumable_step`), their digests not computed again (a read of every byte: 0.6 s
    for a ResNet-101 train state at 1.1 GB/s).
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        return None
    step_dir = Path(manager.directory) / str(step)
    # Damage found by looking is reported before Orbax reads the step: a restore that fails half
    # way leaves its background I/O threads to fail noisily when the interpreter exits.
    if not checked and (damage := checkpoint_damage.step_damage(step_dir)):
        raise UnreadableCheckpointError(step_dir, damage)
    # Checked before Orbax reads: its failed reads would also leave threads failing at exit.
    if mismatch := state_mismatch(step_dir, abstract_state):
        raise CheckpointMismatchError(step_dir, mismatch)
    try:
        state = manager.restore(int(step), args=ocp.args.StandardRestore(abstract_state))
    except Exception as error:
        if damage := checkpoint_damage.find_damage(step_dir):
            raise UnreadableCheckpointError(step_dir, damage) from error
        failure = checkpoint_damage.read_failure(error)
        status = failure and failure.split(":", 1)[0]
        if status == "PERMISSION_DENIED":  # the user's to fix; the step is whole
            raise PermissionError(errno.EACCES, failure, str(step_dir)) from error
        if status in checkpoint_damage.DAMAGE_STATUS:
            raise UnreadableCheckpointError(step_dir, failure) from error
        raise
    if unusable := checkpoint_damage.unusable_values(state):
        raise UnreadableCheckpointError(step_dir, unusable)
    return state


def state_mismatch(step_dir: str | Path, abstract_state, shown: int = 3) -> str | None:
    """How the arrays saved in the step folder `step_dir` differ from `abstract_state`'s (leaf
    names and shapes; None when they fit): the counts and the first `shown` differences.
    `UnreadableCheckpointError` when its metadata names no arrays (JSON of another shape)."""
    absl_log = logging.getLogger("absl")  # Orbax warns that the item has no step metadata file
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)
    metadata_file = f"{ITEM_DIR}/_METADATA"
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            saved_tree = checkpointer.metadata(Path(step_dir) / ITEM_DIR).item_metadata
    except (KeyError, TypeError, ValueError) as error:
        reason = f"{metadata_file}: no array metadata ({type(error).__name__}: {error})"
        raise UnreadableCheckpointError(step_dir, reason) from error
    finally:
        absl_log.setLevel(level)
    if saved_tree is None:  # Orbax reads none from either file (a changed byte of `_sharding`)
        reason = f"{metadata_file} or {ITEM_DIR}/_sharding: no array metadata"
        raise UnreadableCheckpointError(step_dir, reason)
    leaves = jax.tree_util.tree_leaves_with_path
    saved = {checkpoint_damage.leaf_name(p): tuple(leaf.shape) for p, leaf in leaves(saved_tree)}
    wanted = {
        checkpoint_damage.leaf_name(p): tuple(leaf.shape) for p, leaf in leaves(abstract_state)
    }
    differences = [
        f"{name} {saved.get(name, '(absent)')} saved, {wanted.get(name, '(absent)')} wanted"
        for name in [*wanted, *(name for name in saved if name not in wanted)]  # tree order
        if saved.get(name) != wanted.get(name)
    ]
    if not differences:
        return None
    return f"{len(differences)} of {len(wanted)} arrays differ in name or shape, e.g. " + "; ".join(
        differences[:shown]
    )


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


def _saved_steps(workdir: str | Path) -> list[int]:
    """The run's checkpoint steps, newest first (none without a checkpoint folder)."""
    if not (Path(workdir) / CHECKPOINT_DIR).is_dir():
        return []
    manager = make_manager(workdir, read_only=True)
    try:
        return sorted(manager.all_steps(), reverse=True)
    finally:
        manager.close()


def latest_step(workdir: str | Path) -> int | None:
    """The newest checkpoint step of the run (None: no checkpoint)."""
    return next(iter(_saved_steps(workdir)), None)


def resumable_step(workdir: str | Path) -> int | None:
    """The newest checkpoint step of the run whose files look whole and match their digests
    (`step_damage`; no array is read): the step its resume starts from, unless reading that step
    fails; None: none."""
    directory = (Path(workdir) / CHECKPOINT_DIR).resolve()
    steps = _saved_steps(workdir)
    return next(
        (step for step in steps if checkpoint_damage.step_damage(directory / str(step)) is None),
        None,
    )


def _no_checkpoint(workdir: Path) -> str:
    return (
        f"workdir {workdir}: no checkpoint under {CHECKPOINT_DIR}/ yet (a run saves its first at "
        f"train.checkpoint_every steps and at its end): wait for `focalnet train` to finish, or "
        f"re-run it with --workdir {workdir} to resume"
    )


def load_for_inference(workdir: str | Path, step: int | None = None):
    """`(spec, variables)` of a training run: the `RunSpec` of its saved config and the params and
    batch_stats of the latest (or the given) checkpoint as host NumPy arrays.

    Raises FileNotFoundError naming the workdir when it has no config or no checkpoint (or not the
    step asked for), `UnreadableCheckpointError` naming the step folder, file and reason when the
    step's files are damaged or its variables hold NaN, infinity or a negative BatchNorm running
    variance, a `UserError` naming the differing arrays when the checkpoint does not fit the
    model its config describes.
    """
    workdir = Path(workdir)
    config = read_config(workdir)
    # Parameter shapes do not depend on the image size: the default crop describes the state.
    spec = RunSpec.from_config(config, num_devices=1, training=False)
    if not (workdir / CHECKPOINT_DIR).is_dir():
        raise FileNotFoundError(_no_checkpoint(workdir))
    manager = make_manager(workdir, read_only=True)
    try:
        steps = manager.all_steps()
        if not steps:
            raise FileNotFoundError(_no_checkpoint(workdir))
        if step is not None and step not in steps:
            raise FileNotFoundError(f"workdir {workdir}: no checkpoint at step {step}; has {steps}")
        try:
            state = restore(manager, _abstract_checkpoint(spec), step)
        except CheckpointMismatchError as error:
            raise UserError(
                f"workdir {workdir}: checkpoint {error.step_dir.name} does not match the model of "
                f"its {CONFIG_FILE} ({config.model.name}, depth {config.model.depth}): "
                f"{error.reason}"
            ) from error
    finally:
        manager.close()
    variables = jax.tree.map(
        np.asarray, {"params": state["params"], "batch_stats": state["batch_stats"]}
    )
    return spec, variables
