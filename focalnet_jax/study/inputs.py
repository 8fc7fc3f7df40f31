"""What a study's cells train on, recorded when the study is: digests of the base config (as
loaded, so that edits of the files it imports count), of the store's case table (which holds each
case's `data_sha256`, so a store preprocessed again from changed images differs) and, where
`data.splits` (of the base config or `common`) names given folds, of those split files.

The spec names both by path only. Edited between cells, they would give the cells that are done
and those still to run other recipes or data, and the study's comparisons would mix them without
a word; `check_inputs` refuses that before a cell starts (`study run`, and each cell itself, which
may start hours later from a queue). A study recorded before its inputs were is not checked.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

from focalnet_jax.data.folds import split_files
from focalnet_jax.study.spec import StudyError, flatten

INPUTS = "inputs"  # the key of study.json holding the digests


def input_digests(plain: Mapping) -> dict[str, str]:
    """{'base_config': sha256 of the loaded base config, 'store_cases': sha256 of the store's
    cases.json, and where `data.splits` is set 'splits': `splits_digest`} (hex) of a validated
    spec."""
    from focalnet_jax.config_loading import load_config

    try:
        loaded = load_config(plain["base"])  # a file that no longer loads: a UserError naming it
    except FileNotFoundError as error:
        raise StudyError(str(error)) from None
    config = loaded.to_json_best_effort(sort_keys=True)
    cases = Path(plain["store"]).expanduser() / "cases.json"
    try:
        store_cases = cases.read_bytes()
    except OSError as error:  # e.g. the store's file system not mounted where a cell runs
        reason = f"cannot read {cases} ({error.strerror})"
        raise StudyError(f"store {plain['store']}: {reason}") from None
    digests = {
        "base_config": hashlib.sha256(config.encode()).hexdigest(),
        "store_cases": hashlib.sha256(store_cases).hexdigest(),
    }
    splits = given_splits(plain, loaded)
    return {**digests, "splits": splits_digest(splits)} if splits else digests


def given_splits(plain: Mapping, base_config) -> str:
    """The `data.splits` every cell trains with: `common`'s, else the base config's ('' for none;
    an arm may not set it, `spec.FOLD_KEYS`)."""
    common = dict(flatten(plain.get("common", {})))
    if "data.splits" in common:
        return str(common["data.splits"] or "")
    data = base_config.get("data")
    return str(data.get("splits", "") or "") if data is not None else ""


def splits_digest(splits: str) -> str:
    """sha256 (hex) of the split files `data.splits` names (`data.folds.split_files`, every
    fold: the file, or the folder's split files), each as its name, NUL, its bytes."""
    digest = hashlib.sha256()
    try:
        files = split_files(splits)
        for file in files:
            digest.update(file.name.encode() + b"\0" + file.read_bytes())
    except OSError as error:
        raise StudyError(
            f"data.splits {splits}: cannot read {error.filename} ({error.strerror})"
        ) from None
    if not files:
        raise StudyError(f"data.splits {splits}: the folder holds no split files")
    return digest.hexdigest()


def _input_name(plain: Mapping, key: str) -> str:
    """How the message of `check_inputs` names the input of digest `key`."""
    if key == "splits":
        from focalnet_jax.config_loading import load_config

        return f"splits {given_splits(plain, load_config(plain['base'])) or '(now unset)'}"
    return {
        "base_config": f"base config {plain['base']}",
        "store_cases": f"store {plain['store']}",
    }[key]


def check_inputs(plain: Mapping, where: str | Path) -> None:
    """Raises a `StudyError` naming what changed when the base config, the store's cases or the
    split files differ from those recorded in `plain` (a study.json's contents)."""
    recorded = plain.get(INPUTS)
    if not recorded:
        return
    current = input_digests(plain)
    # A digest recorded before its kind was (splits) is not there to compare.
    kinds = ("base_config", "store_cases", "splits")
    changed = [k for k in kinds if k in recorded and recorded[k] != current.get(k)]
    changed = [_input_name(plain, k) for k in changed]
    if changed:
        raise StudyError(
            f"{where}: the study's {' and '.join(changed)} changed since the study was recorded; "
            "its cells would not share one recipe and data: restore it, or use a new --workdir"
        )
