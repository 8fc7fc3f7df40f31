"""SHA-256 digests of a checkpoint step folder's files, written once the step is on disk and checked
before it is restored.

Damaged content of the same size (a zeroed or overwritten block of an OCDBT data file) is found by
no look at the files: a block stored raw restores silently as other weights (zeros, NaN), a
compressed one fails inside Orbax's concurrent reads with a traceback of hundreds of lines. The
digests (`DIGEST_FILE` in the step folder: each file's size and SHA-256) name the damaged file
before Orbax reads anything. Training writes them at the first log step after a save is on disk
(or at the next save, the end or the stop of the run), for the steps it saved itself: a step
without them (an older run, or one killed before) is restored unchecked, as before, and keeps
none, since digests written later would record what it holds then as its content at save time.

`variables_digest` names a set of weights however they were loaded (a checkpoint, a copy, a
pretrained file), as predictions record them and process groups compare them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jax
import numpy as np

from focalnet_jax.data.atomic_files import write_json_atomic

DIGEST_FILE = "focalnet_digests.json"
_ALGORITHM = "sha256"


def variables_digest(variables) -> str:
    """The first 16 hex digits of the SHA-256 of a variables tree (each leaf's path, dtype, shape
    and bytes, in path order): one value for one set of weights, however they were loaded."""
    digest = hashlib.sha256()
    for path, leaf in sorted(
        jax.tree_util.tree_leaves_with_path(variables),
        key=lambda item: jax.tree_util.keystr(item[0]),
    ):
        array = np.ascontiguousarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def _file_digest(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, _ALGORITHM).hexdigest()


def is_digest_file(path: Path) -> bool:
    """`DIGEST_FILE`, or the temporary file of its atomic write (left by a process killed while
    it wrote: not part of the step's checkpoint)."""
    return path.name == DIGEST_FILE or path.name.startswith(f".{DIGEST_FILE}.tmp-")


def _step_files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and not is_digest_file(p))


def _files_digest(files: dict) -> str:
    """The digest of the `files` record itself: a changed byte of the digest file is named as
    such, not as a change of the checkpoint file whose record it hit."""
    text = json.dumps(files, sort_keys=True, separators=(",", ":"))
    return hashlib.new(_ALGORITHM, text.encode()).hexdigest()


def write(step_dir: str | Path) -> Path:
    """Writes `step_dir/DIGEST_FILE` (atomically): `{"algorithm": "sha256", "files": {relative
    path: {"bytes": size, "sha256": hex digest}}, "files_sha256": the digest of "files"}` of every
    file of the step folder."""
    step_dir = Path(step_dir)
    files = {
        str(path.relative_to(step_dir)): {
            "bytes": path.stat().st_size,
            _ALGORITHM: _file_digest(path),
        }
        for path in _step_files(step_dir)
    }
    record = {"algorithm": _ALGORITHM, "files": files, "files_sha256": _files_digest(files)}
    return write_json_atomic(record, step_dir / DIGEST_FILE)


def write_missing(checkpoint_dir: str | Path, *, newer_than: int) -> list[int]:
    """Digests for each finished step folder (all-digit name) of `checkpoint_dir` past step
    `newer_than` (the step a training session started from: the later ones it saved itself)
    without them; returns those steps. Call once no save is pending
    (`CheckpointManager.wait_until_finished`)."""
    checkpoint_dir = Path(checkpoint_dir)
    steps = sorted(
        int(path.name)
        for path in checkpoint_dir.glob("*")
        if path.is_dir()
        and path.name.isdigit()
        and int(path.name) > newer_than
        and not (path / DIGEST_FILE).exists()
    )
    for step in steps:
        write(checkpoint_dir / str(step))
    return steps


def mismatch(step_dir: str | Path) -> str | None:
    """`"<file>: <reason>"` for the first file of `step_dir` whose size or SHA-256 differs from its
    digest at save time (or that is gone), None when all match or the step has no digests."""
    step_dir = Path(step_dir)
    path = step_dir / DIGEST_FILE
    if not path.is_file():
        return None
    try:
        recorded = json.loads(path.read_bytes())
        files = recorded["files"]
        if recorded["algorithm"] != _ALGORITHM:
            return f"{DIGEST_FILE}: unknown algorithm {recorded['algorithm']!r}"
        for name, saved in files.items():
            if not (isinstance(saved["bytes"], int) and isinstance(saved[_ALGORITHM], str)):
                raise TypeError(f"{name}: {saved!r}")
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        return f"{DIGEST_FILE}: not a digest file ({type(error).__name__}: {error})"
    # Digest files written before "files_sha256" existed are read without it.
    if "files_sha256" in recorded and recorded["files_sha256"] != _files_digest(files):
        return f"{DIGEST_FILE}: changed since it was written (its files_sha256 differs)"
    for name, saved in files.items():
        file = step_dir / name
        if not file.is_file():
            return f"{name}: missing (listed in {DIGEST_FILE})"
        size = file.stat().st_size
        if size != saved["bytes"]:
            return f"{name}: {size} bytes, {saved['bytes']} when saved"
        if _file_digest(file) != saved[_ALGORITHM]:
            return f"{name}: content changed since it was saved ({_ALGORITHM} differs)"
    return None
