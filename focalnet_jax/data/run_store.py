"""Which store a training run was made with: `<workdir>/store.json` holds the store's path, settings
(`store_settings`) and fingerprint, recorded at training start.

Resuming, `evaluate --workdir` and `predict` compare the store (or the preprocessing) they are given
with this record and refuse one made with other settings, naming each setting that differs. A
resume also compares the run's training and validation cases, and the data the store holds for
them (`case_data`, a digest of each case's stored images and labels): a store preprocessed again
from other labels, with the same settings and cases, is refused, naming a case. A run from before
these records has none: it still resumes and evaluates, with a one-line warning. An evaluation
on a store of the same settings whose data of some validation cases differs (labels corrected
since) goes on, with a warning naming the first of them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from focalnet_jax.data.atomic_files import write_json_atomic
from focalnet_jax.data.store import open_store
from focalnet_jax.data.store_settings import (
    STORE_VERSION,
    VERSION_CHANGE,
    StaleStoreError,
    settings_diff,
)
from focalnet_jax.errors import UserError, plural

log = logging.getLogger(__name__)

RECORD_FILE = "store.json"
CASE_DATA = "case_data"  # {case id: digest of its stored data} of the run's training and val cases


def read_run_store(workdir: str | os.PathLike) -> dict | None:
    """The run's record {"store", "fingerprint", "settings"}; None for a run without one."""
    path = Path(workdir) / RECORD_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError as error:
        raise StaleStoreError(f"{path}: unreadable store record ({error})") from error
    if not (
        isinstance(record, dict)
        and isinstance(record.get("store"), str)
        and isinstance(record.get("settings"), dict)
    ):
        raise StaleStoreError(
            f"{path}: not a store record (expected an object with a 'store' path and its "
            "'settings' object)"
        )
    for key in ("train_cases", "val_cases", "train_patients"):
        if key in record and not (
            isinstance(record[key], list) and all(isinstance(c, str) for c in record[key])
        ):
            raise StaleStoreError(f"{path}: '{key}' is not a list of ids")
    return record


def _compare(record: dict, settings: dict, workdir, against: str, ignore: Sequence[str]) -> None:
    diff = settings_diff(record["settings"], settings, ("run", "now"))
    diff = [line for line in diff if line.split(":")[0] not in ignore]
    if diff:
        raise StaleStoreError(
            f"run {workdir} was trained on store {record['store']}, made with other settings "
            f"than {against}: {'; '.join(diff)}"
        )


def warn_other_version(record: dict | None, workdir) -> None:
    """One warning where the run's `record` names a store of another format version than this
    code makes (`VERSION_CHANGE`): its inputs now differ slightly from those it trained on."""
    version = None if record is None else record["settings"].get("version")
    if version not in (None, STORE_VERSION):
        log.warning(
            "run %s was trained on a store of format version %s; preprocessing as version %s "
            "(%s): its inputs may differ slightly from those it was trained on",
            workdir, version, STORE_VERSION, VERSION_CHANGE,
        )  # fmt: skip


def check_run_store(
    workdir: str | os.PathLike,
    settings: dict,
    *,
    against: str,
    ignore: Sequence[str] = (),
) -> dict | None:
    """Raises `StaleStoreError` when `settings` (of the store or preprocessing named `against`)
    differ from the run's recorded store settings in a key not in `ignore` (dotted, e.g. 'slices').
    Returns the record; a run without one: a one-line warning and None."""
    record = read_run_store(workdir)
    if record is None:
        log.warning(
            "run %s has no %s (trained before store settings were recorded): %s not checked",
            workdir,
            RECORD_FILE,
            against,
        )
        return None
    _compare(record, settings, workdir, against, ignore)
    return record


def record_run_store(
    workdir: str | os.PathLike,
    store,
    *,
    split=None,
    total_steps: int | None = None,
    write: bool = True,
    new_run: bool = False,
) -> None:
    """At training start: a run that has a record (a resume) must use a store with the same
    settings, and the same training and validation cases where it recorded them
    (`StaleStoreError` otherwise); a new run, or one from before these records (warned), records
    `store` (its path is updated on a resume: the store may have moved). `split` (a
    `FoldSplit`) adds the case ids, their data's digests (`case_data`) and the training cases'
    patient ids (`train_patients`: a test store is held out only if none of its patients trained),
    `total_steps` the step training ends at (epoch-based runs: from the number of training
    slices), so that evaluation and ensembles do not recompute them. `write`: this process writes
    files and warns (e.g. process 0 only). `new_run`: the run resumes no checkpoint, so an earlier
    start's record (it saved none) is replaced, not compared."""
    workdir = Path(workdir)
    record = None if new_run else check_training_store(workdir, store, split=split)
    if record is None:
        # The writer alone: another process may find config.json that process 0 has just written.
        if write and not new_run and (workdir / "config.json").exists():
            log.warning(
                "run %s has no %s (started before store settings were recorded): recording "
                "store %s",
                workdir,
                RECORD_FILE,
                store.path,
            )
        record = {"fingerprint": store.fingerprint, "settings": store.settings}
    record["store"] = str(store.path)  # also a resume's: the store may have moved
    if split is not None:
        record.update(train_cases=list(split.train_cases), val_cases=list(split.val_cases))
        record["train_patients"] = _patients(store, split.train_cases)
        if (data := _case_data(store, (*split.train_cases, *split.val_cases))) is not None:
            record[CASE_DATA] = data
    if total_steps is not None:
        record["total_steps"] = int(total_steps)
    if write:
        workdir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(record, workdir / RECORD_FILE)


def check_training_store(workdir: str | os.PathLike, store, *, split=None) -> dict | None:
    """The run's record (None: a new run, or one from before these records) once `store`, and
    the cases of `split` (a `FoldSplit`), agree with it: `StaleStoreError` (one line) for a store
    with other settings, other training or validation cases, or other data of those cases, than
    the run recorded. Writes nothing; `record_run_store` checks with it."""
    record = read_run_store(workdir)
    if record is not None:
        _compare(record, store.settings, workdir, f"store {store.path}", ())
        if split is not None:
            _compare_cases(record, split, workdir, store.path)
            _compare_case_data(record, store, split, workdir)
    return record


def _compare_cases(record: dict, split, workdir, store_path) -> None:
    for key, cases in (("train_cases", split.train_cases), ("val_cases", split.val_cases)):
        if key in record and list(record[key]) != list(cases):
            raise StaleStoreError(
                f"run {workdir}: store {store_path} gives other {key.replace('_', ' ')} than the "
                f"run recorded ({len(record[key])} recorded, {len(cases)} now; "
                f"{len(set(record[key]) ^ set(cases))} differ): resume on the store it trained on"
            )


def _case_data(store, case_ids: Sequence[str]) -> dict[str, str] | None:
    """{case id: the first 16 hex digits of its `data_sha256` (of its stored images and
    labels)} of the store's `case_ids`; None where a case has none."""
    digests = {c: store.case(c).get("data_sha256") for c in case_ids}
    if not all(isinstance(d, str) for d in digests.values()):
        return None
    return {c: d[:16] for c, d in digests.items()}


def _compare_case_data(record: dict, store, split, workdir) -> None:
    """Refuses a store whose data of the run's cases differs from the data recorded (preprocessed
    again from changed images, or from other labels: same case ids and settings)."""
    recorded = record.get(CASE_DATA)
    now = _case_data(store, (*split.train_cases, *split.val_cases))
    if not isinstance(recorded, dict) or now is None:
        return  # a record from before these digests, or a store without them
    if changed := [c for c, d in now.items() if recorded.get(c) != d]:
        raise StaleStoreError(
            f"run {workdir}: store {store.path} holds other images or labels for case "
            f"{changed[0]} ({plural(len(changed), 'case')} of the run differ) than the store the "
            "run trained on: resume on the store it trained on"
        )


def warn_other_case_data(record: dict | None, store, case_ids: Sequence[str], workdir) -> None:
    """One warning where `store`, made with the run's recorded settings (its slices and format
    version too: other slices give other digests), holds other data for some of `case_ids` than
    the store the run trained on (its `case_data`): an evaluation of the run's validation fold
    then measures the data now (e.g. labels corrected since), not the data it was split on."""
    recorded = None if record is None else record.get(CASE_DATA)
    if not isinstance(recorded, dict) or settings_diff(
        record["settings"], store.settings, ("", "")
    ):
        return
    now = _case_data(store, case_ids)
    changed = [c for c, d in (now or {}).items() if c in recorded and recorded[c] != d]
    if changed:
        log.warning(
            "store %s holds other images or labels for %s of run %s than the store it trained "
            "on (first: %s): evaluated on the data the store holds now",
            store.path, plural(len(changed), "case"), workdir, changed[0],
        )  # fmt: skip


def recorded_cases(workdir: str | os.PathLike, key: str) -> list[str] | None:
    """The run's recorded `train_cases`, `val_cases` or `train_patients`; None for a record
    without them."""
    record = read_run_store(workdir)
    if record is None or key not in record:
        return None
    return list(record[key])


def training_patients(workdir: str | os.PathLike) -> list[str] | None:
    """The patient ids of the run's training cases: its recorded `train_patients`, else (a run
    recorded before them) those its recorded training store gives its `train_cases`, when that
    store still opens and holds every one of them; None when neither can tell."""
    record = read_run_store(workdir)
    if record is None or "train_cases" not in record:
        return None
    if "train_patients" in record:
        return list(record["train_patients"])
    try:
        store = open_store(record["store"])
    except (FileNotFoundError, UserError):
        return None
    if not set(record["train_cases"]) <= set(store.case_ids):
        return None
    log.info("run %s: training patients looked up in its training store %s", workdir, store.path)
    return _patients(store, record["train_cases"])


def _patients(store, case_ids: Sequence[str]) -> list[str]:
    """The sorted patient ids of the store's cases `case_ids`."""
    return sorted({store.case(c)["patient_id"] for c in case_ids})
