"""What a training `--workdir` may be: a new folder, one of the user's (e.g. holding a job's log),
an earlier run of the same command (`config.json`), or for `cv` a folder of `fold<k>` runs.
Another command's output is refused in one line: a run written into a store, a dataset, a study,
predictions or a folder of images mixes with them, and that command's `--overwrite` deletes the
run; a run written into a cross-validation folder stands beside its fold runs
(`ensemble.resolve_folder` refuses such a folder)."""

from __future__ import annotations

import re
from pathlib import Path

from focalnet_jax.errors import UserError

CONFIG_FILE = "config.json"  # a run's config (run/workdir.py)
CHECKPOINT_DIR = "checkpoints"  # its checkpoints, one folder a step
# The file that marks each other command's output folder, and what the folder then is.
OTHER_OUTPUTS = {
    "cases.json": "a preprocessed store",
    "synth.json": "a synthetic dataset (focalnet synth)",
    "study.json": "a study (focalnet study run)",
    "models.json": "predictions (focalnet predict or evaluate)",
    "metrics.json": "an evaluation (focalnet evaluate)",
}
IMAGE_SUFFIXES = (".mha", ".mhd", ".nii", ".nii.gz", ".dcm")
FOLD_NAME = re.compile(r"fold(0|[1-9]\d*)")  # the runs of `focalnet cv`: fold<k> (not fold01)


def fold_runs(folder: Path) -> list[Path]:
    """The `fold*` runs (folders with a `config.json`) in `folder`, sorted by name."""
    return sorted(p for p in Path(folder).glob("fold*") if (p / CONFIG_FILE).is_file())


def has_checkpoint_step(workdir: str | Path) -> bool:
    """Whether the run saved a checkpoint step (whole or not): starting it again resumes it. A
    workdir without one (killed before its first save, or its checkpoints moved away) starts a
    new run, whatever config and store its earlier start recorded."""
    return any(p.name.isdigit() for p in (Path(workdir) / CHECKPOINT_DIR).glob("*"))


def lost_config(workdir: str | Path) -> str | None:
    """'workdir W: checkpoints but no config.json (lost?): restore it' where `workdir` has a
    checkpoint step but no `config.json`, else None."""
    if (Path(workdir) / CONFIG_FILE).is_file() or not has_checkpoint_step(workdir):
        return None
    return f"workdir {workdir}: checkpoints but no {CONFIG_FILE} (lost?): restore it"


def check_run_folder(workdir: str | Path, *, cv: bool = False) -> None:
    """One-line `UserError`s for a `--workdir` of `train` (`cv`: of `focalnet cv`) that is not
    such a folder (module docstring), and for a run whose `checkpoints` is not a folder (Orbax's
    save then waited 5 minutes for a folder that it could not create)."""
    path = Path(workdir)
    if not path.is_dir():
        return
    is_run = (path / CONFIG_FILE).is_file()
    if cv and is_run:
        raise UserError(
            f"--workdir {path} is a training run ({CONFIG_FILE}); focalnet cv trains its "
            "fold<k> runs in a folder of their own: choose another folder"
        )
    if not cv and not is_run and (folds := fold_runs(path)):
        raise UserError(
            f"--workdir {path} is a cross-validation folder ({folds[0].name}/{CONFIG_FILE}): give "
            f"one fold's run, e.g. {folds[0]}, or train the folds with focalnet cv"
        )
    if not is_run:
        for name, what in OTHER_OUTPUTS.items():
            if (path / name).exists():
                raise UserError(
                    f"--workdir {path} is {what} ({name}): a training run would be written "
                    "among its files; choose another folder"
                )
        if image := next((p.name for p in path.iterdir() if p.name.endswith(IMAGE_SUFFIXES)), None):
            raise UserError(
                f"--workdir {path} holds images ({image}): a training run would be written "
                "among them; choose another folder"
            )
    checkpoints = path / CHECKPOINT_DIR
    if checkpoints.exists() and not checkpoints.is_dir():
        raise UserError(f"--workdir {path}: {checkpoints} is not a folder (checkpoints go there)")
