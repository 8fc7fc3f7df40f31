"""Damaged checkpoints (focalnet_jax/workdir.py, training/checkpoint.py): a restarted run (one
process or two) falls back to the newest intact step, moves the damaged one aside once and says
so in one line; with none intact it refuses; predict and evaluate name the damaged step folder,
file and reason in a one-line error."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from cli_calls import cli_error
from test_train_helpers import (
    MULTI_DEVICE_ATOL,
    MULTI_DEVICE_RTOL,
    REPO,
    FakeStore,
    finish,
    free_port,
    process_flags,
    start_worker,
    tiny_config,
)

from focalnet_jax.errors import UserError
from focalnet_jax.run import checkpoint_damage
from focalnet_jax.run import checkpoint_digests as digests
from focalnet_jax.run import workdir as workdir_lib
from focalnet_jax.training import checkpoint, train_and_evaluate

RUN = [
    "--config.train.checkpoint_every=2",
    "--config.train.keep_checkpoints=10",
    "--config.train.steps=4",
    "--config.loss.mfl=false",  # what a checkpoint holds does not depend on the loss
]
DATA_DIR = "default/ocdbt.process_0/d"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`workdir`: 4 steps with checkpoints at 2 and 4; `final`: its state at step 4."""
    root = tmp_path_factory.mktemp("recovery")
    store = FakeStore()
    config = tiny_config(overrides=RUN)
    final = jax.device_get(train_and_evaluate(config, root / "run", store=store))
    return {"root": root, "workdir": root / "run", "store": store, "config": config, "final": final}


def _largest_data_file(step_dir: Path) -> Path:
    return max((step_dir / DATA_DIR).iterdir(), key=lambda p: p.stat().st_size)


def _truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


def _truncate_data(step_dir: Path) -> str:
    path = _largest_data_file(step_dir)
    _truncate(path, path.stat().st_size // 2)
    return f"{path.relative_to(step_dir)}: truncated ({path.stat().st_size} bytes"


def _empty_metadata(step_dir: Path) -> str:
    _truncate(step_dir / "default/_METADATA", 0)
    return "default/_METADATA: empty file (0 bytes)"


def _remove_data(step_dir: Path) -> str:
    path = _largest_data_file(step_dir)
    path.unlink()
    return f"{path.relative_to(step_dir)}: missing"


def _overwrite_data(step_dir: Path) -> str:
    """4 KiB of zeros in the middle of the largest data file: the size stays, the content not."""
    path = _largest_data_file(step_dir)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = bytes(min(4096, len(data) - middle))
    path.write_bytes(bytes(data))
    return f"{path.relative_to(step_dir)}: content changed since it was saved (sha256 differs)"


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


def _copy_with(trained, name: str, damage) -> tuple[Path, str]:
    """A copy of the trained workdir whose step 4 got `damage`; the expected file and reason."""
    workdir = trained["root"] / name
    shutil.copytree(trained["workdir"], workdir)
    return workdir, damage(workdir / "checkpoints" / "4")


@pytest.mark.parametrize("damage", [_truncate_data, _empty_metadata, _remove_data, _overwrite_data])
def test_restart_resumes_from_the_newest_intact_step(trained, damage, caplog):
    workdir, expected = _copy_with(trained, damage.__name__, damage)
    with caplog.at_level(logging.WARNING, logger="focalnet_jax.training.checkpoint"):
        state = train_and_evaluate(trained["config"], workdir, store=trained["store"])
    lines = [r.getMessage() for r in caplog.records if r.name == "focalnet_jax.training.checkpoint"]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    bad = workdir / "checkpoints" / "4"
    aside = workdir / "checkpoints" / "corrupt-4"
    assert lines[0].startswith(f"resuming from step 2: checkpoint {bad.resolve()} is unreadable: ")
    assert expected in lines[0] and f"moved to {aside.resolve()}" in lines[0]
    # The damaged step is kept aside, the rerun wrote a new step 4 equal to an uninterrupted run.
    assert (aside / "default" / "_METADATA").exists()
    manager = workdir_lib.make_manager(workdir, read_only=True)
    assert manager.all_steps() == [2, 4]
    manager.close()
    assert int(state.step) == 4
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(trained["final"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)


@pytest.mark.slow
def test_two_processes_move_the_damaged_step_aside_once_and_resume(trained, tmp_path):
    """Process 0 renames the damaged step between two barriers; process 1 neither races it nor
    keeps listing the old step; both go on from step 2 to an uninterrupted run's step 4."""
    workdir, expected = _copy_with(trained, "two_processes", _truncate_data)
    port = free_port()
    outs = [tmp_path / "params.npz", tmp_path / "unused.npz"]
    processes = [
        start_worker(outs[i], workdir, 1, [*process_flags(port, i), *RUN]) for i in range(2)
    ]
    outputs = finish(processes)
    checkpoints = workdir / "checkpoints"
    bad, aside = checkpoints / "4", checkpoints / "corrupt-4"
    lines = [line for output in outputs for line in output.splitlines() if "resuming" in line]
    assert len(lines) == 1 and "resuming from step 2: " in outputs[0], outputs
    assert f"resuming from step 2: checkpoint {bad.resolve()} is unreadable: {expected}" in lines[0]
    assert f"moved to {aside.resolve()}" in lines[0]
    # Moved once, nothing deleted; the new step 4 holds the final parameters.
    assert sorted(p.name for p in checkpoints.iterdir()) == ["2", "4", "corrupt-4"]
    assert (aside / "default" / "_METADATA").exists()
    assert checkpoint_damage.find_damage(aside).startswith(expected)
    manager = workdir_lib.make_manager(workdir, read_only=True)
    assert manager.all_steps() == [2, 4]
    manager.close()
    _, variables = workdir_lib.load_for_inference(workdir, step=4)
    saved = np.load(outs[0])
    final = jax.tree_util.tree_flatten_with_path(trained["final"].params)[0]
    assert len(saved.files) == len(final)
    for path, reference in final:
        name = jax.tree_util.keystr(path)
        # Steps 1-2 are the one-process run's (restored); steps 3-4 reduce over two devices.
        np.testing.assert_allclose(
            saved[name], reference, rtol=MULTI_DEVICE_RTOL, atol=MULTI_DEVICE_ATOL, err_msg=name
        )
    for path, value in jax.tree_util.tree_flatten_with_path(variables["params"])[0]:
        np.testing.assert_array_equal(value, saved[jax.tree_util.keystr(path)])


def _with_config_of(trained, workdir: Path, overrides: list[str]) -> None:
    """A copy of the trained run in `workdir` whose config.json was replaced by the config of
    `overrides` (so the config check passes, and the checkpoint's own arrays are compared)."""
    shutil.copytree(trained["workdir"], workdir)
    workdir_lib.save_config(workdir_lib.absolute_paths(tiny_config(overrides=overrides)), workdir)


def test_two_processes_both_refuse_a_checkpoint_of_another_model(trained, tmp_path):
    """A config.json replaced by a wider model's, whose run in two processes: each stops with the
    same error (exit 1 from the worker's uncaught UserError) instead of one waiting for the
    other."""
    workdir = tmp_path / "replaced_config"
    flags = [*RUN, "--config.model.width=0.25"]
    _with_config_of(trained, workdir, flags)
    port = free_port()
    processes = [
        start_worker(tmp_path / f"unused{i}.npz", workdir, 1, [*process_flags(port, i), *flags])
        for i in range(2)
    ]
    outputs = finish(processes, timeout=240, returncode=1)  # below JAX's 300 s barrier wait
    step_dir = (workdir / "checkpoints" / "4").resolve()
    for output in outputs:
        assert f"UserError: checkpoint {step_dir} does not fit the state asked for: " in output
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]


def test_a_resume_without_config_json_is_refused(trained, tmp_path):
    """A lost config.json: a resume under another seed and learning rate (arrays of the same
    shapes) went on from the checkpoint and wrote its config.json as the whole run's; evaluate
    called the run no training run."""
    workdir = tmp_path / "lost_config"
    shutil.copytree(trained["workdir"], workdir)
    (workdir / workdir_lib.CONFIG_FILE).unlink()
    other = tiny_config(overrides=[*RUN, "--config.seed=7", "--config.optim.lr=0.5"])
    lost = f"workdir {workdir}: checkpoints but no config.json (lost?): restore it"
    with pytest.raises(UserError) as raised:
        train_and_evaluate(other, workdir, store=trained["store"])
    assert str(raised.value) == f"{lost}, or train in another workdir"
    assert not (workdir / workdir_lib.CONFIG_FILE).exists()
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]
    with pytest.raises(FileNotFoundError, match=f"^{re.escape(lost)}$"):
        workdir_lib.load_for_inference(workdir)
    exam = ["--t2w", "t2w.mha", "--adc", "adc.mha", "--out", tmp_path / "out"]
    for command, argv in (
        ("evaluate", ["--workdir", workdir]),
        ("predict", ["--checkpoint", workdir, *exam]),
    ):
        assert cli_error([command, *argv]) == f"focalnet {command}: error: {lost}"


def test_no_intact_step_refuses_and_moves_nothing(trained):
    workdir, _ = _copy_with(trained, "all_bad", _empty_metadata)
    _truncate_data(workdir / "checkpoints" / "2")
    with pytest.raises(workdir_lib.UnreadableCheckpointError) as raised:
        train_and_evaluate(trained["config"], workdir, store=trained["store"])
    message = str(raised.value)
    assert "\n" not in message
    assert "no step is intact (step 4: default/_METADATA: empty file (0 bytes); step 2: " in message
    assert f"{DATA_DIR}/" in message and "truncated" in message
    assert "nothing was moved or deleted; to train from scratch, move" in message
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]


def test_resume_with_a_model_of_another_shape_names_the_differing_keys(trained, tmp_path):
    """An intact checkpoint of another model is no damage: nothing is moved aside, and the error
    names the config keys that differ from the run's config.json."""
    workdir = tmp_path / "wider"
    shutil.copytree(trained["workdir"], workdir)
    wider = tiny_config(overrides=[*RUN, "--config.model.width=0.25"])
    with pytest.raises(UserError) as raised:
        train_and_evaluate(wider, workdir, store=trained["store"])
    assert not isinstance(raised.value, workdir_lib.UnreadableCheckpointError)
    assert str(raised.value).startswith(
        f"workdir {workdir}: its checkpoint holds another model; config keys differ from its "
        "config.json: model.width 0.125 -> 0.25 ("
    )
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]


def test_resume_with_a_replaced_config_json_names_the_arrays_that_differ(trained, tmp_path):
    """With `config.json` replaced by the new config's, the checkpoint's own array shapes are
    checked before Orbax reads them: a one-line error names the step and the first arrays that
    differ."""
    workdir = tmp_path / "replaced_config"
    _with_config_of(trained, workdir, [*RUN, "--config.model.width=0.25"])
    wider = tiny_config(overrides=[*RUN, "--config.model.width=0.25"])
    with pytest.raises(UserError) as raised:
        train_and_evaluate(wider, workdir, store=trained["store"])
    message = str(raised.value)
    step_dir = (workdir / "checkpoints" / "4").resolve()
    assert "\n" not in message
    assert message.startswith(f"checkpoint {step_dir} does not fit the state asked for: ")
    # Width 0.125 -> 0.25 doubles every channel count; the 3 x 3 ASPP branches read 64 -> 128.
    assert "params/aspp/branch0/kernel (3, 3, 64, 5) saved, (3, 3, 128, 5) wanted" in message
    assert message.endswith("train this config in another workdir")
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]
    assert (
        workdir_lib.state_mismatch(
            workdir / "checkpoints" / "4", jax.eval_shape(lambda: trained["final"])
        )
        is None
    )


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda d: _truncate(d / "default/_METADATA", 1000), "default/_METADATA: invalid JSON ("),
        (lambda d: _truncate(d / "default/manifest.ocdbt", 0), "default/manifest.ocdbt: empty"),
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
    workdir, expected = _copy_with(trained, "for_inference", _truncate_data)
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
        name = f"{DATA_DIR}/" + _largest_data_file(step_dir).name
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


def test_a_resume_moves_a_step_of_values_that_are_not_finite_aside(trained, tmp_path, caplog):
    """NaN in the newest step (damage no digest was there to find: a step saved without them):
    a resumed run trained on from it, failed at the next step calling the step "last good", and
    failed so at every rerun. Now it is damage: moved aside, and the run resumes before it."""
    workdir = tmp_path / "run"
    shutil.copytree(trained["workdir"], workdir)
    shutil.rmtree(workdir / "checkpoints" / "4")
    state = jax.device_get(trained["final"])
    kernel = state.params["aspp"]["branch0"]["kernel"]
    state = state.replace(
        params={**state.params, "aspp": {**state.params["aspp"], "branch0": {
            **state.params["aspp"]["branch0"], "kernel": np.full_like(kernel, np.nan)}}}
    )  # fmt: skip
    manager = workdir_lib.make_manager(workdir)
    checkpoint.save(manager, 4, state, newer_than=0)
    checkpoint.finish_saves(manager, newer_than=0)
    manager.close()
    with caplog.at_level(logging.WARNING, logger="focalnet_jax.training.checkpoint"):
        resumed = train_and_evaluate(trained["config"], workdir, store=trained["store"])
    bad, aside = (workdir / "checkpoints" / name for name in ("4", "corrupt-4"))
    assert [r.getMessage() for r in caplog.records if r.name.endswith("checkpoint")] == [
        f"resuming from step 2: checkpoint {bad.resolve()} is unreadable: params/aspp/branch0/"
        f"kernel: {kernel.size} of {kernel.size} values are not finite (moved to "
        f"{aside.resolve()})"
    ]
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(trained["final"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)


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
    _largest_data_file(step_dir).chmod(0)
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


def test_the_step_a_run_resumes_from_passes_its_digests(trained, tmp_path):
    """`resumable_step` (the step the start checks hold the run to) skips a newest step whose
    content no longer matches its digests, as the resume does."""
    workdir, _ = _copy_with(trained, "resumable", _overwrite_data)
    assert checkpoint_damage.find_damage(workdir / "checkpoints" / "4") is None
    assert workdir_lib.resumable_step(workdir) == 2
    assert workdir_lib.resumable_step(trained["workdir"]) == 4


def test_a_resumed_run_writes_digests_only_for_the_steps_it_saved(trained, tmp_path):
    """Steps of an earlier session without digests (a run killed before writing them, an older
    version) keep none: digests written now would record what they hold now as their content at
    save time. The resumed session's own step gets them."""
    workdir = tmp_path / "run"
    shutil.copytree(trained["workdir"], workdir)
    for step in (2, 4):
        (workdir / "checkpoints" / str(step) / digests.DIGEST_FILE).unlink()
    longer = tiny_config(overrides=[*RUN, "--config.train.steps=6"])
    train_and_evaluate(longer, workdir, store=trained["store"])
    has_digests = {
        p.name: (p / digests.DIGEST_FILE).is_file() for p in (workdir / "checkpoints").iterdir()
    }
    assert has_digests == {"2": False, "4": False, "6": True}
    assert digests.mismatch(workdir / "checkpoints" / "6") is None


def test_a_resume_reads_the_digests_of_the_step_it_resumes_from_once(
    trained, tmp_path, monkeypatch
):
    """The start checks (`resumable_step`) and the restore each hashed every file of the step:
    twice its size read before training went on. A damaged newer step is still checked by both
    and moved aside."""
    workdir, _ = _copy_with(trained, "hashed_once", _overwrite_data)  # step 4 damaged
    hashed = []
    real = digests.mismatch

    def counted(step_dir):
        hashed.append(Path(step_dir).name)
        return real(step_dir)

    monkeypatch.setattr(digests, "mismatch", counted)
    longer = tiny_config(overrides=[*RUN, "--config.train.steps=6"])
    state = train_and_evaluate(longer, workdir, store=trained["store"])
    assert int(state.step) == 6
    assert hashed.count("2") == 1 and hashed.count("4") == 2, hashed
    assert (workdir / "checkpoints" / "corrupt-4").is_dir()
