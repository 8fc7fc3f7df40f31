"""What `focalnet evaluate --workdir` predicts before it evaluates: the run's validation fold, or,
with `--all-cases`, every case of a held-out or external test store.

Test stores: every case is predicted (no fold split) by the run, or by the ensemble of a
cross-validation folder's fold models (evaluation/ensemble.py), into the contract predictions
files that `evaluate_predictions` reads. The store must have been preprocessed with the settings
that shaped the models' training inputs (every preprocessing setting but how label value 1
reads); otherwise the models would see inputs unlike their training data, and the evaluation is
refused naming the settings that differ. Both, with optional flip TTA; both replace the
predictions folder whole (made under a temporary name), so no case of an earlier run stays in it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from focalnet_jax.data.atomic_files import replaced_folder
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


def predict_test_store(
    workdir: str | Path | None,
    store_path: str | Path | None,
    out_dir: str | Path | None,
    *,
    step: int | None = None,
    tta: str = "none",
    batch_size: int = 16,
) -> list[str]:
    """Writes `<case_id>.npz` for every case of the store at `store_path` into `out_dir`; returns
    the case ids (the cases the evaluation expects)."""
    if workdir is None or store_path is None or out_dir is None:
        raise UserError("--all-cases needs --workdir, --store and --out")
    models = load_ensemble(workdir, step=step, batch_size=batch_size, tta=tta)
    store = open_store(store_path)
    check_test_store(store, models)
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
