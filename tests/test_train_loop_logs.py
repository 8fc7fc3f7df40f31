"""What the training loop (focalnet_jax/training/loop.py) logs, on a small in-memory store: the
validation panel, images/s without validation and checkpoint time, TensorBoard events across a
resume, the console bar and lines, validations at a resume, and its one-line refusals."""

from __future__ import annotations

import io
import re
import shutil
import time

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import plugin_event_accumulator
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_train_helpers import FakeStore, tiny_config
from train_loop_calls import RUN, tb_scalars

from focalnet_jax.data import folds
from focalnet_jax.errors import UserError
from focalnet_jax.run import RunSpec
from focalnet_jax.run import workdir as workdir_lib
from focalnet_jax.training import train_and_evaluate


def loop_config(overrides=()):
    """The tiny config without MFL, for what the loop does whatever the loss (MFL's step takes
    longer to compile); `runs` (tests/test_train_loop.py) and the runs resumed from it keep the
    paper's loss."""
    return tiny_config(overrides=[*overrides, "--config.loss.mfl=false"])


@pytest.mark.parametrize(
    "patients, rows",
    [(10, 4), (5, 3)],
    ids=["4_of_6_validation_slices", "all_3_validation_slices"],
)
def test_validation_panel_with_a_batch_smaller_than_the_panel(tmp_path, patients, rows):
    """Batch 2, 3 slices a patient, 5 folds: 2 validation patients (6 slices) fill the panel's 4
    rows from the first two batches; 1 patient (3 slices, the last batch padded) gives 3 rows."""
    overrides = [
        "--config.train.batch_size=2",
        "--config.train.steps=1",
        "--config.data.slices=all",
    ]
    store, config = FakeStore(patients=patients), loop_config(overrides=overrides)
    train_and_evaluate(config, tmp_path / "w", store=store)
    events, _ = tb_scalars(tmp_path / "w")
    (image,) = events.Images("val/panel")
    # Columns: the 2 components, the truth and the prediction.
    assert (image.step, image.height, image.width) == (1, 32 * rows, 32 * 4)
    val_rows = RunSpec.from_config(config).for_store(store).fold_split(store).val_rows
    truth = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)))[:, 64:96]
    expected = np.concatenate(list(store.classes[val_rows[:rows]]))
    np.testing.assert_array_equal(truth > 0, expected > 0)  # the validation slices, in order


def test_training_loop_times_validation_and_checkpoints_outside_the_steps(tmp_path, monkeypatch):
    """A real run, logging, validating and saving every 2 steps, each validation and checkpoint
    save taking 1000 s more on the loop's clock: the rate logged at step 4 (steps 3-4, after the
    step-2 validation and save) is that of 8 images in their real time, above 0.01/s unless the
    two steps took 800 s; counting the 2000 s it would be below 0.004/s. (A real sleep here made
    the bound a wall-clock one: two steps in under 1 s, which a loaded machine may miss.)"""
    import types

    from focalnet_jax.training import loop

    moved = [0.0]  # seconds added to the loop's clock
    clock = types.SimpleNamespace(perf_counter=lambda: time.perf_counter() + moved[0])
    monkeypatch.setattr(loop, "time", clock)

    def slowed(function):
        def wrapped(*args, **kwargs):
            result = function(*args, **kwargs)
            moved[0] += 1000.0
            return result

        return wrapped

    monkeypatch.setattr(loop, "evaluate", slowed(loop.evaluate))
    monkeypatch.setattr(loop.checkpoint, "save", slowed(loop.checkpoint.save))
    overrides = [
        "--config.train.steps=4",
        "--config.train.log_every=2",
        "--config.train.eval_every=2",
        "--config.train.checkpoint_every=2",
    ]
    train_and_evaluate(loop_config(overrides=overrides), tmp_path / "w", store=FakeStore())
    _, scalars = tb_scalars(tmp_path / "w")
    rates = {e.step: e.value for e in scalars["train/images_per_s"]}
    assert sorted(rates) == [2, 4] and rates[4] > 0.01, rates


def test_images_per_s_leaves_out_validation_and_checkpoint_time(tmp_path, monkeypatch):
    """Batch 8, logs after steps 2 and 4. The loop's clock reads 0 at the start; each log writes
    the checkpoint digests in 0.5 s (1 -> 1.5, 5.5 -> 6); a validation takes 3 s (1.5 -> 4.5).
    Each interval trained 16 images in 1 s of steps: 16 images/s both times (counting the
    validation and the digests, the second would be 16 / 4.5)."""
    import types

    from focalnet_jax.training import loop, sharding
    from focalnet_jax.training.tb_logging import SummaryWriter

    clock = iter([0.0, 1.0, 1.5, 1.5, 1.5, 4.5, 5.5, 6.0, 6.0])
    # The loop's own clock only: JAX reads `time.perf_counter` too (e.g. when it first compiles).
    monkeypatch.setattr(loop, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    spec = types.SimpleNamespace(global_batch=8, subsets=())
    progress = types.SimpleNamespace(set_postfix=lambda **_: None)
    mesh, writer = sharding.make_mesh(), SummaryWriter(tmp_path / "tb")
    manager = workdir_lib.make_manager(tmp_path)
    logger = loop._Logger(spec, tmp_path, manager, progress, start=0, mesh=mesh, writer=writer)
    written = []
    monkeypatch.setattr(logger.writer, "scalars", lambda step, values: written.append(values))
    logger.train(2, {"loss": np.float32(0.5)})
    with logger.outside_steps():
        pass
    logger.train(4, {"loss": np.float32(0.5)})
    logger.writer.close()
    manager.close()
    assert [w["train/images_per_s"] for w in written] == [16.0, 16.0]
    assert next(clock, None) is None  # every reading used: the digest writes were timed


def test_resume_after_a_crash_past_the_last_checkpoint_drops_the_orphaned_events(tmp_path):
    """A run stopped at step 8 with its newest checkpoint at 5 resumes from 5: TensorBoard's
    readers (the EventAccumulator and the one its server uses) show steps 1..10 once each, not
    steps 6..8 twice, and the values of steps 6..8 are the resumed session's."""
    store, workdir = FakeStore(), tmp_path / "w"
    first = loop_config(overrides=[*RUN, "--config.train.steps=8"])
    train_and_evaluate(first, workdir, store=store)
    shutil.rmtree(workdir / "checkpoints" / "8")  # as if killed after step 8 was logged
    second = loop_config(overrides=[*RUN, "--config.train.steps=10"])
    train_and_evaluate(second, workdir, store=store)
    _, scalars = tb_scalars(workdir)
    for tag in ("train/loss", "train/images_per_s", "train/lr"):
        assert [e.step for e in scalars[tag]] == list(range(1, 11)), tag
    assert [e.step for e in scalars["val/loss"]] == [10]  # the first session's step 8: orphaned
    _, resumed_file = sorted((workdir / "tb").iterdir())  # one event file a session
    resumed = EventAccumulator(str(resumed_file))
    resumed.Reload()
    assert [e.step for e in resumed.Scalars("train/loss")] == list(range(6, 11))
    expected = {e.step: e.wall_time for e in resumed.Scalars("train/images_per_s")}
    assert {e.step: e.wall_time for e in scalars["train/images_per_s"][5:]} == expected
    served = plugin_event_accumulator.EventAccumulator(str(workdir / "tb"))
    served.Reload()
    assert [e.step for e in served.Tensors("train/loss")] == list(range(1, 11))


def _bar_frames(text: str, steps: int) -> list[tuple[int, str, int]]:
    """(count, loss, step the loss is named from) of each frame of the console bar."""
    pattern = rf"train:[^\r\n]*?(\d+)/{steps} \[[^\]]*loss=([0-9.]+) \(step (\d+)\)\]"
    return [(int(n), loss, int(step)) for n, loss, step in re.findall(pattern, text)]


def _logged_losses(workdir) -> dict[int, str]:
    """{step: train/loss as the bar prints it} of a run's TensorBoard events."""
    _, scalars = tb_scalars(workdir)
    return {e.step: f"{e.value:.4f}" for e in scalars["train/loss"]}


def test_progress_bar_shows_each_step_with_its_own_loss(tmp_path, capsys):
    """Every frame of the console bar pairs step n with train/loss of step n (a validation line
    redraws the bar: it showed step n - 1 beside step n's loss)."""
    overrides = ["--config.train.steps=4", "--config.train.eval_every=2"]
    train_and_evaluate(loop_config(overrides=overrides), tmp_path / "w", store=FakeStore())
    frames = _bar_frames(capsys.readouterr().err, 4)
    logged = _logged_losses(tmp_path / "w")
    assert {n for n, _, _ in frames} >= {2, 4}
    assert frames == [(n, logged[n], n) for n, _, _ in frames]


def test_progress_bar_names_the_step_of_its_loss_between_logs(tmp_path, capsys, monkeypatch):
    """log_every 2 over 5 steps logs steps 2, 4, 5: a frame at step 3 shows step 2's loss, and
    says so (it showed it as the loss of step 3). Every step is drawn here (tqdm redraws at most
    every 0.1 s by default)."""
    import functools

    from focalnet_jax.training import loop

    monkeypatch.setattr(loop, "tqdm", functools.partial(loop.tqdm, mininterval=0, miniters=1))
    overrides = ["--config.train.steps=5", "--config.train.log_every=2"]
    train_and_evaluate(loop_config(overrides=overrides), tmp_path / "w", store=FakeStore())
    frames = _bar_frames(capsys.readouterr().err, 5)
    logged = _logged_losses(tmp_path / "w")
    assert sorted(logged) == [2, 4, 5]
    expected = [(2, logged[2], 2), (3, logged[2], 2), (4, logged[4], 4), (5, logged[5], 5)]
    assert sorted(set(frames)) == expected


def test_non_finite_loss_is_caught_before_validation_logs_anything(tmp_path):
    """Validation between two logs first checks the steps: a NaN at step 1 stops the run at the
    step-2 validation, which writes no val/ scalars or panel of the diverged parameters."""
    store = FakeStore()
    store.images = np.full_like(store.images, np.nan)
    overrides = [
        "--config.train.steps=4",
        "--config.train.log_every=1000",
        "--config.train.eval_every=2",
    ]
    with pytest.raises(UserError, match=r"at step 1 \(checked at step 2\); .*: none yet in"):
        train_and_evaluate(loop_config(overrides=overrides), tmp_path / "w", store=store)
    events, scalars = tb_scalars(tmp_path / "w")
    assert scalars == {} and events.Tags()["images"] == []


def test_console_names_the_run_and_fold_before_its_bar(tmp_path, caplog):
    """`focalnet cv` trains one fold after another: each run's first line names its workdir and
    fold, then its slices, steps and starting step (here a resume at 1 of 2). A fold whose
    validation cases hold no annotated slice is said to validate none (only "0 val slices" said
    it)."""
    store, workdir = FakeStore(), tmp_path / "fold1"
    split = RunSpec.from_config(loop_config(overrides=["--config.data.fold=1"])).fold_split(store)
    store.annotated[folds.case_rows(store, split.val_cases, "all")] = False
    with caplog.at_level("INFO", logger="focalnet_jax.training.loop"):
        for steps in (1, 2):
            overrides = ["--config.data.fold=1", f"--config.train.steps={steps}"]
            train_and_evaluate(loop_config(overrides=overrides), workdir, store=store)
    lines = [r.getMessage() for r in caplog.records if "val slices" in r.getMessage()]
    counts = f"{len(split.train_rows)} train / 0 val slices"
    empty = f"{workdir}: fold 1 validates no slice ({len(split.val_cases)} validation cases, "
    assert caplog.text.count(empty + "data.slices=annotated): the run logs no val/ scalars") == 2
    per_epoch = f"({len(split.train_rows) // 4} per epoch)"  # batch 4, 20 slices
    assert [line.split(", lambda")[0] for line in lines] == [
        f"{workdir}, fold 1: {counts}, 1 steps {per_epoch}, start at 0",
        f"{workdir}, fold 1: {counts}, 2 steps {per_epoch}, start at 1",
    ]


def test_a_run_stopped_at_a_validation_step_validates_it_on_resume(tmp_path, monkeypatch, caplog):
    """SIGTERM after step 2 of 3 (eval_every 2) stops the run before the step-2 validation; the
    rerun validates the step-2 checkpoint before training on, so val/loss has steps 2 and 3 (it
    had 3 alone: the point at 2 was never logged)."""
    from focalnet_jax.training import graceful_stop
    from focalnet_jax.training.graceful_stop import TrainingStopped
    from focalnet_jax.training.tb_logging import read_scalars

    checks = iter(range(1, 100))
    monkeypatch.setattr(graceful_stop.SigtermStop, "stop_now", lambda *_, **__: next(checks) == 2)
    store, workdir = FakeStore(), tmp_path / "w"
    config = loop_config(overrides=["--config.train.steps=3", "--config.train.eval_every=2"])
    with caplog.at_level("WARNING", logger="focalnet_jax.training.loop"):
        with pytest.raises(TrainingStopped, match="at step 2"):
            train_and_evaluate(config, workdir, store=store)
        assert read_scalars(workdir / "tb", "val/loss")[0].size == 0
        train_and_evaluate(config, workdir, store=store)
    assert read_scalars(workdir / "tb", "val/loss")[0].tolist() == [2, 3]
    assert read_scalars(workdir / "tb", "train/loss")[0].tolist() == [1, 2, 3]
    assert "the validation at step 2 is not in its TensorBoard log" in caplog.text


def test_a_resume_at_a_validated_step_does_not_validate_it_again(tmp_path):
    """A run resumed at step 4 of 8 (eval_every 2) whose log has val/loss at 2 and 4: nothing to
    validate first; without the point at 4 (stopped before it), validate. The check looked for
    the last step (8) instead, absent until the run ends, so each such resume validated again
    and warned that the validation was missing."""
    from focalnet_jax.training.loop import _missing_validation
    from focalnet_jax.training.tb_logging import SummaryWriter

    for logged, missing in (([2, 4], False), ([2], True)):
        workdir = tmp_path / f"logged_{len(logged)}"
        writer = SummaryWriter(workdir / "tb", enabled=True)
        for step in logged:
            writer.scalars(step, {"val/loss": 0.5})
        writer.close()
        assert _missing_validation(workdir, 4, 8, 2, val_slices=3) is missing
        # Not due (not a multiple of eval_every), or nothing to validate: never.
        assert _missing_validation(workdir, 3, 8, 2, val_slices=3) is False
        assert _missing_validation(workdir, 4, 8, 2, val_slices=0) is False


def test_a_training_split_smaller_than_the_batch_is_one_line_naming_fold_and_store(tmp_path):
    """Batch 32 on the 10 annotated slices of fold 0's 4 training cases: refused before anything
    is written, the line naming the fold, store and slice selection (it named none of them)."""
    store = FakeStore(patients=6)
    config = tiny_config(overrides=["--config.train.batch_size=32", "--config.data.num_folds=3"])
    split = RunSpec.from_config(config).fold_split(store)
    message = (
        f"the training split of data.fold=0 in store {store.path} (data.slices=annotated: "
        f"{len(split.train_cases)} cases) has {len(split.train_rows)} slices, fewer than one "
        "global batch of train.batch_size=32"
    )
    with pytest.raises(UserError) as raised:
        train_and_evaluate(config, tmp_path / "w", store=store)
    assert str(raised.value) == message and len(split.train_rows) < 32
    assert not (tmp_path / "w").exists()


def test_panel_pixels_are_clipped_and_nan_is_black():
    """A NaN input (as in a store whose images went non-finite) was cast to an undefined byte,
    with NumPy's 'invalid value encountered in cast' warning."""
    import warnings

    from focalnet_jax.training.tb_logging import to_uint8

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pixels = to_uint8(np.array([[np.nan, 0.5, 2.0, -1.0, np.inf, -np.inf]], np.float32))
    assert pixels.tolist() == [[0, 128, 255, 0, 255, 0]]
