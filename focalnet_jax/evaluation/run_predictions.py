"""What `focalnet evaluate --workdir` predicts before it evaluates: the run's validation fold, or,
with `--all-cases`, every case of a held-out or external test store.

Test stores: every case is predicted (no fold split) by the run, or by the ensemble of a
cross-validation folder's fold models (evaluation/ensemble.py), into the contract predictions
files that `evaluate_predictions` reads. The store must have been preprocessed with the settings
that shaped the models' training inputs (every preprocessing setting but how label value 1
reads); otherwise the models would see inputs unlike their training data, and the evaluation is
refused naming the settings that differ. A test store holding a case a model trained on (the
`train_cases` each run recorded at training start) is refused too, naming the run and the cases:
a cross-validation folder's fold models have, between them, trained on every case of their own
store, so evaluating them on it would report training-set numbers. Both, with optional flip
TTA; both replace the predictions folder whole (made under a temporary name), so no case of an
earlier run stays in it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from focalnet_jax.data.atomic_files import replaced_folder
from focalnet_jax.data.run_store import recorded_cases
from focalnet_jax.data.store import StaleStoreError, open_store
from focalnet_jax.errors import UserError
from focalnet_jax.evaluation.ensemble import (
    Ensemble,
    input_settings,
    load_ensemble,
    settings_difference,
    write_models,
)
from focalnet_jax.evaluation.inference import predict_cases, predict_validation_fold
from focalnet_jax.run.workdir import CONFIG_FILE

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


def check_held_out(
    runs: Sequence[Path], case_ids: Sequence[str], store_path, *, allow_training_cases=False
) -> None:
    """Raises a UserError naming the first run that trained on cases of the test store (its
    recorded `train_cases`), with how many and which; `allow_training_cases` turns that into a
    warning. A run that recorded no training cases cannot be checked: warned."""
    test_cases = set(case_ids)
    for run in runs:
        trained = recorded_cases(run, "train_cases")
        if trained is None:
            log.warning("run %s recorded no training cases: test store %s not checked against "
                        "them", run, store_path)  # fmt: skip
            continue
        overlap = sorted(test_cases.intersection(trained))
        if not overlap:
            continue
        shown = ", ".join(overlap[:3]) + (", ..." if len(overlap) > 3 else "")
        message = (
            f"test store {store_path}: {len(overlap)} of its {len(test_cases)} cases are training "
            f"cases of run {run} ({shown}); its metrics would be training-set numbers: evaluate "
            "on held-out cases"
        )
        if not allow_training_cases:
            raise UserError(message)
        log.warning("%s (allowed)", message)


def predict_test_store(
    workdir: str | Path | None,
    store_path: str | Path | None,
    out_dir: str | Path | None,
    *,
    step: int | None = None,
    tta: str = "none",
    batch_size: int = 16,
    allow_training_cases: bool = False,
) -> list[str]:
    """Writes `<case_id>.npz` for every case of the store at `store_path` into `out_dir`; returns
    the case ids (the cases the evaluation expects). A store holding a case the models trained on
    is refused (`check_held_out`) unless `allow_training_cases`."""
    if workdir is None or store_path is None or out_dir is None:
        raise UserError("--all-cases needs --workdir, --store and --out")
    models = load_ensemble(workdir, step=step, batch_size=batch_size, tta=tta)
    store = open_store(store_path)
    check_test_store(store, models)
    check_held_out(
        models.runs, store.case_ids, store_path, allow_training_cases=allow_training_cases
    )
    log.info("predicting all %d cases of %s with %d model(s)", len(store.cases), store_path,
             len(models.runs))  # fmt: skip
    with replaced_folder(out_dir) as tmp:  # no earlier run's cases left beside these
        predict_cases(models, store, store.case_ids, tmp)
        write_models(models, tmp)
    return list(store.case_ids)


def predict_fold(
    workdir: str | Path,
    out_dir: str | Path,
    *,
    step: int | None = None,
    store_path: str | Path | None = None,
    batch_size: int = 16,
    tta: str = "none",
) -> list[str]:
    """`inference.predict_validation_fold` of one run, with optional flip TTA; returns the case
    ids. Anything but one run (a cross-validation folder, however many of its folds finished)
    is refused: fold models trained on each other's folds."""
    if not (Path(workdir) / CONFIG_FILE).is_file():
        raise UserError(
            f"{workdir}: not a training run (no {CONFIG_FILE}); a cross-validation folder's "
            "ensemble has seen every fold in training: evaluate it on a test store "
            "(--store TEST --all-cases) or evaluate each fold run"
        )
    models = load_ensemble(workdir, step=step, batch_size=batch_size, tta=tta)
    with replaced_folder(out_dir) as tmp:  # no earlier run's cases left beside these
        cases = predict_validation_fold(
            workdir, tmp, store_path=store_path, batch_size=batch_size, predictor=models
        )
        write_models(models, tmp)
    return cases
