"""End to end on the real store format: `focalnet synth` -> `focalnet preprocess` -> `focalnet
train --config configs/demo.py` (the demo-size model) for 30 steps lowers the training loss and
logs the MFL term and the chosen-subset shares."""

from __future__ import annotations

import signal

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_train_helpers import REPO, small_synthetic_store

from focalnet_jax import cli
from focalnet_jax.run import workdir as workdir_lib


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    store, workdir = small_synthetic_store(root, cases=16, seed=1), root / "run"
    train = ["train", f"--config={REPO / 'configs' / 'demo.py'}", f"--workdir={workdir}"]
    train += [f"--config.data.store={store}", "--config.train.steps=30"]
    train += ["--config.train.log_every=1", "--config.train.eval_every=0"]
    sigterm = signal.getsignal(signal.SIGTERM)
    assert cli.main(train) == 0
    # A caller's `cli.main(argv)` goes on after it: SIGTERM is left as it was (not the status-0
    # exit of a `focalnet` process whose run is complete, graceful_stop.exit_zero_on_sigterm).
    assert signal.getsignal(signal.SIGTERM) == sigterm
    wakeup = signal.set_wakeup_fd(-1)
    assert wakeup == -1, wakeup
    events = EventAccumulator(str(workdir / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    scalars = {t: [(e.step, e.value) for e in events.Scalars(t)] for t in events.Tags()["scalars"]}
    return workdir, scalars


def test_thirty_steps_lower_the_training_loss(demo_run):
    _, scalars = demo_run
    steps, losses = zip(*scalars["train/loss"], strict=True)
    assert steps == tuple(range(1, 31))
    assert all(np.isfinite(losses))
    # Step 1 is the initial model; the focal loss falls within a few steps, then varies from batch
    # to batch (0.05-0.25 at steps 2-30) by more than it falls, so no later window is compared.
    assert max(losses[-10:]) < losses[0], losses
    assert np.mean(losses[-10:]) < 0.5 * losses[0], losses


def test_mfl_term_and_subset_shares_are_logged(demo_run):
    _, scalars = demo_run
    assert len(scalars["train/mfl"]) == 30 and all(v >= 0 for _, v in scalars["train/mfl"])
    t2w = np.array([v for _, v in scalars["train/mfl_subset_share/t2w"]])
    adc = np.array([v for _, v in scalars["train/mfl_subset_share/adc"]])
    np.testing.assert_allclose(t2w + adc, 1.0, rtol=1e-6)
    assert np.all((t2w >= 0) & (t2w <= 1))
    # lambda = 1 / positive ordinal-bit ratio of the training split: large on lesion-sparse data.
    assert scalars["train/mfl_weight"][0][1] > 10
    assert "val/loss" in scalars and scalars["val/loss"][-1][0] == 30


def test_run_directory_reloads_for_inference(demo_run):
    run_dir, _ = demo_run
    spec, variables = workdir_lib.load_for_inference(run_dir)
    config = spec.config
    assert config.model.depth == 18 and config.train.steps == 30
    assert set(variables) == {"params", "batch_stats"}
    assert all(isinstance(v, np.ndarray) for v in jax.tree.leaves(variables))


@pytest.fixture
def cache_every_compilation():
    """The persistent compilation cache keeps every executable, however fast it compiled."""
    previous = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    yield
    jax.config.update("jax_persistent_cache_min_compile_time_secs", previous)


@pytest.mark.usefixtures("without_compilation_cache")
def test_cv_trains_the_requested_folds_in_their_own_directories(
    demo_run, tmp_path, cache_every_compilation
):
    run_dir, _ = demo_run
    store = workdir_lib.read_config(run_dir).data.store
    cv = ["cv", f"--config={REPO / 'configs' / 'demo.py'}", f"--workdir={tmp_path}", "--folds=1,0"]
    cv += [f"--config.data.store={store}", "--config.train.steps=2", "--config.train.eval_every=0"]
    assert cli.main([*cv, "--config.model.width=0.125"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compilation_cache", "fold0", "fold1"]
    for fold in (0, 1):
        spec, _ = workdir_lib.load_for_inference(tmp_path / f"fold{fold}")
        assert spec.config.data.fold == fold
    # Both folds (each with its own MFL weight) ran one compiled train step, kept in the cache.
    cached = [p.name for p in (tmp_path / "compilation_cache").iterdir()]
    assert len([n for n in cached if n.startswith("jit_train_step-")]) == 1, cached
    assert jax.config.jax_compilation_cache_dir is None  # restored after the command
    with pytest.raises(SystemExit, match="unknown config key 'train.stepz'"):
        cli.main(
            [
                "train",
                f"--config={REPO / 'configs' / 'demo.py'}",
                f"--workdir={tmp_path}",
                "--config.train.stepz=2",
            ]
        )


def test_demo_timings_name_the_cpu_model_as_lscpu_does():
    """`make demo`'s timings.json records the CPU model (float32 round-off, so the trained demo
    model and its metrics, differ between CPU models)."""
    import shutil
    import subprocess

    from focalnet_jax.demo import cpu_name

    if shutil.which("lscpu") is None:
        pytest.skip("lscpu not installed")
    listed = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    names = [line.split(":", 1)[1].strip() for line in listed.splitlines() if "Model name" in line]
    assert cpu_name() == names[0]
