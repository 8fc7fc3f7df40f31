"""A restarted run on a damaged checkpoint (focalnet_jax/workdir.py, training/checkpoint.py), in one
process or two, falls back to the newest intact step, moves the damaged one aside once and says so
in one line; with none intact, no config.json or a checkpoint of another model it refuses."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import damaged_checkpoints
import jax
import numpy as np
import pytest
from cli_calls import cli_error
from damaged_checkpoints import (
    DATA_DIR,
    RUN,
    _overwrite_data,
    _truncate_data,
    copy_with,
    largest_data_file,
    truncate,
)
from test_train_helpers import (
    MULTI_DEVICE_ATOL,
    MULTI_DEVICE_RTOL,
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

trained = damaged_checkpoints.trained  # a module-scoped fixture


def _empty_metadata(step_dir: Path) -> str:
    truncate(step_dir / "default/_METADATA", 0)
    return "default/_METADATA: empty file (0 bytes)"


def _remove_data(step_dir: Path) -> str:
    path = largest_data_file(step_dir)
    path.unlink()
    return f"{path.relative_to(step_dir)}: missing"


@pytest.mark.parametrize("damage", [_truncate_data, _empty_metadata, _remove_data, _overwrite_data])
def test_restart_resumes_from_the_newest_intact_step(trained, damage, caplog):
    workdir, expected = copy_with(trained, damage.__name__, damage)
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
    workdir, expected = copy_with(trained, "two_processes", _truncate_data)
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
    workdir, _ = copy_with(trained, "all_bad", _empty_metadata)
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


def test_the_step_a_run_resumes_from_passes_its_digests(trained, tmp_path):
    """`resumable_step` (the step the start checks hold the run to) skips a newest step whose
    content no longer matches its digests, as the resume does."""
    workdir, _ = copy_with(trained, "resumable", _overwrite_data)
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
    workdir, _ = copy_with(trained, "hashed_once", _overwrite_data)  # step 4 damaged
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
