"""Ensembles: per (repeat, fold), the mean of the member arms' P(class >= k) maps, evaluated as a
cell is (same evaluation, same slices).

Ensemble cell `DIR/<ensemble>/rep<r>/fold<k>/eval/` holds `predictions/<case>.npz` (contract
files: the mean scores, the members' lesions and geometry) and `metrics.json`. It is computed
once every member cell of that repeat and fold is done, and recomputed when a member's
`metrics.json` changed since (`members.json` records their digests).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from focalnet_jax.data.atomic_files import replaced_folder, write_json_atomic
from focalnet_jax.study.cells import METRICS_JSON, PREDICTIONS, Cell, Study
from focalnet_jax.study.spec import StudyError, evaluation_slices

log = logging.getLogger(__name__)


def _members_record(members: list[Path]) -> dict:
    """The ensemble's `models.json` record from its members': the store their predictions were
    read from ("store": path and slices) where every member names the same one, and
    "output_encoding": "binary" where every member is such a model (lesion-only scores). A
    StudyError where binary and graded members meet: averaging a lesion probability into
    P(class >= k) for k >= 2 means nothing."""
    from focalnet_jax.evaluation.predictions import MODELS_FILE

    records = []
    for member in members:
        try:
            record = json.loads((member / MODELS_FILE).read_text())
        except (OSError, ValueError):
            record = None
        records.append(record if isinstance(record, dict) else {})
    binary = [r.get("output_encoding") == "binary" for r in records]
    if any(binary) and not all(binary):
        listed = "; ".join(
            f"{m}: {'binary' if b else 'graded'}" for m, b in zip(members, binary, strict=True)
        )
        raise StudyError(f"ensemble members disagree on output encodings: {listed}")
    out = {"output_encoding": "binary"} if all(binary) else {}
    stores = [r.get("store") for r in records]
    if isinstance(stores[0], dict) and stores.count(stores[0]) == len(stores):
        out["store"] = stores[0]
    return out


def average_predictions(members: list[Path], out_dir: Path) -> list[str]:
    """Write the mean of the members' score maps, case by case, and a `models.json`
    (`_members_record`: the store the members read, so the evaluation knows a store of annotated
    slices; binary members); returns the case ids.

    Every member must hold the same cases with the same lesions (the same validation fold)."""
    from focalnet_jax.evaluation.predictions import MODELS_FILE, list_cases, read_case, write_case

    record = _members_record(members)
    cases = {p.name: p for p in list_cases(members[0])}
    for member in members[1:]:
        names = {p.name for p in list_cases(member)}
        if names != set(cases):
            raise StudyError(f"{member}: other cases than {members[0]} (different folds?)")
    case_ids = []
    with replaced_folder(out_dir) as tmp:
        for name, first_path in sorted(cases.items()):
            first = read_case(first_path)
            case_ids.append(first.case_id)
            scores = np.mean([read_case(m / name).scores for m in members], axis=0)
            write_case(
                tmp,
                first.case_id,
                scores=scores,
                lesions=first.lesions,
                lesion_classes=first.lesion_classes,
                spacing=first.spacing,
                patient_id=first.patient_id,
                t2w=first.t2w,
                adc=first.adc,
                slice_index=first.slice_index,
                lesion_grade_known=first.lesion_grade_known,
            )
        if record:
            write_json_atomic(record, tmp / MODELS_FILE)
    return case_ids


def _members(study: Study, cell: Cell) -> list[Cell]:
    return [Cell(arm, cell.repeat, cell.fold) for arm in study.ensembles[cell.arm]]


MEMBERS_FILE = "members.json"
"""Beside an ensemble cell's `eval/`: {member cell: sha256 of its metrics.json} when computed."""


def _member_digests(study: Study, members: list[Cell]) -> dict[str, str]:
    return {
        m.name: hashlib.sha256((study.path(m) / METRICS_JSON).read_bytes()).hexdigest()
        for m in members
    }


def ensemble_state(study: Study, cell: Cell) -> str:
    """'waiting' while a member cell of its repeat and fold is not done (its metrics, if any,
    are of members that no longer stand); 'outdated' when it was never computed or a member's
    metrics changed since (re-evaluated: `update_ensemble` computes it); else 'done'. Compared
    by content, not by file times, which the clocks of a cluster's nodes may order wrongly."""
    members = _members(study, cell)
    if any(study.state(m).state != "done" for m in members):
        return "waiting"
    try:
        computed_from = json.loads((study.path(cell) / MEMBERS_FILE).read_text())
    except (OSError, ValueError):  # never computed, or by a version that kept no record
        return "outdated"
    metrics = study.path(cell) / METRICS_JSON
    if metrics.is_file() and computed_from == _member_digests(study, members):
        return "done"
    return "outdated"


def update_ensemble(study: Study, cell: Cell) -> str:
    """Compute ensemble cell `cell` if its members are done; returns 'done', 'computed' or
    'waiting'."""
    from focalnet_jax.evaluation.evaluate import evaluate_predictions

    state = ensemble_state(study, cell)
    if state != "outdated":
        return state
    members, out = _members(study, cell), study.path(cell) / "eval"
    computed_from = _member_digests(study, members)  # before reading: a re-evaluation meanwhile
    member_dirs = [study.path(m) / PREDICTIONS for m in members]
    case_ids = average_predictions(member_dirs, out / "predictions")
    options = study.plain["evaluate"]
    evaluate_predictions(
        out / "predictions",
        out,
        cases=case_ids,  # the members' cases, checked equal: no "no case list" warning
        with_picai=True,
        picai_bootstraps=int(options.get("picai_bootstraps", 0)),
        with_figures=bool(options.get("figures", False)),
        label=cell.name,
        slices=evaluation_slices(study.plain),
    )
    # a member re-evaluated since its digest was taken leaves the ensemble outdated
    write_json_atomic(computed_from, study.path(cell) / MEMBERS_FILE)
    return "computed"


def update_ensembles(study: Study) -> dict[str, str]:
    """`update_ensemble` for every ensemble cell; {cell name: result}."""
    results = {}
    for cell in study.ensemble_cells():
        results[cell.name] = update_ensemble(study, cell)
        if results[cell.name] == "computed":
            log.info("ensemble %s computed", cell.name)
    return results
