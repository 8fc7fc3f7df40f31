"""Damage of an Orbax checkpoint step folder found without reading its arrays, and the failures of
a read that mean damage.

`find_damage` looks at the files: a missing or empty file, invalid JSON metadata, an OCDBT data
file shorter than the data it is said to hold. `step_damage` adds the content digests written at
save time (`checkpoint_digests`: a block overwritten in place keeps the size). `read_failure`
picks TensorStore's read error out of a failed restore, and `DAMAGE_STATUS` says which of its
statuses mean bad content; `unusable_values` finds restored values no model could use (NaN, a
negative running variance); a file that cannot be read for permission is not damage (a
`PermissionError` naming it: the step is whole, and the user's to fix).
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import jax
import numpy as np
import tensorstore as ts

from focalnet_jax.run import checkpoint_digests

ITEM_DIR = "default"  # the folder of the train state inside a step folder (Orbax's single item)

_JSON_FILES = ("_CHECKPOINT_METADATA", f"{ITEM_DIR}/_METADATA", f"{ITEM_DIR}/_sharding")
_REQUIRED_FILES = (f"{ITEM_DIR}/_METADATA", f"{ITEM_DIR}/manifest.ocdbt")

# TensorStore's status codes of a read that found the stored content bad (a block that does not
# decompress or decode); others (PERMISSION_DENIED, UNAVAILABLE, RESOURCE_EXHAUSTED, ...) are of
# the environment, and the step is not damaged.
DAMAGE_STATUS = ("DATA_LOSS", "FAILED_PRECONDITION", "INVALID_ARGUMENT", "OUT_OF_RANGE")


def read_failure(error: BaseException) -> str | None:
    """The first line of TensorStore's read error behind a failed restore (`<STATUS>: Error
    reading "<array>" in OCDBT database ...: <reason>`), or None when the failure is not a read
    of the files."""
    while error is not None:
        line = str(error).split("\n", 1)[0]
        if isinstance(error, ValueError) and "Error reading" in line:
            return line
        error = error.__cause__ or error.__context__
    return None


def find_damage(step_dir: str | Path) -> str | None:
    """`"<file>: <reason>"` for the first damaged file of an Orbax step folder, or None when its
    files look whole (a missing or empty file, invalid JSON metadata, an OCDBT data file shorter
    than the data it is said to hold)."""
    step_dir = Path(step_dir)
    for name in _REQUIRED_FILES:
        if not (step_dir / name).is_file():
            return f"{name}: missing"
    digest_file = checkpoint_digests.is_digest_file  # checked by `checkpoint_digests.mismatch`
    for path in sorted(p for p in step_dir.rglob("*") if p.is_file() and not digest_file(p)):
        if path.stat().st_size == 0:
            return f"{path.relative_to(step_dir)}: empty file (0 bytes)"
    json_files = [*_JSON_FILES, f"{ITEM_DIR}/array_metadatas/*"]
    for path in sorted(p for pattern in json_files for p in step_dir.glob(pattern)):
        try:
            json.loads(path.read_bytes())
        except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
            return f"{path.relative_to(step_dir)}: invalid JSON ({error})"
    return _ocdbt_damage(step_dir / ITEM_DIR)


def step_damage(step_dir: Path) -> str | None:
    """`"<file>: <reason>"` of a step folder's first damage found without reading its arrays
    (`find_damage`, then the content digests of `checkpoint_digests`), or None. An OCDBT node
    that fails to decode names only its database folder: the digests name the file."""
    damage = find_damage(step_dir)
    if damage is not None and damage.startswith(f"{ITEM_DIR}/: "):
        return checkpoint_digests.mismatch(step_dir) or damage
    return damage or checkpoint_digests.mismatch(step_dir)


def _ocdbt_damage(database: Path) -> str | None:
    """First missing or truncated file the OCDBT database at `database` refers to, or None."""
    try:
        kvstore = ts.KvStore.open({"driver": "file", "path": f"{database}/"}).result()
        manifest = ts.ocdbt.dump(kvstore).result()
        pending = [v["root"]["location"] for v in manifest["versions"] if "location" in v["root"]]
        while pending:
            location = pending.pop()
            damage = _reference_damage(database, location)
            if damage is not None:
                return damage
            for entry in ts.ocdbt.dump(kvstore, location).result()["entries"]:
                for value in entry.values():
                    if isinstance(value, str) and value.startswith("btreenode:"):
                        pending.append(value)
                    elif isinstance(value, str) and value.startswith("value:"):
                        damage = _reference_damage(database, value)
                        if damage is not None:
                            return damage
    except ValueError as error:  # TensorStore errors name the file they could not decode
        reason = str(error).split(" [tensorstore_spec", 1)[0]
        if reason.startswith("PERMISSION_DENIED"):  # the user's to fix; the step is whole
            raise PermissionError(errno.EACCES, reason, f"{database}/") from error
        return f"{database.name}/: {reason}"
    return None


def _reference_damage(database: Path, location: str) -> str | None:
    """Damage of one OCDBT reference `kind:<base>:<file>:<offset>:<length>`, or None."""
    head, file, offset, length = location.rsplit(":", 3)
    path = database / head.split(":", 1)[1] / file
    name = path.relative_to(database.parent)
    if not path.is_file():
        return f"{name}: missing"
    size, end = path.stat().st_size, int(offset) + int(length)
    if size < end:
        return f"{name}: truncated ({size} bytes; the checkpoint refers to bytes up to {end})"
    return None


def unusable_values(state) -> str | None:
    """`"<array>: N of M values are not finite"` for the first such array of `state` (a restored
    train state or its variables; replicated arrays are read on this host), or `"...: N of M
    running variances are negative"` for a BatchNorm variance (`batch_stats/**/var`) below 0
    (the model would compute NaN); None when neither. Training saves neither (it stops on NaN;
    its variances average batch variances), so they come of damage that no digest was there to
    find (a step saved without them) or an unchecked start."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        name, leaf = leaf_name(path), np.asarray(leaf)
        if bad := int(np.size(leaf) - np.count_nonzero(np.isfinite(leaf))):
            return f"{name}: {bad} of {np.size(leaf)} values are not finite"
        variance = name.startswith("batch_stats/") and name.endswith("/var")
        if variance and (bad := int(np.count_nonzero(leaf < 0))):
            return f"{name}: {bad} of {np.size(leaf)} running variances are negative"
    return None


def leaf_name(path) -> str:
    """`params/backbone/conv1/kernel`: a pytree path without the kinds of its keys (a saved dict
    and the dataclass or named tuple it came from give the same name)."""
    return "/".join(
        str(next(getattr(k, a) for a in ("key", "name", "idx") if hasattr(k, a))) for k in path
    )
