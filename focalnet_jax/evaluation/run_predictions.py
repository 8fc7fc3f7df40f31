"""What `focalnet evaluate --workdir` predicts before it evaluates: the run's validation fold, or,
with `--all-cases`, every case of a held-out or external test store.

Test stores: every case is predicted (no fold split) by the run, or by the ensemble of a
cross-validation folder's fold models (evaluation/ensemble.py), into the contract predictions
files that `evaluate_predictions` reads. The store must have been preprocessed with the settings
that shaped the models' training inputs (every preprocessing setting but how label value 1
reads); otherwise the models would see inputs unlike their training data, and the evaluation is
refused naming the settings that differ. A test store holding a case a model trained on (the
`train_cases` each run recorded at training start), or another exam of a patient it trained on
(`train_patients`), is refused too, naming the run and the cases: a cross-validation folder's
fold models have, between them, trained on every case of their own store, so evaluating them on
it would report training-set numbers. Both, with optional flip
TTA; both replace the predictions folder whole (made under a temporary name), so no case of an
earlier run stays in it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from focalnet_jax.data.atomic_files import foreign_entries, replaced_folder
from focalnet_jax.data.run_store import recorded_cases, training_patients
from focalnet_jax.data.store import open_store
from focalnet_jax.data.store_settings import StaleStoreError
from focalnet_jax.errors import UserError
from focalnet_jax.evaluation.ensemble import (
    Ensemble,
    input_settings,
    load_ensemble,
    settings_difference,
    write_models,
)
from focalnet_jax.evaluation.inference import predict_cases, predict_validation_fold
from focalnet_jax.evaluation.predictions import MODELS_FILE
from focalnet_jax.run.run_folder import CONFIG_FILE, fold_runs, lost_config

log = logging.getLogger(__name__)


def check_test_store(store, models: Ensemble) -> None:
    """Raises StaleStoreError naming the differing settings and the missing components."""
    missing = [c for c in models.components if c not in store.components]
    if missing:
        raise StaleStoreError(
            f"test store {store.path} lacks component(s) {missing} of the models "
            f"(store: {list(store.components)})"
        )
    if models.preprocess is None:
        raise UserError(
            f"the preprocessing settings of {', '.join(map(str, models.runs))} are unknown: "
            f"the test store {store.path} cannot be checked against them"
        )
    have = input_settings(store.settings.get("preprocess"))
    diff = settings_difference(have, input_settings(models.preprocess))
    if diff:
        raise StaleStoreError(
            f"test store {store.path}: preprocessing settings differ from the runs' in "
            f"{sorted(diff)} (store, runs) = {diff}; preprocess the test set with the runs' "
            "settings"
        )


def _overlap_message(run, store_path, test_patients: Mapping[str, str]) -> str | None:
    """Why `run` did not hold out the test store (`test_patients`: its case id -> patient id):
    cases it trained on, else cases of patients it trained on (another exam of a training
    patient); None when it held out every case, or when its record cannot tell (warned)."""
    trained = recorded_cases(run, "train_cases")
    if trained is None:
        log.warning("run %s recorded no training cases: test store %s not checked against "
                    "them", run, store_path)  # fmt: skip
        return None
    total = len(test_patients)
    overlap = sorted(set(test_patients).intersection(trained))
    if overlap:
        return (
            f"test store {store_path}: {len(overlap)} of its {total} cases are training cases of "
            f"run {run} ({_shown(overlap)}); its metrics would be training-set numbers: evaluate "
            "on held-out cases"
        )
    patients = training_patients(run)
    if patients is None:
        log.warning("run %s recorded no training patients (trained before they were recorded) "
                    "and its training store cannot give them: test store %s checked by case id "
                    "only", run, store_path)  # fmt: skip
        return None
    patients = set(patients)
    shared = sorted(c for c, p in test_patients.items() if p in patients)
    if not shared:
        return None
    named = [f"{c} of patient {test_patients[c]}" for c in shared]
    return (
        f"test store {store_path}: {len(shared)} of its {total} cases are exams of patients run "
        f"{run} trained on ({_shown(named)}); its metrics would not be held-out numbers: "
        "evaluate on held-out patients (if these patient ids name other people, pass "
        "--allow-training-cases)"
    )


def _shown(items: Sequence[str]) -> str:
    return ", ".join(items[:3]) + (", ..." if len(items) > 3 else "")


def check_held_out(
    runs: Sequence[Path],
    test_patients: Mapping[str, str],
    store_path,
    *,
    allow_training_cases: bool = False,
) -> None:
    """Raises a UserError naming the first run that trained on cases of the test store (its
    recorded `train_cases`) or on their patients (`train_patients`: another exam of the same
    patient is not held out), with how many and which; `test_patients` maps the store's case ids
    to patient ids. `allow_training_cases` turns the error into a warning. A run that recorded
    neither cannot be checked: warned."""
    for run in runs:
        message = _overlap_message(run, store_path, test_patients)
        if message is None:
            continue
        if not allow_training_cases:
            raise UserError(message)
        log.warning("%s (allowed)", message)


def check_replaceable_predictions(out_dir: str | Path) -> None:
    """A one-line `UserError` where `out_dir`, a predictions folder replaced whole, holds a file
    that the predictions do not (`<case_id>.npz`, `models.json`): it would be deleted; and where
    it is a file (it was moved aside, under a hidden name, for good)."""
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise UserError(
            f"{out_dir} exists and is not a folder: focalnet evaluate writes its predictions "
            "there; move it out or choose another --out"
        )
    if strays := foreign_entries(out_dir, _is_prediction_file):
        raise UserError(
            f"{out_dir} holds {strays[0]}, which focalnet evaluate does not write; the folder is "
            "replaced whole, so move that out or choose another --out"
        )


def _is_prediction_file(name: str) -> bool:
    return Path(name).suffix == ".npz" or name == MODELS_FILE


def predict_test_store(
    workdir: str | Path | None,
    store_path: str | Path | None,
    out_dir: str | Path | None,
    *,
    step: int | None = None,
    tta: str = "none",
    batch_size: int = 16,
    allow_training_cases: bool = False,
    before_swap: Callable[[], None] | None = None,
) -> list[str]:
    """Writes `<case_id>.npz` for every case of the store at `store_path` into `out_dir`, replaced
    whole (`before_swap` is called right before: e.g. removing an evaluation of the predictions
    it replaces); returns the case ids (the cases the evaluation expects). A store holding a case
    the models trained on, or a case of a patient they trained on, is refused (`check_held_out`)
    unless `allow_training_cases`."""
    if workdir is None or store_path is None or out_dir is None:
        raise UserError("--all-cases needs --workdir, --store and --out")
    check_replaceable_predictions(out_dir)
    models = load_ensemble(workdir, step=step, batch_size=batch_size, tta=tta)
    store = open_store(store_path)
    check_test_store(store, models)
    test_patients = {r["case_id"]: r["patient_id"] for r in store.cases}
    check_held_out(
        models.runs, test_patients, store_path, allow_training_cases=allow_training_cases
    )
    log.info("predicting all %d cases of %s with %d model(s)", len(store.cases), store_path,
             len(models.runs))  # fmt: skip
    # No earlier run's cases left beside these.
    with replaced_folder(out_dir, before_swap=before_swap) as tmp:
        predict_cases(models, store, store.case_ids, tmp)
        write_models(models, tmp, store)
    return list(store.case_ids)


def predict_fold(
    workdir: str | Path,
    out_dir: str | Path,
    *,
    step: int | None = None,
    store_path: str | Path | None = None,
    batch_size: int = 16,
    tta: str = "none",
    before_swap: Callable[[], None] | None = None,
) -> list[str]:
    """`inference.predict_validation_fold` of one run, with optional flip TTA, into `out_dir`
    replaced whole (`before_swap` as in `predict_test_store`); returns the case ids. Anything but
    one run (a cross-validation folder, however many of its folds finished) is refused: fold
    models trained on each other's folds."""
    if (lost := lost_config(workdir)) and not fold_runs(workdir):  # a cv folder: refused below
        raise UserError(lost)
    if not (Path(workdir) / CONFIG_FILE).is_file():
        raise UserError(
            f"{workdir}: not a training run (no {CONFIG_FILE}); a cross-validation folder's "
            "ensemble has seen every fold in training: evaluate it on a test store "
            "(--store TEST --all-cases) or evaluate each fold run"
        )
    check_replaceable_predictions(out_dir)
    models = load_ensemble(workdir, step=step, batch_size=batch_size, tta=tta, store=store_path)
    # No earlier run's cases left beside these.
    with replaced_folder(out_dir, before_swap=before_swap) as tmp:
        cases, store = predict_validation_fold(
            workdir, tmp, store_path=store_path, batch_size=batch_size, predictor=models
        )
        write_models(models, tmp, store)
    return cases
