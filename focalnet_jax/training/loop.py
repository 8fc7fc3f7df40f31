"""`train_and_evaluate(config, workdir)`: the training loop of every config.

The run is built from the config's `RunSpec`; resume order: the newest intact checkpoint in
`workdir` (a damaged newer one is moved aside), else `model.pretrained` (torchvision ResNet
weights), else a fresh initialisation (`checkpoint.resume_or_initialize`). The data order and
augmentation depend only on (seed, step), so a restarted run continues exactly where the
checkpoint left it. SIGTERM stops the loop at a step boundary with a checkpoint there; one after
the last step has begun completes the run first (`graceful_stop`).

The TensorBoard events are flushed at each checkpoint, so a process killed later (SIGKILL, a second
SIGTERM) keeps the logs up to the step it resumes from. A run that resumes at a step whose
validation is not in its log (killed during it after the checkpoint was written, or stopped by
SIGTERM at a validation step: the stop comes before it) validates that checkpoint first
(`_missing_validation`); at its last step the rerun trains no step.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from focalnet_jax import losses
from focalnet_jax.data.run_store import record_run_store
from focalnet_jax.errors import Terminated, UserError
from focalnet_jax.run import RunSpec
from focalnet_jax.run import workdir as workdir_lib
from focalnet_jax.training import (
    checkpoint,
    group_failures,
    input_pipeline,
    save_failures,
    sharding,
)
from focalnet_jax.training import step as step_lib
from focalnet_jax.training.graceful_stop import SigtermStop, TrainingStopped, ctrl_c_interrupt
from focalnet_jax.training.run_start import (
    RunStart,
    check_run_start,
    training_lock,
    unused_settings,
)
from focalnet_jax.training.tb_logging import SummaryWriter, read_scalars

log = logging.getLogger(__name__)


class NonFiniteLossError(UserError):
    """The loss or gradient norm of a step was NaN or infinite (learning rate, data): `focalnet`
    prints one line naming the step and the last good checkpoint."""


@jax.jit
def _first_bad(first_bad, loss, grad_norm, steps_done):
    """The number (from 1) of the first step whose loss or gradient norm was not finite (-1
    while none). All operands live on the device (`steps_done`: the state's step after the
    update), so the check neither transfers nor waits at each step."""
    bad = ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm))
    return jnp.where((first_bad < 0) & bad, steps_done, first_bad)


@jax.jit
def _add(totals, sums):
    """`totals + sums`, key by key (validation sums, on the device)."""
    return jax.tree.map(jnp.add, totals, sums)


def _scalars(metrics, subsets, prefix="train") -> dict[str, float]:
    out = {}
    for name, value in jax.device_get(metrics).items():
        if name == "mfl_subset_share":
            for subset, share in zip(subsets, np.asarray(value), strict=True):
                out[f"{prefix}/mfl_subset_share/{'+'.join(subset)}"] = float(share)
        else:
            out[f"{prefix}/{name}"] = float(value)
    return out


def evaluate(eval_step, state, reader, rows, batch_size, mesh) -> tuple[dict[str, float], dict]:
    """Validation loss (`step.validation_loss`), Dice (lesion: class >= 1, csPCa: class >= 2; at
    0.5) and the mean lesion score P(class >= 1) on lesion and on background pixels over `rows`
    (`eval_step`: `step.make_eval_step`)."""
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    # shown: the class maps of the first `step.PANEL_SLICES` rows (the step returns those of
    # each batch's first ones), over batches.
    totals, shown = None, []
    # The sums stay on the device until the last batch: no wait at each batch, so reading the
    # next batch overlaps the device's work on this one.
    for batch in input_pipeline.eval_batches(reader, rows, batch_size, mesh):
        sums, predicted = eval_step(variables, batch)
        totals = sums if totals is None else _add(totals, sums)
        if sum(len(p) for p in shown) < step_lib.PANEL_SLICES:
            shown.append(predicted)
    totals, shown = jax.device_get((totals, shown))
    predicted = np.concatenate(shown)[: min(step_lib.PANEL_SLICES, len(rows))]
    metrics = validation_metrics(totals, eval_step)
    return metrics, {"rows": rows[: len(predicted)], "predicted": predicted}


def validation_metrics(totals: Mapping, eval_step: step_lib.EvalStep) -> dict[str, float]:
    """The `val/` scalars from the validation sums `totals` of `evaluate`: the loss, Dice of
    lesion (class >= 1) and csPCa (class >= 2; not for a binary output, which predicts no grade)
    and the mean P(class >= 1) on lesion and on background pixels (NaN where there are none). A
    Dice is 1 where neither the truth nor the prediction has a pixel of its class over the whole
    validation set (nothing missed, nothing made up; nnU-Net's evaluation reports NaN there)."""
    metrics = {"val/loss": step_lib.validation_loss(totals, eval_step.loss)}
    scores = (
        ((1, "lesion"),) if eval_step.loss.encoding == "binary" else ((1, "lesion"), (2, "cspca"))
    )
    for k, name in scores:
        denominator = float(totals[f"predicted_{k}"] + totals[f"true_{k}"])
        dice = 2.0 * float(totals[f"intersect_{k}"]) / denominator if denominator else 1.0
        metrics[f"val/dice_{name}"] = dice
    # Threshold-free: focal-loss scores are low in absolute terms, yet lesions should outscore
    # the background.
    for name, pixels in (("lesion", "true_1"), ("background", "background")):
        count = float(totals[pixels])
        mean = float(totals[f"score_{name}"]) / count if count else float("nan")
        metrics[f"val/mean_score_{name}"] = mean
    return metrics


def panel(reader, rows: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Grey image grid: one row per slice, columns = each component (clipped), truth, prediction
    (classes / 5)."""
    batch = reader.read(rows)
    images = np.clip(batch["images"], 0.0, 1.0)  # as `clip_inputs`, on the host
    columns = [images[..., c] for c in range(images.shape[-1])]
    columns += [batch["classes"] / 5.0, predicted[: len(rows)] / 5.0]
    return np.concatenate([np.concatenate(list(col), axis=0) for col in columns], axis=1)


class _Logger:
    """The loop's periodic outputs: scalars every `log_every` steps (with images/s), validation
    every `eval_every` steps, a non-finite check before each log and checkpoint. The progress
    bar shows the loss of the latest log, with its step (`log_every` > 1: an earlier step than
    the bar's count; fetching every step's loss would make the host wait for each step).

    `train/images_per_s` = training images of the global batch (all devices, all processes) since
    the previous log / the seconds spent training them: the time inside `outside_steps()`
    (validation, checkpoint writes) is left out; the first interval after a start or resume holds
    the compilation. Logged apart: `time/validation_s` (a session's first holds its compilation)
    and `time/checkpoint_s`, the loop's wait for an asynchronous save (its write runs on).
    """

    def __init__(self, spec: RunSpec, workdir: Path, manager, progress, start: int, mesh, writer):
        self.spec, self.workdir, self.manager, self.progress = spec, workdir, manager, progress
        self.writer = writer  # `SummaryWriter` of `workdir/tb`, its session started
        # Replicated like the step's metrics, so `_first_bad` compiles once.
        self.first_bad = sharding.put_replicated(jnp.int32(-1), mesh)
        self.start = start  # the session's first step: its checkpoints are those after it
        self.last_time, self.last_step = time.perf_counter(), start
        self.excluded_s = 0.0  # seconds outside training steps since the last log

    @contextlib.contextmanager
    def outside_steps(self, state=None, timed: tuple[int, str] | None = None):
        """Time spent inside is not counted in `train/images_per_s`; the steps dispatched
        before it (`state`'s computation) finish first, so that their time still counts.
        `timed=(step, tag)`: that time (s) is logged as scalar `tag` at `step` unless it failed."""
        jax.block_until_ready(state)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.excluded_s += (seconds := time.perf_counter() - start)
        if timed is not None:
            self.writer.scalars(timed[0], {timed[1]: seconds})

    def finish_saves(self) -> None:
        """The pending checkpoint writes on disk, with the digests of this session's steps."""
        checkpoint.finish_saves(self.manager, newer_than=self.start)

    def check_finite(self, step: int) -> None:
        bad = int(jax.device_get(self.first_bad))
        if bad >= 0:
            self.finish_saves()
            latest = self.manager.latest_step()
            kept = f"step {latest}" if latest is not None else "none yet"
            raise NonFiniteLossError(
                f"non-finite loss or gradient at step {bad} (checked at step {step}); "
                f"last good checkpoint: {kept} in {self.workdir}"
            )

    def train(self, done: int, metrics) -> None:
        self.check_finite(done)
        with self.outside_steps():
            checkpoint.write_finished_digests(self.manager, newer_than=self.start)
        scalars = _scalars(metrics, self.spec.subsets)
        now = time.perf_counter()
        images = (done - self.last_step) * self.spec.global_batch
        seconds = now - self.last_time - self.excluded_s
        scalars["train/images_per_s"] = images / max(seconds, 1e-9)
        self.last_time, self.last_step, self.excluded_s = now, done, 0.0
        self.writer.scalars(done, scalars)
        # The bar moves at every step, the loss only at a log: the bar names the loss's step.
        self.progress.set_postfix(loss=f"{scalars['train/loss']:.4f} (step {done})", refresh=False)

    def validation(self, done: int, val: dict, reader, shown: dict) -> None:
        self.writer.scalars(done, val)
        if self.writer.enabled:  # process 0: the images and the console line
            image = panel(reader, shown["rows"], shown["predicted"])
            self.writer.image(done, "val/panel", image)
            line = ", ".join(f"{k} {v:.4f}" for k, v in sorted(val.items()))
            self.progress.write(f"step {done}: {line}")


def _mfl_note(spec: RunSpec, norm: str) -> str:
    """What MFL runs each step, e.g. `, MFL over 30 subsets of 5 components (select: 30 forward
    passes without gradients, 4 at a time, then each slice's chosen subset with gradients)`;
    `select` under `norm` "batch" adds that its gradient is not the paper's (docs/mfl.md)."""
    if not spec.mfl:
        return ""
    m = len(spec.subsets)
    chunk = losses.probe_chunk(spec.mfl_chunk, m)
    at_a_time = f"{chunk} at a time" if chunk else "all at once"
    if spec.mfl_mode == "select":
        passes = f"{m} forward passes without gradients, {at_a_time}, then each slice's chosen "
        passes += "subset with gradients"
        if norm == "batch":  # that subset's recomputed batch mixes subsets: other statistics
            passes += "; under batch normalisation not the paper's MFL gradient, which `vmap` is"
    else:
        passes = f"{m} forward and backward passes, {at_a_time}"
    return (
        f", MFL over {m} subsets of {len(spec.components)} components ({spec.mfl_mode}: {passes})"
    )


def _record_start(run: RunStart, workdir: Path, start: int, validate_first: bool):
    """A run's start records (process 0 writes them): `store.json` (`record_run_store`),
    `config.json`, the start's log lines, and the TensorBoard writer, returned with the session
    starting at `start + 1`. Holds no collective (`group_failures.together`)."""
    config, split = run.config, run.split
    record_run_store(workdir, run.store, split=split, total_steps=run.num_steps,
                     write=jax.process_index() == 0, new_run=start == 0)  # fmt: skip
    workdir_lib.save_config(config, workdir)
    if jax.process_index() == 0:
        log.info(
            "%s, fold %d: %d train / %d val slices, %d steps (%d per epoch), start at %d, "
            "lambda %.4g%s", workdir, config.data.fold, len(split.train_rows), len(split.val_rows),
            run.num_steps, run.batches.steps_per_epoch, start, run.mfl_weight,
            _mfl_note(run.spec, config.model.norm),
        )  # fmt: skip
        for line in unused_settings(config, run.spec):
            log.warning("%s: %s", workdir, line)
        if not len(split.val_rows):
            log.warning(
                "%s: fold %d validates no slice (%d validation cases, data.slices=%s): the run "
                "logs no val/ scalars", workdir, config.data.fold, len(split.val_cases),
                config.data.slices,
            )  # fmt: skip
        if validate_first:
            log.warning(
                "%s: the validation at step %d is not in its TensorBoard log (a process killed "
                "during it or stopped at that step, or a resume whose train.eval_every made the "
                "step due); validating that checkpoint now",
                workdir, start,
            )  # fmt: skip
    writer = SummaryWriter(workdir / "tb")
    writer.session_start(start + 1)  # drops what a stopped session logged past `start`
    return writer


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path, *, store=None):
    """Train `config` in `workdir` (resuming from its newest intact checkpoint); returns the final
    state. A resume must keep the saved config but for `workdir.RESUMABLE_KEYS` (a `UserError`
    names the other keys that differ), and may not end before the step it resumes from (a
    `UserError`, nothing recorded); `config.json` then records the new values.

    `store`: an opened store (default: `open_config_store(config)`). The config is validated
    (`RunSpec.from_config`) before the store is opened or anything compiled; its paths are made
    absolute first (`workdir.absolute_paths`), as `config.json` records them. Every check that
    needs no train state comes first (`check_run_start`), the workdir's lock held (one training
    at a time in a workdir: `training_lock`).
    """
    workdir, mesh = Path(workdir), sharding.make_mesh()
    with training_lock(workdir):
        return _train(check_run_start(config, workdir, mesh, store=store), workdir, mesh)


def _train(run: RunStart, workdir: Path, mesh):
    """`train_and_evaluate` from its checked start `run`."""
    config, spec, split, batches = run.config, run.spec, run.split, run.batches
    num_steps, lam = run.num_steps, run.mfl_weight
    key = spec.root_key()
    init_key, train_key = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)
    manager = workdir_lib.make_manager(workdir, keep=config.train.keep_checkpoints)
    save_failures.quiet_background_failures()  # a full disk: one line, not Orbax's per-array logs
    state = checkpoint.resume_or_initialize(spec, manager, mesh, init_key, run.resumable)
    start = int(jax.device_get(state.step))  # the step `check_run_start` checked, or an older one
    validate_first = _missing_validation(
        workdir, start, num_steps, config.train.eval_every, len(split.val_rows)
    )
    # Process 0's writes: a failure there ends every process of a group, each with one line.
    with group_failures.together("start the run"):
        writer = _record_start(run, workdir, start, validate_first)
    progress = tqdm(
        total=num_steps, initial=start, disable=jax.process_index() != 0, desc="train", unit="step"
    )
    logger = _Logger(spec, workdir, manager, progress, start, mesh, writer)
    with SigtermStop() as sigterm:
        try:  # Whatever happens, pending checkpoint writes finish and files are closed.
            state = _steps(
                spec, state, batches, split.val_rows, mesh, logger, train_key, lam, num_steps,
                sigterm, validate_first,
            )  # fmt: skip
        except BaseException as failure:
            _close(logger, failing=True)
            # Ctrl-C: its line names the step a rerun resumes from, whole on disk (a save cut
            # short is not counted); SIGTERM's `TrainingStopped` has its own.
            if isinstance(failure, KeyboardInterrupt) and not isinstance(failure, Terminated):
                raise ctrl_c_interrupt(workdir_lib.resumable_step(workdir), workdir) from None
            raise
        _close(logger, failing=False)
        # Complete: the last checkpoint is on disk, the logs closed. A SIGTERM since the last
        # step's check (its checkpoint, validation, these writes) says so (`graceful_stop`).
        if sigterm.stop_now(agreement_point=True):
            raise TrainingStopped(int(jax.device_get(state.step)), workdir, complete=True)
    return state


def _missing_validation(
    workdir: Path, start: int, num_steps: int, eval_every: int, val_slices: int
) -> bool:
    """Whether a run resumed at a step due for validation (its last, `num_steps`, or a multiple
    of `eval_every`) lacks that step's `val/loss` in its TensorBoard log: killed during that
    validation, or stopped by SIGTERM at that step. Process 0 reads the log and the others take
    its answer, so that all of them validate or none."""
    due = start == num_steps or (eval_every and start % eval_every == 0)
    if not (start and due and val_slices):
        return False
    missing = False
    if jax.process_index() == 0:
        missing = start not in read_scalars(workdir / "tb", "val/loss")[0]
    if jax.process_count() > 1:
        missing = bool(multihost_utils.broadcast_one_to_all(np.bool_(missing)))
    return missing


def _close(logger: _Logger, *, failing: bool) -> None:
    """Finish the pending checkpoint writes, close the manager and the event files. `failing`
    (the run is ending on an error): a failure here is logged, not raised over that error (a full
    disk fails the pending save and the events' flush again); else each step is still taken after
    a failure, the first of which is raised."""
    logger.progress.close()
    first = None
    for what, close in (
        ("pending checkpoint writes", logger.finish_saves),
        ("closing the checkpoint manager", logger.manager.close),
        ("closing the event file", logger.writer.close),
    ):
        try:
            close()
        except Exception as error:
            if failing or first is not None:
                log.debug("%s failed too: %s", what, error)
            else:
                first = error
    if first is not None:
        raise first


def _save(logger: _Logger, saved: set, done: int, state) -> None:
    """Checkpoint `state` at step `done` unless saved already (its parameters checked first),
    and flush the TensorBoard events logged so far."""
    if done in saved:
        return
    logger.check_finite(done)
    with logger.outside_steps(state, timed=(done, "time/checkpoint_s")):
        checkpoint.save(logger.manager, done, state, newer_than=logger.start)
        logger.writer.flush()
    saved.add(done)


def _validate(logger: _Logger, eval_step, state, reader, val_rows, spec: RunSpec, mesh, done):
    """Validate `state` (step `done`) on `val_rows` and log it; not of diverged parameters."""
    logger.check_finite(done)
    with logger.outside_steps(state, timed=(done, "time/validation_s")):
        val, shown = evaluate(eval_step, state, reader, val_rows, spec.global_batch, mesh)
        logger.validation(done, val, reader, shown)


def _stop(logger: _Logger, saved: set, done: int, state) -> TrainingStopped:
    """Save step `done` and wait until every process has it on disk (`graceful_stop`); the
    exception to raise."""
    _save(logger, saved, done, state)
    logger.writer.flush()
    logger.finish_saves()
    checkpoint.sync_processes(f"stopped_at_{done}")  # none exits while another still writes
    return TrainingStopped(done, logger.workdir)


def _steps(
    spec: RunSpec, state, batches, val_rows, mesh, logger: _Logger, key, lam, num_steps,
    sigterm: SigtermStop, validate_first: bool,
):  # fmt: skip
    """Steps `state.step`..`num_steps` with logging, checkpoints and validation; the last state.
    A SIGTERM (`sigterm`) stops it at a step boundary before the last with a checkpoint
    (`graceful_stop`). `validate_first`: validate `state` before any step (its step's validation
    was cut off)."""
    eval_step = step_lib.make_eval_step(spec, mesh)
    if validate_first:
        start = int(jax.device_get(state.step))
        _validate(logger, eval_step, state, batches.reader, val_rows, spec, mesh, start)
    train_step = step_lib.make_train_step(spec, mesh)
    # Placed on every device once, not copied from the default device at each step.
    key, lam_operand = sharding.put_replicated((key, jnp.float32(lam)), mesh)
    train = spec.config.train
    saved = set(logger.manager.all_steps())
    for step, batch in batches.iterate(int(jax.device_get(state.step)), num_steps):
        state, metrics = train_step(state, batch, key, lam_operand)
        logger.first_bad = _first_bad(
            logger.first_bad, metrics["loss"], metrics["grad_norm"], state.step
        )
        done = step + 1
        final = done == num_steps
        logged = done % train.log_every == 0 or final
        if logged:
            logger.train(done, metrics)
        # Before checkpoint and validation: the bar they redraw or leave on screen shows `done`.
        logger.progress.update(1)
        # The last step goes on to its checkpoint and validation: a SIGTERM then completes the
        # run (`train_and_evaluate`).
        if not final and sigterm.stop_now(agreement_point=logged):
            raise _stop(logger, saved, done, state)
        if done % train.checkpoint_every == 0 or final:
            _save(logger, saved, done, state)
        if len(val_rows) and ((train.eval_every and done % train.eval_every == 0) or final):
            _validate(logger, eval_step, state, batches.reader, val_rows, spec, mesh, done)
    return state
