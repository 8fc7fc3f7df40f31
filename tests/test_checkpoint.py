"""Run-directory checkpoints (focalnet_jax/training/checkpoint.py, focalnet_jax/workdir.py): Orbax
save/restore into an abstract, sharded target, keeping the latest K, the saved config, and
`load_for_inference` errors."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from test_pretrained import random_variables
from test_train_helpers import tiny_config

from focalnet_jax.errors import UserError
from focalnet_jax.run import RunSpec
from focalnet_jax.run import workdir as workdir_lib
from focalnet_jax.training import checkpoint, sharding, train_state


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A workdir with config.json and checkpoints at steps 1..4 (latest 3 kept)."""
    workdir = tmp_path_factory.mktemp("ckpt")
    config = tiny_config()
    mesh = sharding.make_mesh()
    spec = RunSpec.from_config(config, image_size=(32, 32))
    state = train_state.create_train_state(spec, jax.random.key(0), mesh)
    workdir_lib.save_config(config, workdir)
    manager = workdir_lib.make_manager(workdir, keep=3)
    states = {}
    for step in range(1, 5):
        state = state.replace(
            step=state.step + 1, params=jax.tree.map(lambda p: p + 1.0, state.params)
        )
        checkpoint.save(manager, step, state, newer_than=0)
        states[step] = jax.device_get(state)
    manager.wait_until_finished()
    manager.close()
    abstract = train_state.abstract_train_state(spec, mesh)
    return workdir, states, abstract


def test_latest_k_are_kept_and_restore_lands_placed(saved):
    workdir, states, abstract = saved
    manager = workdir_lib.make_manager(workdir, keep=3)
    assert manager.all_steps() == [2, 3, 4]
    restored = checkpoint.restore(manager, abstract)
    manager.close()
    assert int(restored.step) == 4
    leaf = jax.tree.leaves(restored.params)[0]
    assert leaf.sharding.is_fully_replicated
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(states[4]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_restore_without_checkpoint_is_none(tmp_path, saved):
    _, _, abstract = saved
    manager = workdir_lib.make_manager(tmp_path / "empty")
    assert checkpoint.restore(manager, abstract) is None
    manager.close()


def test_read_only_manager_logs_no_warning_and_creates_nothing(tmp_path, caplog):
    """Orbax warns for each saving option a read-only manager turns off: an error of `evaluate`
    or `predict` would come after those lines."""
    with caplog.at_level(logging.WARNING):
        manager = workdir_lib.make_manager(tmp_path / "run", read_only=True)
    assert manager.latest_step() is None
    assert caplog.records == [] and not (tmp_path / "run").exists()
    manager.close()


def test_read_only_manager_waits_for_no_other_process(saved, monkeypatch):
    """A process opens a read-only manager where another may not (`resumable_step` of a fresh run
    finds the folder the other process has just created): a barrier there met the other's
    `create_directory` barrier, and a two-process start failed with 'sync_global_devices name
    mismatch'. The barriers Orbax asks for are recorded (a single process skips them)."""
    from orbax.checkpoint._src.multihost import multihost

    barriers = []
    real = multihost.sync_global_processes
    monkeypatch.setattr(
        multihost,
        "sync_global_processes",
        lambda name, **kw: (barriers.append(name), real(name, **kw)),
    )
    workdir, _, _ = saved
    manager = workdir_lib.make_manager(workdir, read_only=True)
    assert manager.all_steps() == [2, 3, 4] and workdir_lib.resumable_step(workdir) == 4
    manager.close()
    assert barriers == []
    workdir_lib.make_manager(workdir, keep=3).close()  # the writing one: every process opens it
    assert [b.rsplit(":", 1)[-1] for b in barriers] == ["create_directory", "save_root_metadata"]


def test_load_for_inference_latest_and_given_step(saved):
    workdir, states, _ = saved
    spec, variables = workdir_lib.load_for_inference(workdir)
    config = spec.config
    assert config.model.width == 0.125 and list(config.data.components) == ["t2w", "adc"]
    for a, b in zip(
        jax.tree.leaves(variables["params"]), jax.tree.leaves(states[4].params), strict=True
    ):
        assert isinstance(a, np.ndarray)
        np.testing.assert_array_equal(a, b)
    _, step3 = workdir_lib.load_for_inference(workdir, step=3)
    first = jax.tree.leaves(step3["params"])[0]
    np.testing.assert_array_equal(first, jax.tree.leaves(states[3].params)[0])


def test_load_for_inference_errors_name_the_workdir(saved, tmp_path):
    workdir, _, _ = saved
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        workdir_lib.load_for_inference(tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint at step 1"):
        workdir_lib.load_for_inference(workdir, step=1)
    other = tmp_path / "other"
    other.mkdir()
    config = json.loads((workdir / workdir_lib.CONFIG_FILE).read_text())
    (other / workdir_lib.CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(
        FileNotFoundError, match=r"no checkpoint under checkpoints/ yet .* re-run it"
    ):
        workdir_lib.load_for_inference(other)
    # A checkpoint from a wider model than the config describes.
    config["model"]["width"] = 0.25
    shutil.copytree(workdir / workdir_lib.CHECKPOINT_DIR, other / workdir_lib.CHECKPOINT_DIR)
    (other / workdir_lib.CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(UserError) as raised:
        workdir_lib.load_for_inference(other)
    assert str(raised.value).startswith(f"workdir {other}: checkpoint 4 does not match the model")
    assert "e.g. batch_stats/backbone/bn1/mean (8,) saved, (16,) wanted;" in str(raised.value)


def test_damaged_config_json_is_a_one_line_error_naming_the_file(tmp_path, capsys):
    """A config.json cut short (a run killed while writing it, a full disk): resuming and
    evaluating name the file instead of raising a JSON traceback."""
    from focalnet_jax import cli

    config = tiny_config()
    path = workdir_lib.save_config(config, tmp_path)
    assert workdir_lib.read_config(tmp_path).to_dict() == json.loads(config.to_json())
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # no temporary file left
    path.write_text(path.read_text()[:40])
    (tmp_path / workdir_lib.CHECKPOINT_DIR / "5").mkdir(parents=True)
    for call in (
        lambda: workdir_lib.read_config(tmp_path),
        lambda: workdir_lib.check_resumed_config(config, tmp_path),
    ):
        with pytest.raises(UserError, match=f"{path} is damaged \\(not JSON: "):
            call()
    with pytest.raises(SystemExit) as exited:
        cli.main(["evaluate", "--workdir", str(tmp_path)])
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"focalnet evaluate: error: {path} is damaged")


def test_a_run_starts_from_its_pretrained_backbone_with_each_components_filters(tmp_path):
    """`model.pretrained` naming a backbone saved from a model whose components came in the other
    order: the run starts from those weights, each component's first-layer filters on its own
    input channel (not averaged as RGB, not swapped)."""
    from focalnet_jax.models.pretrained import save_torchvision_resnet

    spec = RunSpec.from_config(tiny_config(), image_size=(32, 32))
    assert spec.components == ("t2w", "adc")
    rng = np.random.default_rng(3)
    saved = random_variables(
        train_state.init_variables(spec.model, jax.random.key(1), spec.input_shape), rng
    )
    path = tmp_path / "backbone.safetensors"
    save_torchvision_resnet(saved, path, components=("adc", "t2w"))
    config = tiny_config(overrides=[f"--config.model.pretrained={path}"])
    spec = RunSpec.from_config(config, image_size=(32, 32))
    manager = workdir_lib.make_manager(tmp_path / "run")
    state = checkpoint.resume_or_initialize(spec, manager, sharding.make_mesh(), jax.random.key(0))
    manager.close()
    backbone = jax.device_get(state.params["backbone"])
    kernel = saved["params"]["backbone"]["conv1"]["kernel"]  # [7, 7, (adc, t2w), O]
    np.testing.assert_array_equal(backbone["conv1"]["kernel"], kernel[:, :, ::-1, :])
    np.testing.assert_array_equal(
        backbone["layer2_0"]["conv1"]["kernel"],
        saved["params"]["backbone"]["layer2_0"]["conv1"]["kernel"],
    )
    np.testing.assert_array_equal(
        jax.device_get(state.batch_stats["backbone"]["bn1"]["var"]),
        saved["batch_stats"]["backbone"]["bn1"]["var"],
    )


def _run_saved_without(workdir, section: str, key: str):
    """A tiny config, and a run in `workdir` with a checkpoint whose config.json was saved before
    `section.key` existed (the key removed); returns the config."""
    config = tiny_config()
    path = workdir_lib.save_config(config, workdir)
    saved = json.loads(path.read_text())
    del saved[section][key]
    path.write_text(json.dumps(saved))
    (workdir / workdir_lib.CHECKPOINT_DIR / "5").mkdir(parents=True)
    return config


def test_a_resume_in_another_dtype_is_another_config_not_another_model(tmp_path):
    """A bfloat16 run's checkpoint holds float32 parameters, as a float32 run's: its resume in
    float32 was refused as "its checkpoint holds another model", which it does not."""
    config = tiny_config(overrides=["--config.model.dtype=bfloat16"])
    workdir_lib.save_config(config, tmp_path)
    (tmp_path / workdir_lib.CHECKPOINT_DIR / "5").mkdir(parents=True)
    config.model.dtype = "float32"
    with pytest.raises(UserError) as refused:
        workdir_lib.check_resumed_config(config, tmp_path)
    assert str(refused.value).startswith(
        f"workdir {tmp_path}: it was trained with another config; config keys differ from its "
        "config.json: model.dtype 'bfloat16' -> 'float32' ("
    )
    config.model.depth = 50  # and another model besides
    with pytest.raises(UserError, match="its checkpoint holds another model"):
        workdir_lib.check_resumed_config(config, tmp_path)


def test_a_run_saved_before_loss_pool_size_existed_resumes(tmp_path):
    """A config.json written before `loss.pool_size` was a key trained with the loss's 3 x 3
    filter: it resumes under a config that says 3, and is refused under one that says 1."""
    config = _run_saved_without(tmp_path, "loss", "pool_size")
    workdir_lib.check_resumed_config(config, tmp_path)
    config.loss.pool_size = 1
    with pytest.raises(UserError, match=r"loss\.pool_size 3 -> 1"):
        workdir_lib.check_resumed_config(config, tmp_path)


def test_a_run_saved_before_optim_weight_decay_on_existed_resumes(tmp_path):
    """Runs saved before `optim.weight_decay_on` decayed every parameter: read as "all", they
    resume under the default and are refused under "kernels" (another optimiser state tree)."""
    config = _run_saved_without(tmp_path, "optim", "weight_decay_on")
    assert workdir_lib.read_config(tmp_path).optim.weight_decay_on == "all"
    workdir_lib.check_resumed_config(config, tmp_path)
    config.optim.weight_decay_on = "kernels"
    with pytest.raises(UserError, match=r"optim\.weight_decay_on 'all' -> 'kernels'"):
        workdir_lib.check_resumed_config(config, tmp_path)


def test_a_run_saved_before_the_loss_options_and_mfl_chunk_existed_resumes_and_predicts(tmp_path):
    """A config.json written before `loss.mfl_chunk`, `loss.mfl_any_loss` and the Dice/CE options
    were keys: `predict` and `evaluate` ended in an AttributeError traceback ('mfl_chunk'), and a
    resume was refused for good ("'(absent)' -> 4", a value no override can give). Each is read as
    the value the code used then: all subsets at once, the losses' own defaults. Such a run
    resumes with the default chunk of 4 (how many subsets run at once may change on a resume)."""
    config = _run_saved_without(tmp_path, "loss", "mfl_chunk")
    path = tmp_path / workdir_lib.CONFIG_FILE
    saved = json.loads(path.read_text())
    for key in ("mfl_any_loss", "weights", "eps", "batch_dice", "dice_background"):
        del saved["loss"][key]
    path.write_text(json.dumps(saved))
    read = workdir_lib.read_config(tmp_path)
    assert (read.loss.mfl_chunk, read.loss.mfl_any_loss) == (0, False)
    assert (list(read.loss.weights), read.loss.eps) == ([1.0, 1.0], 1.0)
    assert (read.loss.batch_dice, read.loss.dice_background) == (False, True)
    assert RunSpec.from_config(read, num_devices=1).mfl_chunk == 0  # as `predict` resolves it
    assert config.loss.mfl_chunk == 4
    workdir_lib.check_resumed_config(config, tmp_path)
    config.loss.mfl_any_loss = True  # a guard, changing no computation: a resume may set it
    workdir_lib.check_resumed_config(config, tmp_path)


def test_a_deeplab_saved_before_model_upsample_existed_predicts_and_resumes_half_pixel(tmp_path):
    """Runs saved before `model.upsample` resized their logits with half-pixel centres: read so,
    they predict as they trained; a resume under the new default ('aligned') would train on with
    another model, so it is refused naming the key. A U-Net has no such upsampling."""
    config = _run_saved_without(tmp_path, "model", "upsample")
    assert config.model.name == "deeplab" and config.model.upsample == "aligned"
    assert workdir_lib.read_config(tmp_path).model.upsample == "half_pixel"
    with pytest.raises(UserError) as refused:
        workdir_lib.check_resumed_config(config, tmp_path)
    message = str(refused.value)  # another config, not another model: the same arrays
    assert message.startswith(f"workdir {tmp_path}: it was trained with another config; ")
    assert "model.upsample 'half_pixel' -> 'aligned'" in message
    assert message.endswith(
        "; give --config.model.upsample=half_pixel, the upsampling it trained with)"
    )
    config.model.upsample = "half_pixel"
    workdir_lib.check_resumed_config(config, tmp_path)
    unet = tmp_path / "unet"
    config = _run_saved_without(unet, "model", "upsample")
    path = unet / workdir_lib.CONFIG_FILE
    path.write_text(path.read_text().replace('"deeplab"', '"unet"'))
    assert workdir_lib.read_config(unet).model.upsample == "aligned"


def test_a_resume_compares_lambda_as_a_number(tmp_path):
    """`--config.loss.mfl_weight=130` is saved as the text '130' (the key's default is 'auto'):
    the same lambda written 130.0 or 1.3e2 resumes; another one, or 'auto', is refused."""
    config = tiny_config(overrides=["--config.loss.mfl_weight=130"])
    assert config.loss.mfl_weight == "130"
    workdir_lib.save_config(config, tmp_path)
    (tmp_path / workdir_lib.CHECKPOINT_DIR / "8").mkdir(parents=True)
    for same in ("130.0", "1.3e2", " 130"):
        config.loss.mfl_weight = same
        workdir_lib.check_resumed_config(config, tmp_path)
    config.loss.mfl_weight = "auto"
    with pytest.raises(UserError, match=r"loss\.mfl_weight 130\.0 -> 'auto'"):
        workdir_lib.check_resumed_config(config, tmp_path)
    config.loss.mfl_weight = "131"
    with pytest.raises(UserError, match=r"loss\.mfl_weight 130\.0 -> 131\.0"):
        workdir_lib.check_resumed_config(config, tmp_path)


def test_a_run_saved_before_data_splits_existed_resumes_on_seeded_folds(tmp_path):
    """Such a run trained on the seeded folds (`data.splits` ''): other folds are refused (named
    absolute, as `config.json` would record them)."""
    config = _run_saved_without(tmp_path, "data", "splits")
    workdir_lib.check_resumed_config(config, tmp_path)
    config.data.splits = "splits/picai"
    given = re.escape(str(Path.cwd() / "splits" / "picai"))
    with pytest.raises(UserError, match=rf"data\.splits '' -> '{given}'"):
        workdir_lib.check_resumed_config(config, tmp_path)


def test_fresh_state_maker_compiles_once_and_makes_new_states():
    """A benchmark's step kinds each take a fresh state from one compiled init: the second call
    compiles nothing, gives the values `create_train_state` gives, in buffers of its own (a
    compiled step donates the state it is given)."""
    mesh = sharding.make_mesh()
    spec = RunSpec.from_config(tiny_config(), image_size=(32, 32))
    new_state = train_state.fresh_state_maker(spec, mesh)
    first, second = new_state(jax.random.key(0)), new_state(jax.random.key(0))
    assert new_state._cache_size() == 1
    reference = train_state.create_train_state(spec, jax.random.key(0), mesh)
    for a, b, r in zip(*(jax.tree.leaves(s) for s in (first, second, reference)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(r))
        np.testing.assert_array_equal(np.asarray(b), np.asarray(r))
        assert a.unsafe_buffer_pointer() != b.unsafe_buffer_pointer()
