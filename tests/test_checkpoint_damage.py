"""Damaged checkpoints read for inference (focalnet_jax/workdir.py, run/checkpoint_damage.py):
`load_for_inference`, predict and evaluate name the damaged step folder, file and reason in one
line; each saved step's digests; variables that are not finite, or negative running variances,
are refused; a step unreadable for permission is not called damaged."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import damaged_checkpoints
import jax
import numpy as np
import pytest
from damaged_checkpoints import (
    DATA_DIR,
    _overwrite_data,
    _truncate_data,
    copy_with,
    largest_data_file,
    truncate,
)
from test_train_helpers import REPO

from focalnet_jax.run import checkpoint_damage
from focalnet_jax.run import checkpoint_digests as digests
from focalnet_jax.run import workdir as workdir_lib
from focalnet_jax.training import checkpoint

trained = damaged_checkpoints.trained  # a module-scoped fixture


def _flip_btree_root(step_dir: Path) -> str:
    """One bit flipped in the OCDBT b-tree's root node: the database fails to decode (a CRC error
    naming only `default/`), the digests name the file."""
    import tensorstore as ts

    database = step_dir / "default"
    kvstore = ts.KvStore.open({"driver": "file", "path": f"{database}/"}).result()
    versions = ts.ocdbt.dump(kvstore).result()["versions"]
    location = next(v["root"]["location"] for v in versions if "location" in v["root"])
    head, file, offset, length = location.rsplit(":", 3)
    path = database / head.split(":", 1)[1] / file
    data = bytearray(path.read_bytes())
    data[int(offset) + int(length) // 2] ^= 1
    path.write_bytes(bytes(data))
    return f"{path.relative_to(step_dir)}: content changed since it was saved (sha256 differs)"


def _without_digests(step_dir: Path, name: str, text: str) -> None:
    (step_dir / digests.DIGEST_FILE).unlink()
    (step_dir / name).write_text(text)


def _edit_digests(step_dir: Path, edit) -> None:
    """The step's digest file, still valid JSON, after `edit(record)` changed its object."""
    path = step_dir / digests.DIGEST_FILE
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record, indent=1))


def _first_file(record: dict) -> dict:
    return next(iter(record["files"].values()))


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda d: truncate(d / "default/_METADATA", 1000), "default/_METADATA: invalid JSON ("),
        (lambda d: truncate(d / "default/manifest.ocdbt", 0), "default/manifest.ocdbt: empty"),
        (lambda d: shutil.rmtree(d / "default"), "default/_METADATA: missing"),
        # Without the digests (an older run) that would see the size change first.
        (lambda d: _without_digests(d, "default/_METADATA", "{}"), "default/_METADATA: no array"),
        (_overwrite_data, f"{DATA_DIR}/"),
        (lambda d: (d / digests.DIGEST_FILE).write_text("[]"), f"{digests.DIGEST_FILE}: not a"),
        # Valid JSON, a changed key or value: a KeyError or AttributeError traceback.
        (
            lambda d: _edit_digests(d, lambda r: _first_file(r).pop("bytes")),
            f"{digests.DIGEST_FILE}: not a digest file (KeyError",
        ),
        (
            lambda d: _edit_digests(d, lambda r: r.update(files=list(r["files"].values()))),
            f"{digests.DIGEST_FILE}: not a digest file (AttributeError",
        ),
        # A changed digest blamed the intact file it describes.
        (
            lambda d: _edit_digests(d, lambda r: _first_file(r).update(sha256="0" * 64)),
            f"{digests.DIGEST_FILE}: changed since it was written (its files_sha256 differs)",
        ),
        # Orbax reads no array metadata: from a changed `_sharding` as from `_METADATA`.
        (
            lambda d: _without_digests(d, "default/_sharding", "{}"),
            "default/_METADATA or default/_sharding: no array metadata",
        ),
    ],
)
def test_inference_loading_names_the_file_and_reason(trained, tmp_path, damage, reason):
    workdir = tmp_path / "run"
    shutil.copytree(trained["workdir"], workdir)
    assert checkpoint_damage.find_damage(workdir / "checkpoints" / "4") is None  # intact before
    damage(workdir / "checkpoints" / "4")
    step_dir = (workdir / "checkpoints" / "4").resolve()
    with pytest.raises(workdir_lib.UnreadableCheckpointError) as raised:
        workdir_lib.load_for_inference(workdir)
    assert str(raised.value).startswith(f"checkpoint {step_dir} is unreadable: {reason}")


def test_a_node_that_fails_to_decode_is_named_by_its_file(trained, tmp_path):
    """A flipped bit in a b-tree node was reported as `default/: DATA_LOSS: Error decoding
    b-tree node ...`, naming no file, though the step's digests name it."""
    workdir = tmp_path / "run"
    shutil.copytree(trained["workdir"], workdir)
    step_dir = workdir / "checkpoints" / "4"
    expected = _flip_btree_root(step_dir)
    assert checkpoint_damage.find_damage(step_dir).startswith("default/: DATA_LOSS: ")
    assert checkpoint_damage.step_damage(step_dir) == expected
    with pytest.raises(workdir_lib.UnreadableCheckpointError) as raised:
        workdir_lib.load_for_inference(workdir)
    assert str(raised.value) == f"checkpoint {step_dir.resolve()} is unreadable: {expected}"


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "focalnet_jax.cli", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def test_predict_and_evaluate_name_the_damaged_checkpoint(trained, tmp_path):
    workdir, expected = copy_with(trained, "for_inference", _truncate_data)
    step_dir = (workdir / "checkpoints" / "4").resolve()
    reason = f"checkpoint {step_dir} is unreadable: {expected}"
    with pytest.raises(workdir_lib.UnreadableCheckpointError, match="truncated"):
        workdir_lib.load_for_inference(workdir)
    _, variables = workdir_lib.load_for_inference(workdir, step=2)  # the intact step still loads
    assert jax.tree.leaves(variables["params"])
    predict = _cli(
        "predict", f"--checkpoint={workdir}", "--t2w=unused", "--adc=unused", f"--out={tmp_path}"
    )
    evaluate = _cli("evaluate", f"--workdir={workdir}", f"--out={tmp_path / 'eval'}")
    for name, result in (("predict", predict), ("evaluate", evaluate)):
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith(f"focalnet {name}: error: {reason}"), result.stderr
    assert not (tmp_path / "eval").exists()  # nothing half-written
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]


def test_a_step_saved_without_digests_fails_its_read_in_one_line(trained, tmp_path):
    """A step of an older run (no digests) whose compressed data no longer decompresses: the
    failed TensorStore read is an `UnreadableCheckpointError` naming it, not a traceback."""
    workdir = tmp_path / "run"
    shutil.copytree(trained["workdir"], workdir)
    step_dir = workdir / "checkpoints" / "4"
    (step_dir / digests.DIGEST_FILE).unlink()
    for path in (step_dir / DATA_DIR).iterdir():  # some hold raw blocks, which read as zeros
        data = bytearray(path.read_bytes())
        data[len(data) // 2 : len(data) // 2 + 4096] = bytes(len(data[len(data) // 2 :][:4096]))
        path.write_bytes(bytes(data))
    assert checkpoint_damage.find_damage(step_dir) is None  # nothing to see by looking
    with pytest.raises(workdir_lib.UnreadableCheckpointError) as raised:
        workdir_lib.load_for_inference(workdir)
    message = str(raised.value)
    assert message.startswith(f"checkpoint {step_dir.resolve()} is unreadable: ")
    assert "Error reading" in message and "\n" not in message


def test_the_temporary_file_of_an_interrupted_digest_write_is_no_damage(trained, tmp_path):
    """A process killed while it wrote a step's digests left `.focalnet_digests.json.tmp-<pid>`,
    empty, in the step folder: the intact step was called damaged (an empty file), a resume
    moved it aside and `predict` refused it."""
    workdir = tmp_path / "run"
    shutil.copytree(trained["workdir"], workdir)
    step_dir = workdir / "checkpoints" / "4"
    (step_dir / digests.DIGEST_FILE).unlink()
    (step_dir / f".{digests.DIGEST_FILE}.tmp-4242").write_bytes(b"")
    assert checkpoint_damage.step_damage(step_dir) is None
    workdir_lib.load_for_inference(workdir)
    digests.write(step_dir)  # written again, the leftover not among the files it records
    recorded = json.loads((step_dir / digests.DIGEST_FILE).read_text())["files"]
    assert not any(".tmp-" in name for name in recorded) and digests.mismatch(step_dir) is None


def test_digests_are_written_for_each_saved_step_and_match(trained):
    for step in (2, 4):
        step_dir = trained["workdir"] / "checkpoints" / str(step)
        recorded = json.loads((step_dir / digests.DIGEST_FILE).read_text())["files"]
        files = sorted(
            str(p.relative_to(step_dir)) for p in step_dir.rglob("*")
            if p.is_file() and p.name != digests.DIGEST_FILE
        )  # fmt: skip
        assert sorted(recorded) == files and digests.mismatch(step_dir) is None
        name = f"{DATA_DIR}/" + largest_data_file(step_dir).name
        content = (step_dir / name).read_bytes()
        assert recorded[name] == {
            "bytes": len(content),
            "sha256": hashlib.sha256(content).hexdigest(),
        }


def test_a_step_without_digests_gets_them_once_no_save_is_in_progress(trained, tmp_path):
    """What each log step of a run calls: a run killed after a save finished and before the next
    one started left that (its newest) step without digests."""
    workdir = tmp_path / "run"
    shutil.copytree(trained["workdir"], workdir)
    step_dir = workdir / "checkpoints" / "4"
    recorded = (step_dir / digests.DIGEST_FILE).read_text()
    (step_dir / digests.DIGEST_FILE).unlink()
    manager = workdir_lib.make_manager(workdir)
    checkpoint.write_finished_digests(manager, newer_than=0)
    manager.close()
    assert (step_dir / digests.DIGEST_FILE).read_text() == recorded


def test_inference_refuses_variables_that_are_not_finite(trained, tmp_path):
    """Variables saved with NaN (damage without digests to find it; training never saves them)
    are refused naming the array, not run into NaN scores."""
    workdir = tmp_path / "run"
    shutil.copytree(trained["workdir"], workdir)
    state = jax.device_get(trained["final"])
    kernel = state.params["aspp"]["branch0"]["kernel"]
    state = state.replace(
        params={**state.params, "aspp": {**state.params["aspp"], "branch0": {
            **state.params["aspp"]["branch0"], "kernel": np.where(np.arange(kernel.size).reshape(
                kernel.shape) < 3, np.nan, kernel)}}}
    )  # fmt: skip
    manager = workdir_lib.make_manager(workdir)
    checkpoint.save(manager, 6, state, newer_than=0)
    checkpoint.finish_saves(manager, newer_than=0)
    manager.close()
    assert digests.mismatch(workdir / "checkpoints" / "6") is None
    with pytest.raises(workdir_lib.UnreadableCheckpointError) as raised:
        workdir_lib.load_for_inference(workdir)
    step_dir = (workdir / "checkpoints" / "6").resolve()
    assert str(raised.value) == (
        f"checkpoint {step_dir} is unreadable: params/aspp/branch0/kernel: 3 of {kernel.size} "
        "values are not finite"
    )


def test_inference_refuses_negative_running_variances(trained, tmp_path):
    """Finite variables whose BatchNorm variance is below 0 (a run started from such weights)
    made every score NaN, and predict failed later in the lesion candidates."""
    workdir = tmp_path / "run"
    shutil.copytree(trained["workdir"], workdir)
    state = jax.device_get(trained["final"])
    stats = state.batch_stats["backbone"]
    var = stats["bn1"]["var"]
    state = state.replace(
        batch_stats={
            **state.batch_stats,
            "backbone": {**stats, "bn1": {**stats["bn1"], "var": -var}},
        }
    )
    manager = workdir_lib.make_manager(workdir)
    checkpoint.save(manager, 6, state, newer_than=0)
    checkpoint.finish_saves(manager, newer_than=0)
    manager.close()
    with pytest.raises(workdir_lib.UnreadableCheckpointError) as raised:
        workdir_lib.load_for_inference(workdir)
    assert str(raised.value) == (
        f"checkpoint {(workdir / 'checkpoints' / '6').resolve()} is unreadable: "
        f"batch_stats/backbone/bn1/var: {var.size} of {var.size} running variances are negative"
    )


def _unreadable_data(step_dir: Path) -> tuple[Path, str]:
    """A data file without read permission, the digests removed (so TensorStore meets it)."""
    (step_dir / digests.DIGEST_FILE).unlink()
    largest_data_file(step_dir).chmod(0)
    return step_dir.resolve(), "Error reading"


def _unreadable_manifest(step_dir: Path) -> tuple[Path, str]:
    """The OCDBT manifest without read permission (read by the look for damage, first)."""
    (step_dir / "default" / "manifest.ocdbt").chmod(0)
    return step_dir.resolve() / "default", "manifest.ocdbt"


@pytest.mark.parametrize("unreadable", [_unreadable_data, _unreadable_manifest])
def test_a_step_that_cannot_be_read_for_permission_is_not_called_damaged(
    trained, tmp_path, unreadable
):
    """A one-line PermissionError naming the step, not `UnreadableCheckpointError`, which a
    resuming run would answer by moving the whole (intact) step aside. Root ignores permission
    bits, so as root the read runs without the capability that lets it."""
    workdir = tmp_path / "run"
    shutil.copytree(trained["workdir"], workdir)
    step_dir = workdir / "checkpoints" / "4"
    named, detail = unreadable(step_dir)
    drop = "-dac_override,-dac_read_search"
    as_user = []
    if os.geteuid() == 0:
        as_user = ["setpriv", "--bounding-set", drop, "--inh-caps", drop, "--"]
    code = (
        "import sys\nfrom focalnet_jax.run import workdir\n"
        "try:\n    workdir.load_for_inference(sys.argv[1])\n"
        "except Exception as error:\n    print(type(error).__name__, error.filename, error)\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    result = subprocess.run(
        [*as_user, sys.executable, "-c", code, str(workdir)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith(f"PermissionError {named}"), result.stdout + result.stderr
    assert "[Errno 13] PERMISSION_DENIED: " in line and detail in line
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]
