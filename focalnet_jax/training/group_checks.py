"""What every process of a group must share, checked as a training run starts, each a `UserError`
(one line) in a process that differs from process 0, which `group_failures.together` makes every
process end with: the number of devices it drives, the config, the store's data, the workdir."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import jax
import ml_collections

from focalnet_jax.errors import UserError, plural
from focalnet_jax.run import workdir as workdir_lib
from focalnet_jax.training import group_failures

WORKDIR_WAIT_S = 30.0  # how long a lock file written by process 0 may take to show elsewhere


def check_same_device_count() -> None:
    """A process driving another number of devices than process 0 (another node's GPUs,
    CUDA_VISIBLE_DEVICES, XLA_FLAGS): the batch splits per device, and the group ended in a
    traceback from its first collective (an array of one layout reshaped to another)."""
    if jax.process_count() == 1:
        return
    mine = jax.local_device_count()
    first = int(group_failures.process0_value(str(mine)))
    if mine != first:
        raise UserError(
            f"process {jax.process_index()} drives {plural(mine, 'device')}, process 0 "
            f"{plural(first, 'device')}: every process of a group drives as many (give each the "
            "same GPUs: CUDA_VISIBLE_DEVICES, --gpus-per-task, XLA_FLAGS)"
        )


def check_same_config(config: ml_collections.ConfigDict) -> None:
    """A `UserError` in a process of a group started with another config than process 0's (its
    command differs): it trained the checkpoint with mixed settings while `config.json` recorded
    process 0's, or ended in a traceback at the first save (other steps)."""
    mine = config.to_json(sort_keys=True)
    first = group_failures.process0_value(mine)
    # Paths may name one store otherwise (a link, another mount): its data are compared instead.
    paths = workdir_lib.PATH_KEYS
    if changed := workdir_lib.config_changes(json.loads(first), json.loads(mine), allowed=paths):
        raise UserError(
            f"process {jax.process_index()} was started with another config than process 0: "
            f"{'; '.join(changed)}; start every process with the same command"
        )


def check_same_store(store) -> None:
    """A `UserError` in a process of a group whose store holds other settings, cases or case
    data than process 0's (by whatever path each reaches it)."""
    if jax.process_count() == 1:
        return
    cases = [(record["case_id"], record.get("data_sha256")) for record in store.cases]
    mine = json.dumps({"fingerprint": store.fingerprint, "cases": cases})
    if group_failures.process0_value(mine) != mine:
        raise UserError(
            f"process {jax.process_index()}'s store {store.path} holds other settings, cases or "
            "data than process 0's; give every process the same store"
        )


def check_same_workdir(workdir: Path, lock_file: Path) -> None:
    """A process whose `workdir` is not process 0's folder, by whatever path it names it (a link,
    another mount): that folder holds the training lock `lock_file` process 0 took (its holder
    line and inode, waited for up to `WORKDIR_WAIT_S`). Another folder, or the same path on a
    disk process 0 does not see (node-local scratch), is refused: each process wrote its share
    of the checkpoints into its own workdir, and the group hung at their commit (20 minutes,
    then killed), the run lost. Nothing to compare where process 0 took no lock (a file system
    without locks)."""
    if jax.process_count() == 1:
        return
    mine = json.dumps({"path": os.path.abspath(workdir), "holder": _holder(lock_file)})
    first = json.loads(group_failures.process0_value(mine))
    if jax.process_index() == 0 or first["holder"] is None:
        return
    deadline = time.monotonic() + WORKDIR_WAIT_S
    while _holder(lock_file) != first["holder"]:
        if time.monotonic() > deadline:
            raise UserError(
                f"process {jax.process_index()}'s workdir {workdir} holds no training lock of "
                f"process 0, which trains in {first['path']}: another folder, or one on a disk "
                "process 0 does not see; give every process the same --workdir, on a file "
                "system every process sees"
            )
        time.sleep(0.5)


def _holder(lock_file: Path) -> str | None:
    """A training lock as the processes of a group see it: its holder line and its file's inode
    (a stale lock left elsewhere by a killed run may hold the same line: `pid 1` in a container
    of the same host name); None where there is none to read."""
    try:
        with lock_file.open() as lock:
            line = lock.read().strip()
            inode = os.fstat(lock.fileno()).st_ino
    except (OSError, UnicodeDecodeError):
        return None
    return f"{line} (inode {inode})" if line else None
