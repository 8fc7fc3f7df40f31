"""The shape of a `metrics.json` (SPEC section 6) where one is read back (`focalnet summarize`): a
value of another type, or a group, task or summary key missing, is named by its key path, so that
a damaged or hand-edited file is neither a traceback nor silently summarised as "n/a" (which the
reports reserve for metrics that are undefined)."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence

from focalnet_jax.evaluation.froc import (
    FP_AT_SENSITIVITY,
    GROUPS,
    PAUC_RANGES,
    SENSITIVITY_AT_FP,
    contract_key,
)
from focalnet_jax.evaluation.roc import TASKS

_FROC_SUMMARIES = {
    "sensitivity_at_fp": [contract_key(x) for x in SENSITIVITY_AT_FP],
    "fp_at_sensitivity": [contract_key(s) for s in FP_AT_SENSITIVITY],
    "pauc": [f"{contract_key(a)}-{contract_key(b)}" for a, b in PAUC_RANGES],
}
_FROC_CURVE = ("threshold", "fp", "sensitivity")
_ROC_CURVE = ("fpr", "tpr")
_PICAI_VALUES = ("auroc", "ap", "score")
_PICAI_INTERVALS = ("auroc_95_ci", "ap_95_ci", "score_95_ci")


def is_number(value) -> bool:
    """An int or float that a float holds (NaN: undefined), not a bool nor an infinity
    (`Infinity` in a file was read as a float, then left out of the mean and the tests as if
    undefined; `evaluate` writes none) nor an int beyond the floats."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return abs(value) <= sys.float_info.max or value != value  # an exact compare, or NaN


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def metrics_problem(metrics) -> str | None:
    """Why `metrics` (a `metrics.json`'s object) is not shaped as `focalnet evaluate` writes it,
    naming the first key path that is not ('froc.all.sensitivity_at_fp.1 is 'x', not a number or
    null'); None where it is."""
    if not isinstance(metrics, Mapping):
        return f"not a JSON object but {type(metrics).__name__}"
    if not _is_count(metrics.get("num_patients")):
        return _wrong(metrics, ("num_patients",), "a count")
    for group in GROUPS:
        if problem := _froc_group_problem(metrics, group):
            return problem
    for task in TASKS:
        if problem := _roc_task_problem(metrics, task):
            return problem
    if problem := _settings_problem(metrics):
        return problem
    cases = metrics.get("cases", [])  # absent from metrics written before it was kept
    if not (isinstance(cases, list) and all(isinstance(c, str) for c in cases)):
        return _wrong(metrics, ("cases",), "a list of case ids")
    picai = metrics.get("picai")
    if picai is not None and not isinstance(picai, Mapping):
        return _wrong(metrics, ("picai",), "an object")
    if picai and "skipped" not in picai:
        for key in _PICAI_VALUES:
            if not (picai.get(key) is None or is_number(picai.get(key))):
                return _wrong(metrics, ("picai", key), "a number or null")
        for key in _PICAI_INTERVALS:
            if not (picai.get(key) is None or _is_interval(picai.get(key))):
                return _wrong(metrics, ("picai", key), "null or a list of 2 numbers or nulls")
    return None


def _is_interval(value) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and all(v is None or is_number(v) for v in value)
    )


def _froc_group_problem(metrics: Mapping, group: str) -> str | None:
    path = ("froc", group)
    if not isinstance(_at(metrics, path), Mapping):
        return _wrong(metrics, path, "an object")
    if not _is_count(_at(metrics, (*path, "num_lesions"))):
        return _wrong(metrics, (*path, "num_lesions"), "a count")
    for summary, keys in _FROC_SUMMARIES.items():
        if not isinstance(_at(metrics, (*path, summary)), Mapping):
            return _wrong(metrics, (*path, summary), "an object")
        for key in keys:
            value = _at(metrics, (*path, summary, key))
            if not (value is None or is_number(value)):
                return _wrong(metrics, (*path, summary, key), "a number or null")
    return _curve_problem(metrics, (*path, "curve"), _FROC_CURVE)


def _roc_task_problem(metrics: Mapping, task: str) -> str | None:
    path = ("roc", task)
    if not isinstance(_at(metrics, path), Mapping):
        return _wrong(metrics, path, "an object")
    auc = _at(metrics, (*path, "auc"))
    if not (auc is None or is_number(auc)):
        return _wrong(metrics, (*path, "auc"), "a number or null")
    return _curve_problem(metrics, (*path, "curve"), _ROC_CURVE)


def _curve_problem(metrics: Mapping, path: tuple, keys: tuple) -> str | None:
    if not isinstance(_at(metrics, path), Mapping):
        return _wrong(metrics, path, "an object")
    for key in keys:
        values = _at(metrics, (*path, key))
        # null: NaN (a group without lesions has a curve of undefined sensitivity)
        if not (isinstance(values, list) and all(v is None or is_number(v) for v in values)):
            return _wrong(metrics, (*path, key), "a list of numbers")
    lengths = {key: len(_at(metrics, (*path, key))) for key in keys}
    if len(set(lengths.values())) > 1:  # one point of the curve is one entry of each list
        shown = ", ".join(f"{key} {n}" for key, n in lengths.items())
        return f"{'.'.join(path)} holds lists of different lengths ({shown}), not one curve"
    return None


_SETTINGS = {"radius_mm": is_number, "min_score": is_number, "roc_detections": _is_count}


def _settings_problem(metrics: Mapping) -> str | None:
    """Why `settings` (where present: the evaluation's, compared and shown by the reports) is
    not as `focalnet evaluate` writes it, or None."""
    settings = metrics.get("settings")
    if settings is None:
        return None
    if not isinstance(settings, Mapping):
        return _wrong(metrics, ("settings",), "an object")
    for key, check in _SETTINGS.items():
        if key in settings and not check(settings[key]):
            return _wrong(
                metrics, ("settings", key), "a number" if check is is_number else "a count"
            )
    if "slices" in settings and not isinstance(settings["slices"], str):
        return _wrong(metrics, ("settings", "slices"), "text")
    return None


MISSING = object()  # `value_at`'s default where a path's key is not there


def value_at(metrics: Mapping, path: Sequence[str], default=None):
    """metrics[path[0]][path[1]]...; `default` where a key is missing or a parent no object."""
    value = metrics
    for key in path:
        if not isinstance(value, Mapping) or key not in value:
            return default
        value = value[key]
    return value


def _at(metrics: Mapping, path: tuple):
    return value_at(metrics, path, MISSING)


def _wrong(metrics: Mapping, path: tuple, expected: str) -> str:
    value, where = _at(metrics, path), ".".join(path)
    return f"{where} missing" if value is MISSING else f"{where} is {_short(value)}, not {expected}"


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def model_runs(metrics: dict) -> list[dict]:
    """The {"run", "step"} records of a metrics.json's `models` (the predictions' models.json);
    none where there is none, or where another tool's models.json had another shape."""
    record = metrics.get("models")
    runs = record.get("models") if isinstance(record, dict) else None
    return [run for run in runs if isinstance(run, dict)] if isinstance(runs, list) else []
