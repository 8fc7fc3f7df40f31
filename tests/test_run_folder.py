"""A training `--workdir` that is another command's output is refused in one line
(`run.run_folder`): `train` and `cv` wrote their run among a store's, a dataset's, a study's or
predictions' files, and into a cross-validation folder, where `predict --checkpoint` then took
the stray run for the folds. A `checkpoints` that is a file is refused before training (Orbax's
save waited 5 minutes for the folder it could not make)."""

from __future__ import annotations

import json
import shutil

import pytest
from cli_calls import cli_error

from focalnet_jax.errors import UserError
from focalnet_jax.evaluation.ensemble import EnsembleError, resolve_folder
from focalnet_jax.run.run_folder import check_run_folder


@pytest.mark.parametrize(
    ("marker", "what"),
    [
        ("cases.json", "a preprocessed store"),
        ("synth.json", "a synthetic dataset (focalnet synth)"),
        ("study.json", "a study (focalnet study run)"),
        ("models.json", "predictions (focalnet predict or evaluate)"),
        ("metrics.json", "an evaluation (focalnet evaluate)"),
    ],
)
def test_another_commands_output_is_not_a_workdir(tmp_path, marker, what):
    (tmp_path / marker).write_text("{}")
    for cv in (False, True):
        with pytest.raises(UserError) as refused:
            check_run_folder(tmp_path, cv=cv)
        assert str(refused.value) == (
            f"--workdir {tmp_path} is {what} ({marker}): a training run would be written among "
            "its files; choose another folder"
        )


def test_a_folder_of_images_is_not_a_workdir(tmp_path):
    (tmp_path / "10000_1000000_t2w.mha").write_bytes(b"")
    with pytest.raises(UserError, match=r"holds images \(10000_1000000_t2w.mha\)"):
        check_run_folder(tmp_path)


def test_train_refuses_a_cv_folder_and_cv_a_run(tmp_path):
    (tmp_path / "cv" / "fold0").mkdir(parents=True)
    (tmp_path / "cv" / "fold0" / "config.json").write_text("{}")
    with pytest.raises(UserError) as refused:
        check_run_folder(tmp_path / "cv")
    assert str(refused.value) == (
        f"--workdir {tmp_path / 'cv'} is a cross-validation folder (fold0/config.json): give one "
        f"fold's run, e.g. {tmp_path / 'cv' / 'fold0'}, or train the folds with focalnet cv"
    )
    check_run_folder(tmp_path / "cv", cv=True)  # cv's own folder
    check_run_folder(tmp_path / "cv" / "fold0")  # a run, resumed
    with pytest.raises(UserError, match="is a training run .config.json.; focalnet cv trains"):
        check_run_folder(tmp_path / "cv" / "fold0", cv=True)


def test_new_empty_and_other_folders_are_workdirs_but_checkpoints_must_be_a_folder(tmp_path):
    check_run_folder(tmp_path / "new")
    check_run_folder(tmp_path)
    (tmp_path / "slurm-123.out").write_text("a job's log, written before training starts")
    check_run_folder(tmp_path)
    (tmp_path / "checkpoints").write_text("")
    with pytest.raises(UserError, match=r"checkpoints is not a folder \(checkpoints go there\)$"):
        check_run_folder(tmp_path)


def test_train_on_a_store_is_a_one_line_error_from_the_cli(tmp_path):
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "cases.json").write_text("{}")
    message = cli_error(["train", "--config", "configs/demo.py", "--workdir", tmp_path / "store",
                         f"--config.data.store={tmp_path / 'store'}"])  # fmt: skip
    assert message.startswith(f"focalnet train: error: --workdir {tmp_path / 'store'} is a prep")


def test_a_run_trained_into_a_cv_folder_makes_predict_refuse_not_guess(tmp_path):
    """`predict --checkpoint CV` used the stray run alone (models.json: one run) once a `train`
    had written one into the folder."""
    for run in ("cv", "cv/fold0", "cv/fold1"):
        (tmp_path / run).mkdir(exist_ok=True)
        (tmp_path / run / "config.json").write_text(json.dumps({}))
    with pytest.raises(EnsembleError, match="both a training run .config.json. and a cross-"):
        resolve_folder(tmp_path / "cv")


def test_a_fold_whose_config_json_is_lost_is_named_not_called_never_trained(tmp_path):
    """Its folder's ensemble left it out as "never trained" (models.json said so) and predicted
    with the other folds."""
    (tmp_path / "cv" / "fold0").mkdir(parents=True)
    (tmp_path / "cv" / "fold0" / "config.json").write_text(json.dumps({}))
    (tmp_path / "cv" / "fold1" / "checkpoints" / "2").mkdir(parents=True)
    with pytest.raises(EnsembleError) as refused:
        resolve_folder(tmp_path / "cv")
    assert str(refused.value) == (
        f"{tmp_path / 'cv'}: workdir {tmp_path / 'cv' / 'fold1'}: checkpoints but no config.json "
        "(lost?): restore it, or move fold1 out"
    )


def test_a_folder_of_fold_runs_and_stray_checkpoints_is_told_what_it_is(tmp_path):
    """`evaluate --workdir CV` on a folder of fold runs that holds a `checkpoints/` of its own
    was told to restore its config.json, which the next refusal (a run and a cross-validation
    folder at once) would then name."""
    from focalnet_jax.evaluation.run_predictions import predict_fold

    (tmp_path / "cv" / "fold0").mkdir(parents=True)
    (tmp_path / "cv" / "fold0" / "config.json").write_text(json.dumps({}))
    (tmp_path / "cv" / "checkpoints" / "2").mkdir(parents=True)
    with pytest.raises(UserError, match=r"cv: not a training run \(no config.json\); a cross-"):
        predict_fold(tmp_path / "cv", tmp_path / "out")
    # A fold whose config.json is lost: restoring it would not help, the folder is refused whole.
    shutil.rmtree(tmp_path / "cv" / "checkpoints")
    (tmp_path / "cv" / "fold1" / "checkpoints" / "2").mkdir(parents=True)
    with pytest.raises(UserError, match=r"cv: not a training run \(no config.json\); a cross-"):
        predict_fold(tmp_path / "cv", tmp_path / "out")


def test_evaluate_refuses_to_replace_a_predictions_folder_holding_other_files(tmp_path):
    """`evaluate --workdir RUN --out OUT` replaced OUT/predictions whole: a file of the user's
    there was deleted without a word."""
    from focalnet_jax.evaluation.run_predictions import check_replaceable_predictions

    predictions = tmp_path / "predictions"
    predictions.mkdir()
    for name in ("case_a.npz", "models.json"):
        (predictions / name).write_text("")
    check_replaceable_predictions(predictions)  # an earlier evaluation's: replaced
    check_replaceable_predictions(tmp_path / "new")
    (predictions / "notes.txt").write_text("precious")
    with pytest.raises(UserError) as refused:
        check_replaceable_predictions(predictions)
    assert str(refused.value) == (
        f"{predictions} holds notes.txt, which focalnet evaluate does not write; the folder is "
        "replaced whole, so move that out or choose another --out"
    )


def test_a_folder_for_a_file_and_a_file_for_a_folder_are_named_so(tmp_path):
    """A folder given as --manifest, or a file as --predictions, was said not to exist."""
    from focalnet_jax.data.layouts import LayoutError, read_manifest
    from focalnet_jax.evaluation.predictions import PredictionsError, list_cases

    with pytest.raises(LayoutError, match=f"^manifest {tmp_path} is a folder, not a CSV file$"):
        read_manifest(tmp_path, components=("t2w", "adc"), labels=False)
    (tmp_path / "synth.json").write_text("{}")
    with pytest.raises(PredictionsError, match=r"synth.json: not a folder \(a predictions folder"):
        list_cases(tmp_path / "synth.json")
