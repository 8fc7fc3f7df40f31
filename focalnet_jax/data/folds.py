"""Patient-level cross-validation folds, stratified by each patient's highest lesion class, or
read from given split files (PI-CAI's official folds, see `read_given_split`)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import numpy as np

from focalnet_jax.data.atomic_files import replaced_atomically
from focalnet_jax.errors import UserError, plural

log = logging.getLogger(__name__)


def assign_folds(
    patient_ids: Sequence[str],
    patient_max_class: Mapping[str, int] | Sequence[int],
    num_folds: int = 5,
    seed: int = 0,
) -> dict[str, int]:
    """Patient -> fold in [0, num_folds).

    Patients are grouped by highest class (0..5), shuffled within each group by `seed`, and dealt
    round robin, the deal continuing across groups so fold sizes differ by at most one. The result
    depends only on the set of patients, their classes, `num_folds` and `seed` (not on input order).
    """
    if num_folds < 2:
        raise ValueError(f"num_folds={num_folds}: need at least 2 folds")
    patients = sorted(set(str(p) for p in patient_ids))
    if isinstance(patient_max_class, Mapping):
        classes = {str(k): int(v) for k, v in patient_max_class.items()}
    else:
        if len(patient_max_class) != len(patient_ids):
            raise ValueError(
                f"patient_max_class has {len(patient_max_class)} entries, "
                f"patient_ids {len(patient_ids)}"
            )
        classes = {}
        for p, c in zip(patient_ids, patient_max_class, strict=True):
            classes[str(p)] = max(classes.get(str(p), 0), int(c))
    missing = [p for p in patients if p not in classes]
    if missing:
        raise ValueError(f"no highest class given for patients {missing[:5]}")
    if len(patients) < num_folds:
        raise ValueError(
            f"{plural(len(patients), 'patient')} cannot fill {plural(num_folds, 'fold')}"
        )
    rng = np.random.default_rng(seed)
    folds, position = {}, 0
    for cls in sorted(set(classes[p] for p in patients), reverse=True):
        group = [p for p in patients if classes[p] == cls]
        for p in (group[i] for i in rng.permutation(len(group))):
            folds[p] = position % num_folds
            position += 1
    return folds


def store_folds(store, num_folds: int, seed: int) -> tuple[dict[str, int], dict[str, int]]:
    """(patient -> fold, patient -> highest class) of a store; a `UserError` naming the store, its
    patients and `num_folds` when the folds cannot be made (fewer than 2, or than the patients)."""
    max_class = store.patient_max_class()
    if len(max_class) < 2:
        raise UserError(
            f"store {store.path} holds {plural(len(max_class), 'patient')}: cross-validation "
            f"(num_folds {num_folds}) needs at least 2 patients"
        )
    if num_folds < 2 or len(max_class) < num_folds:
        raise UserError(
            f"store {store.path}: {plural(len(max_class), 'patient')} cannot be split into "
            f"{plural(num_folds, 'fold')}; choose 2 <= num_folds <= {len(max_class)}"
        )
    return assign_folds(list(max_class), max_class, num_folds, seed), max_class


def split_cases(
    store, fold: int, num_folds: int = 5, seed: int = 0, splits: str | os.PathLike = ""
) -> tuple[list[str], list[str]]:
    """(train case ids, validation case ids) of `fold` for a store (see `data.store.Store`): the
    seeded folds, or where `splits` names split files, those (`read_given_split`); a folder of
    fold files whose folds validate a store case twice (files of two splits) is refused."""
    if splits:
        split = _given_fold(store, fold, num_folds, splits)
        if Path(splits).expanduser().is_dir():  # one file may repeat cases (Monte-Carlo splits)
            _refuse_validated_twice(store, splits, num_folds)
        return split
    folds, _ = store_folds(store, num_folds, seed)
    if not 0 <= fold < num_folds:
        raise UserError(f"fold={fold}: expected 0 <= fold < num_folds={num_folds}")
    train = [r["case_id"] for r in store.cases if folds[r["patient_id"]] != fold]
    val = [r["case_id"] for r in store.cases if folds[r["patient_id"]] == fold]
    return train, val


def _given_fold(store, fold: int, num_folds: int, splits) -> tuple[list[str], list[str]]:
    """(train, val) of `fold` of the split files `splits`, checked against the store."""
    _check_given_num_folds(splits, num_folds)
    if not 0 <= fold < num_folds:
        raise UserError(f"fold={fold}: expected 0 <= fold < num_folds={num_folds}")
    train, val = read_given_split(splits, fold, num_folds)
    return check_given_split(store, train, val, f"split {splits} fold {fold}")


def _refuse_validated_twice(store, splits, num_folds: int) -> None:
    """A `UserError` naming the folder `splits`, two folds and a store case that both validate
    (e.g. the fold files of two splits in one folder); a fold whose files are absent is not
    read."""
    path = Path(splits).expanduser()
    val = [
        read_given_split(splits, k, num_folds)[1]
        if all(p.exists() for p in split_files(path, k))
        else []
        for k in range(num_folds)
    ]
    twice = {case: folds for case, folds in _folds_validating(store, val).items() if len(folds) > 1}
    if twice:
        case, (j, k, *_) = next(iter(twice.items()))
        raise UserError(
            f"split {splits}: folds {j} and {k} both validate case {case} "
            f"({plural(len(twice), 'store case')} validated in more than one fold); each case "
            "must be validated in one fold only"
        )


def _folds_validating(store, val: Sequence[Collection[str]]) -> dict[str, list[int]]:
    """{store case id: the folds validating it (indices into `val`, each fold's validation case
    ids)}, in store order, for the store cases some fold validates."""
    folds_of: dict[str, list[int]] = {}
    for k, cases in enumerate(val):
        for case in cases:
            folds_of.setdefault(case, []).append(k)
    stored = (r["case_id"] for r in store.cases)
    return {case: folds_of[case] for case in stored if case in folds_of}


def _check_given_num_folds(splits, num_folds: int) -> None:
    """Given folds are at least 2 (0 or fewer tabled no fold and said nothing)."""
    if num_folds < 2:
        raise UserError(f"split {splits}: num_folds={num_folds}; cross-validation needs 2 or more")


def _json_file(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"split file {path} does not exist") from None
    except (OSError, ValueError) as err:
        raise UserError(f"split file {path}: not readable JSON ({err})") from None


def _id_list(value, path: Path, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UserError(f"split file {path}: {key!r} is not a list of case ids")
    return value


_SPLIT_KEY = "split"  # in `fold-<k>.json`: the id of the split it is a fold of (`write_fold_files`)


def _check_one_split(folds: Sequence[Path]) -> None:
    """Refuses the `fold-<k>.json` files `folds` of one folder where their `split` ids differ
    (a `focalnet folds` stopped while renaming them: some cases validated twice, some never).
    Where none has an id (written by hand or by earlier versions) nothing is compared; where
    some have one, a file without one counts as of another split (a stopped rewrite of an
    earlier version's folder)."""
    ids = {}
    for path in folds:
        entry = _json_file(path)
        ids[path] = entry.get(_SPLIT_KEY) if isinstance(entry, dict) else None
    first = next(((p, i) for p, i in ids.items() if i is not None), None)
    other = first and next((p for p, i in ids.items() if i != first[1]), None)
    if other is not None:
        raise UserError(
            f"split folder {first[0].parent}: {first[0].name} and {other.name} are folds of two "
            f"different splits{' (the second has no split id)' if ids[other] is None else ''} "
            "(a `focalnet folds` stopped while replacing them?); write the folds again with "
            "`focalnet folds --out`"
        )


# The names of split files in a folder, per fold k: picai_baseline's pair, or `focalnet folds`'.
_PICAI_FILES = ("ds-config-train-fold-{k}.json", "ds-config-valid-fold-{k}.json")
_FOLD_FILE = "fold-{k}.json"
_SPLIT_NAMES = [
    re.compile(re.escape(name).replace(r"\{k\}", "(0|[1-9][0-9]*)"))
    for name in (*_PICAI_FILES, _FOLD_FILE)
]


def _picai_and_fold_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(picai_baseline's `ds-config-*` files, `fold-<k>.json` files) of a split folder."""
    files = split_files(folder)
    folds = [p for p in files if _SPLIT_NAMES[-1].fullmatch(p.name)]
    return [p for p in files if p not in folds], folds


def split_files(splits: str | os.PathLike, fold: int | None = None) -> list[Path]:
    """The files of `splits` (`data.splits`, `~` expanded) that `read_given_split` reads for
    `fold`, or for any fold (None), sorted. A path that is not a folder: itself. A folder, for
    `fold` k: picai_baseline's `ds-config-train-fold-<k>.json` and `ds-config-valid-fold-<k>.json`
    where either is there, else `fold-<k>.json` (named even when missing, so that reading names
    it); for any fold: every file of those names (k a decimal integer without leading zeros)."""
    path = Path(splits).expanduser()
    if not path.is_dir():
        return [path]
    if fold is not None:
        pair = [path / name.format(k=fold) for name in _PICAI_FILES]
        return pair if any(p.exists() for p in pair) else [path / _FOLD_FILE.format(k=fold)]
    return sorted(p for p in path.iterdir() if any(n.fullmatch(p.name) for n in _SPLIT_NAMES))


def _subject_list(file: Path) -> list[str]:
    """The case ids of a picai_baseline ds-config file (`{"subject_list": [...]}`)."""
    value = _json_file(file)
    return _id_list(
        value.get("subject_list") if isinstance(value, dict) else None, file, "subject_list"
    )


def read_given_split(
    splits: str | os.PathLike, fold: int, num_folds: int
) -> tuple[list[str], list[str]]:
    """(train ids, validation ids) of `fold` from `splits`, which is one of:
    a folder of picai_baseline's `ds-config-train-fold-<k>.json` and `ds-config-valid-fold-<k>.json`
    (`{"subject_list": ["<patient>_<study>", ...]}`); a folder of `fold-<k>.json`
    (`{"train": [...], "val": [...]}`, as `focalnet folds --out` writes); or a JSON file holding
    a list of `{"train": [...], "val": [...]}` per fold (nnU-Net's `splits_final.json`,
    picai_baseline's `splits.json`), of `num_folds` entries (a folder: no fold from `num_folds`
    on). Which files: `split_files`."""
    path = Path(splits).expanduser()
    if path.is_dir():
        picai, folds = _picai_and_fold_files(path)
        if picai and folds:  # read fold by fold, one kind or the other: two splits mixed
            raise UserError(
                f"split folder {path}: holds both picai_baseline split files ({picai[0].name}) "
                f"and fold files ({folds[0].name}); keep one kind"
            )
        numbers = {int(n.fullmatch(p.name)[1]) for p in picai + folds for n in _SPLIT_NAMES
                   if n.fullmatch(p.name)}  # fmt: skip
        if numbers and max(numbers) >= num_folds:  # its folds from num_folds on: never validated
            raise UserError(
                f"split folder {path}: holds fold {max(numbers)}, data.num_folds is {num_folds}"
            )
        _check_one_split(folds)
    files = split_files(path, fold)
    if len(files) == 2:  # picai_baseline's train and valid files
        train, valid = (_subject_list(file) for file in files)
        return train, valid
    where = files[0]
    if path.is_dir():  # fold-<k>.json
        entry = _json_file(where)
    else:
        table = _json_file(where)
        if not isinstance(table, list) or len(table) != num_folds:
            found = plural(len(table), "fold") if isinstance(table, list) else "no list of folds"
            raise UserError(f"split file {where}: {found}, data.num_folds is {num_folds}")
        entry = table[fold]
    if not isinstance(entry, dict):
        raise UserError(f"split file {where}: fold {fold} is not a {{'train', 'val'}} object")
    return _id_list(entry.get("train"), where, "train"), _id_list(entry.get("val"), where, "val")


def check_given_split(store, train: Sequence[str], val: Sequence[str], what: str):
    """The given (train, val) ids restricted to the store's cases, in store order. A case in both
    lists, or a patient with cases on both sides, is an error naming them; listed cases missing
    from the store (refused by --skip-bad-cases) and store cases in neither list get one warning."""
    both = sorted(set(train) & set(val))
    if both:
        raise UserError(f"{what}: case {both[0]} is in both train and val ({len(both)} such)")
    side = {c: "train" for c in train} | {c: "val" for c in val}
    patients: dict[str, tuple[str, str]] = {}  # patient -> (side, case) of its first case
    for record in store.cases:
        case, patient = record["case_id"], record["patient_id"]
        if case not in side:
            continue
        first = patients.setdefault(patient, (side[case], case))
        if first[0] != side[case]:
            raise UserError(
                f"{what}: patient {patient} has case {first[1]} in {first[0]} and {case} in "
                f"{side[case]}; a patient's studies must stay in one fold"
            )
    stored = [r["case_id"] for r in store.cases]
    missing = sorted(set(side) - set(stored))
    unused = [c for c in stored if c not in side]
    if missing or unused:
        log.warning(
            "%s: %d listed case(s) not in store %s (first: %s); %d store case(s) in neither list "
            "(first: %s)", what, len(missing), store.path, ", ".join(missing[:3]) or "-",
            len(unused), ", ".join(unused[:3]) or "-",
        )  # fmt: skip
    train_ids = [c for c in stored if side.get(c) == "train"]
    val_ids = [c for c in stored if side.get(c) == "val"]
    if not train_ids or not val_ids:
        empty = "train" if not train_ids else "val"
        raise UserError(f"{what}: none of its {empty} cases is in store {store.path}")
    return train_ids, val_ids


def fold_table(store, num_folds: int = 5, seed: int = 0, splits="") -> list[dict]:
    """Per fold: patients, cases, slices (all stored; `annotated`: those with a lesion, which
    `data.slices=annotated` trains and validates on) and patients per highest class of its
    validation cases (for printing), of the seeded folds or of the split files `splits` names (a
    case that they validate in several folds counted in each, and named in a warning)."""
    if splits:
        _check_given_num_folds(splits, num_folds)
        max_class = store.patient_max_class()
        val = [set(_given_fold(store, k, num_folds, splits)[1]) for k in range(num_folds)]
        _warn_validated_twice_or_never(store, val, splits)
    else:
        folds, max_class = store_folds(store, num_folds, seed)
        val = [
            {r["case_id"] for r in store.cases if folds[r["patient_id"]] == k}
            for k in range(num_folds)
        ]
    rows = []
    for k in range(num_folds):
        cases = [r for r in store.cases if r["case_id"] in val[k]]
        patients = sorted({r["patient_id"] for r in cases})
        per_class = [sum(max_class[p] == c for p in patients) for c in range(6)]
        rows.append(
            {
                "fold": k,
                "patients": len(patients),
                "cases": len(cases),
                "slices": int(sum(r["stop"] - r["start"] for r in cases)),
                "annotated": int(sum(store.annotated[r["start"] : r["stop"]].sum() for r in cases)),
                "patients_per_max_class": per_class,
                "case_ids": [r["case_id"] for r in cases],
            }
        )
    return rows


def _warn_validated_twice_or_never(store, val: Sequence[set], splits) -> None:
    """One warning naming the store cases that the split files `splits` validate in more than
    one fold (`val`: each fold's validation case ids), and those they validate in none."""
    folds_of = _folds_validating(store, val)
    twice = [c for c, folds in folds_of.items() if len(folds) > 1]
    never = [r["case_id"] for r in store.cases if r["case_id"] not in folds_of]
    if twice or never:
        first = f"{twice[0]}, folds {', '.join(map(str, folds_of[twice[0]]))}" if twice else "-"
        log.warning(
            "split %s: %d store case(s) in the validation of more than one fold (first: %s); %d "
            "in the validation of none (first: %s)", splits, len(twice), first, len(never),
            ", ".join(never[:3]) or "-",
        )  # fmt: skip


def write_fold_files(
    store, out_dir: str | os.PathLike, num_folds: int = 5, seed: int = 0
) -> list[Path]:
    """`fold-<k>.json` files with {"train": [case ids], "val": [case ids], "split": id}: every
    split made and every file written to a temporary file before any is renamed into place (a
    failure while making or writing them, e.g. a full disk, leaves the previous files). A stop
    between the renames leaves files of two splits, which `read_given_split` refuses by their
    `split` ids (a hash of every fold's validation cases). Once all are in place, the
    `fold-<j>.json` of an earlier split for j >= `num_folds` are removed
    (`_remove_later_folds`): read with the new files, they would validate cases twice. A folder
    holding picai_baseline's split files is refused."""
    out_dir = Path(out_dir)
    if out_dir.is_dir() and (picai := _picai_and_fold_files(out_dir)[0]):
        raise UserError(
            f"--out {out_dir} holds {picai[0].name}, a picai_baseline split file, which a split "
            "folder is read by before fold-<k>.json: the folds written would be ignored; choose "
            "another folder"
        )
    splits = [split_cases(store, k, num_folds, seed) for k in range(num_folds)]
    paths = [out_dir / _FOLD_FILE.format(k=k) for k in range(num_folds)]
    split = hashlib.sha256(json.dumps([val for _, val in splits]).encode()).hexdigest()[:16]
    with contextlib.ExitStack() as renames:  # each file renamed as the stack unwinds
        for path, (train, val) in zip(paths, splits, strict=True):
            tmp = renames.enter_context(replaced_atomically(path))
            entry = {"train": train, "val": val, _SPLIT_KEY: split}
            tmp.write_text(json.dumps(entry, indent=1) + "\n")
    _remove_later_folds(out_dir, num_folds)
    return paths


def _remove_later_folds(out_dir: Path, num_folds: int) -> None:
    """Removes the `fold-<j>.json` of `out_dir` for j >= `num_folds` (of an earlier split into
    more folds), named in one warning."""
    numbered = ((m, p) for p in split_files(out_dir) if (m := _SPLIT_NAMES[-1].fullmatch(p.name)))
    later = sorted((int(m[1]), p) for m, p in numbered if int(m[1]) >= num_folds)
    for _, path in later:
        path.unlink(missing_ok=True)
    if later:
        names = ", ".join(path.name for _, path in later)
        log.warning("%s: removed %s, of an earlier split into more folds", out_dir, names)


SLICE_MODES = ("annotated", "all")


def case_rows(store, case_ids: Sequence[str], slices: str = "annotated") -> np.ndarray:
    """Store rows (int64, ascending) of the given cases; `annotated` keeps slices with lesions."""
    if slices not in SLICE_MODES:
        raise UserError(f"data.slices: expected one of {SLICE_MODES}, got {slices!r}")
    parts = [np.arange(r["start"], r["stop"]) for r in map(store.case, case_ids)]
    rows = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if slices == "annotated":
        rows = rows[np.asarray(store.annotated)[rows]]
    return np.sort(rows).astype(np.int64)
