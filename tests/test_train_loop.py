"""The training loop (focalnet_jax/training/loop.py) on a small in-memory store: resume equals an
uninterrupted run, checkpoints and config, TensorBoard contents, non-finite losses, resumes refused,
and data parallelism over 4 devices in one process and over 2 processes x 2 devices
(subprocesses) equal to one device."""

from __future__ import annotations

import re
import shutil

import jax
import numpy as np
import pytest
from test_train_helpers import (
    MULTI_DEVICE_ATOL,
    MULTI_DEVICE_RTOL,
    FakeStore,
    batch_stats_file,
    finish,
    free_port,
    process_flags,
    start_worker,
    tiny_config,
)
from train_loop_calls import RUN, tb_scalars

from focalnet_jax.data.run_store import read_run_store
from focalnet_jax.data.store_settings import StaleStoreError
from focalnet_jax.errors import UserError, UserErrorExit, one_line_user_errors
from focalnet_jax.run import workdir as workdir_lib
from focalnet_jax.training import train_and_evaluate


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """`full`: 20 steps at once; `resumed`: 10 steps, then restarted to 20 in the same workdir."""
    root = tmp_path_factory.mktemp("train_loop")
    store = FakeStore()
    out = {"store": store, "root": root}
    full = tiny_config(overrides=[*RUN, "--config.train.steps=20"])
    out["full"] = jax.device_get(train_and_evaluate(full, root / "full", store=store))
    half = tiny_config(overrides=[*RUN, "--config.train.steps=10"])
    out["half"] = jax.device_get(train_and_evaluate(half, root / "resumed", store=store))
    shutil.copytree(root / "resumed", root / "nan")
    out["resumed"] = jax.device_get(train_and_evaluate(full, root / "resumed", store=store))
    return out


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_restart_reaches_the_parameters_of_an_uninterrupted_run(runs):
    assert int(runs["half"].step) == 10 and int(runs["resumed"].step) == 20
    for a, b in zip(_leaves(runs["full"]), _leaves(runs["resumed"]), strict=True):
        np.testing.assert_array_equal(a, b)
    # ... and it did train on: step 20 differs from step 10.
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(_leaves(runs["half"].params), _leaves(runs["full"].params), strict=True)
    )


def test_checkpoints_config_and_inference_loading(runs):
    workdir = runs["root"] / "full"
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [5, 10, 15, 20]
    spec, variables = workdir_lib.load_for_inference(workdir)
    config = spec.config
    assert config.train.steps == 20 and config.model.depth == 18
    for a, b in zip(_leaves(variables["params"]), _leaves(runs["full"].params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_tensorboard_scalars_and_panels(runs):
    events, scalars = tb_scalars(runs["root"] / "full")
    assert [e.step for e in scalars["train/loss"]] == list(range(1, 21))  # log_every = 1
    for tag in (
        "train/ordinal_focal",
        "train/mfl",
        "train/mfl_weight",
        "train/lr",
        "train/grad_norm",
        "train/param_norm",
        "train/images_per_s",
        "train/mfl_subset_share/t2w",
        "train/mfl_subset_share/adc",
        "val/loss",
        "val/dice_lesion",
        "val/mean_score_lesion",
    ):
        assert tag in scalars, tag
    shares = [
        a.value + b.value
        for a, b in zip(
            scalars["train/mfl_subset_share/t2w"],
            scalars["train/mfl_subset_share/adc"],
            strict=True,
        )
    ]
    np.testing.assert_allclose(shares, 1.0, rtol=1e-6)
    lam = scalars["train/mfl_weight"][0].value
    for total, fl, mfl in zip(
        scalars["train/loss"], scalars["train/ordinal_focal"], scalars["train/mfl"], strict=True
    ):
        assert total.value == pytest.approx(fl.value + lam * mfl.value, rel=1e-5)
    # lambda = 1 / positive bit ratio of the training split (ordinal bits), > 1 by far.
    assert lam > 10
    assert [e.step for e in scalars["val/loss"]] == [10, 20]
    # The loop's time outside its steps, logged apart: each validation and checkpoint save.
    assert [e.step for e in scalars["time/validation_s"]] == [10, 20]
    assert [e.step for e in scalars["time/checkpoint_s"]] == [5, 10, 15, 20]
    assert all(e.value > 0 for e in scalars["time/validation_s"] + scalars["time/checkpoint_s"])
    panels = events.Images("val/panel")
    assert [p.step for p in panels] == [10, 20] and panels[0].width == 32 * 4


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(runs, capsys):
    store = FakeStore()
    store.images = np.full_like(store.images, np.nan)
    config = tiny_config(overrides=[*RUN, "--config.train.steps=20"])
    workdir = runs["root"] / "nan"
    with pytest.raises(UserErrorExit), one_line_user_errors("focalnet train"):
        train_and_evaluate(config, workdir, store=store)
    expected = (
        "focalnet train: error: non-finite loss or gradient at step 11 (checked at step 11); "
        f"last good checkpoint: step 10 in {workdir}\n"
    )
    assert capsys.readouterr().err.endswith("\n" + expected)  # one line, after the bar
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [5, 10]


def test_resume_keeps_the_saved_config_but_for_the_resumable_keys(runs):
    workdir, store = runs["root"] / "full", runs["store"]
    saved = (workdir / "config.json").read_text()
    lr = tiny_config().optim.lr
    changes = [  # (override, what the message says, the change it names)
        ("--config.model.width=0.25", "its checkpoint holds another model",
         "model.width 0.125 -> 0.25"),
        ("--config.optim.lr=0.5", "it was trained with another config", f"optim.lr {lr!r} -> 0.5"),
    ]  # fmt: skip
    for override, what, change in changes:
        config = tiny_config(overrides=[*RUN, "--config.train.steps=30", override])
        message = f"workdir {workdir}: {what}; config keys differ from its config.json: {change} ("
        with pytest.raises(UserError, match="^" + re.escape(message)):
            train_and_evaluate(config, workdir, store=store)
    assert (workdir / "config.json").read_text() == saved
    # An allowed change (10 steps, resumed to 20) is recorded.
    assert workdir_lib.read_config(runs["root"] / "resumed").train.steps == 20


def test_resume_with_fewer_steps_than_the_checkpoint_is_refused(runs):
    """A rerun whose config ends before the saved step would call the run finished at a step it
    no longer has: refused, `config.json` and `store.json` as they were."""
    workdir, store = runs["root"] / "full", runs["store"]
    saved = [(workdir / name).read_text() for name in ("config.json", "store.json")]
    config = tiny_config(overrides=[*RUN, "--config.train.steps=10"])
    message = (
        f"workdir {workdir}: its checkpoint is at step 20, past the 10 steps of this config "
        "(train.steps=10); a resumed run may extend its training, not shorten it"
    )
    with pytest.raises(UserError, match="^" + re.escape(message)):
        train_and_evaluate(config, workdir, store=store)
    assert [(workdir / name).read_text() for name in ("config.json", "store.json")] == saved
    assert workdir_lib.read_config(workdir).train.steps == 20


def test_a_workdir_without_a_checkpoint_trains_a_new_run_on_another_fold(runs, tmp_path):
    """A run killed before its first save, or whose checkpoints were moved away, left its
    config.json and store.json: started on another fold it was refused ("resume on the store it
    trained on") with nothing to resume, while any config change was accepted. It is a new run;
    with a checkpoint step it is a resume, refused as before."""
    workdir, store = tmp_path / "early", runs["store"]
    shutil.copytree(runs["root"] / "full", workdir, ignore=shutil.ignore_patterns("checkpoints"))
    fold_0 = read_run_store(workdir)["train_cases"]
    config = tiny_config(overrides=[*RUN, "--config.train.steps=20", "--config.data.fold=1"])
    train_and_evaluate(config, workdir, store=store)
    assert read_run_store(workdir)["train_cases"] != fold_0
    assert workdir_lib.read_config(workdir).data.fold == 1
    resumed, rebuilt = tmp_path / "resumed", FakeStore(seed=1)  # the store made again, otherwise
    shutil.copytree(runs["root"] / "full", resumed)
    config = tiny_config(overrides=[*RUN, "--config.train.steps=20"])
    with pytest.raises(StaleStoreError, match="made with other settings than store"):
        train_and_evaluate(config, resumed, store=rebuilt)


@pytest.mark.slow
def test_multi_device_and_multi_process_match_one_device(runs, tmp_path):
    port = free_port()
    run = [*RUN, "--config.train.steps=5"]
    processes = [
        start_worker(tmp_path / "four.npz", tmp_path / "four", 4, run),
        start_worker(
            tmp_path / "two_by_two.npz", tmp_path / "two_by_two", 2, [*process_flags(port, 0), *run]
        ),
        start_worker(
            tmp_path / "unused.npz", tmp_path / "two_by_two", 2, [*process_flags(port, 1), *run]
        ),
    ]
    finish(processes)
    _, reference = workdir_lib.load_for_inference(runs["root"] / "full", step=5)
    for name in ("four", "two_by_two"):
        out = tmp_path / f"{name}.npz"
        # Parameters, and BatchNorm's running averages (statistics of the global batch: sync-BN).
        for collection, path in (("params", out), ("batch_stats", batch_stats_file(out))):
            saved = np.load(path)
            flat = jax.tree_util.tree_flatten_with_path(reference[collection])[0]
            assert len(saved.files) == len(flat) > 0
            for key, value in flat:
                np.testing.assert_allclose(
                    saved[jax.tree_util.keystr(key)],
                    value,
                    rtol=MULTI_DEVICE_RTOL,
                    atol=MULTI_DEVICE_ATOL,
                    err_msg=f"{name}: {collection}{jax.tree_util.keystr(key)}",
                )
    # Only process 0 writes TensorBoard events: one event file for the two processes.
    assert len(list((tmp_path / "two_by_two" / "tb").glob("events.out.tfevents.*"))) == 1
    # The checkpoint of 2 processes x 2 devices resumes on this process's one device and
    # reaches step 10 of the uninterrupted one-device run.
    ten = tiny_config(overrides=[*RUN, "--config.train.steps=10"])
    resumed = train_and_evaluate(ten, tmp_path / "two_by_two", store=runs["store"])
    _, reference = workdir_lib.load_for_inference(runs["root"] / "full", step=10)
    for got, want in zip(_leaves(resumed.params), _leaves(reference["params"]), strict=True):
        np.testing.assert_allclose(got, want, rtol=MULTI_DEVICE_RTOL, atol=MULTI_DEVICE_ATOL)
