"""`train_and_evaluate(config, workdir)`: the training loop of every config.

Resume order: the latest checkpoint in `workdir`, else `model.pretrained` (torchvision ResNet
weights), else a fresh initialisation. The data order and augmentation depend only on
(seed, step), so a restarted run continues exactly where the checkpoint left it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from focalnet_jax import checkpoint, input_pipeline, losses, sharding
from focalnet_jax.augment import clip_inputs
from focalnet_jax.data.run_store import record_run_store
from focalnet_jax.tb_logging import SummaryWriter
from focalnet_jax.training import step as step_lib
from focalnet_jax.training import train_state

log = logging.getLogger(__name__)

_PANEL_SLICES = 4


def split_rows(config: ml_collections.ConfigDict, store) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation store rows of `config.data.fold` (patient-level folds)."""
    from focalnet_jax.data.folds import split_cases

    data = config.data
    if not 0 <= data.fold < data.num_folds:
        raise ValueError(f"data.fold={data.fold} not in [0, data.num_folds={data.num_folds})")
    train_ids, val_ids = split_cases(
        store, data.fold, num_folds=data.num_folds, seed=data.fold_seed
    )
    return (
        input_pipeline.select_rows(store, train_ids, data.slices),
        input_pipeline.select_rows(store, val_ids, data.slices),
    )


def total_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    """`train.steps` when > 0, else `train.epochs` whole epochs."""
    if config.train.steps > 0:
        return int(config.train.steps)
    if config.train.epochs <= 0:
        raise ValueError("train.steps and train.epochs are both <= 0; set one of them")
    return int(config.train.epochs * steps_per_epoch)


def mfl_weight(config: ml_collections.ConfigDict, store, train_rows: np.ndarray) -> float:
    """lambda of eq. 4 (0 without MFL); 'auto' = 1 / positive bit ratio of the training split."""
    if not config.loss.mfl:
        return 0.0
    enc = losses.get_loss(config.loss.name).encoding
    bits = "ordinal" if enc == "onehot" else enc  # MFL compares P(class >= k) bits

    def ratio():
        return losses.positive_bit_ratio(
            np.asarray(store.classes[train_rows]),
            encoding=bits,
            grade_known=np.asarray(store.grade_known[train_rows]),
        )

    return step_lib.resolve_mfl_weight(config.loss.mfl_weight, ratio)


@jax.jit
def _first_bad(first_bad, loss, grad_norm, step):
    """First step whose loss or gradient norm was not finite (-1 while none)."""
    bad = ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm))
    return jnp.where((first_bad < 0) & bad, step, first_bad)


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
    """Validation loss, Dice (lesion: class >= 1, csPCa: class >= 2; at 0.5) and the mean lesion
    score P(class >= 1) on lesion and on background pixels over `rows`."""
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    totals, first_predicted = None, None
    for batch in input_pipeline.eval_batches(reader, rows, batch_size, mesh):
        sums, predicted = eval_step(variables, batch)
        sums = jax.device_get(sums)
        totals = sums if totals is None else {k: totals[k] + sums[k] for k in totals}
        if first_predicted is None:
            first_predicted = np.asarray(predicted[:_PANEL_SLICES])
    count = max(float(totals["count"]), 1.0)
    metrics = {"val/loss": float(totals["loss"]) / count}
    for k, name in ((1, "lesion"), (2, "cspca")):
        denominator = float(totals[f"predicted_{k}"] + totals[f"true_{k}"])
        dice = 2.0 * float(totals[f"intersect_{k}"]) / denominator if denominator else 1.0
        metrics[f"val/dice_{name}"] = dice
    # Threshold-free: focal-loss scores are low in absolute terms, yet lesions should outscore
    # the background.
    metrics["val/mean_score_lesion"] = float(totals["score_lesion"]) / max(
        float(totals["true_1"]), 1
    )
    metrics["val/mean_score_background"] = float(totals["score_background"]) / max(
        float(totals["background"]), 1
    )
    return metrics, {"rows": rows[:_PANEL_SLICES], "predicted": first_predicted}


def panel(reader, rows: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Grey image grid: one row per slice, columns = each component (clipped), truth, prediction
    (classes / 5)."""
    batch = reader.read(rows)
    images = np.asarray(clip_inputs(batch["images"]))
    columns = [images[..., c] for c in range(images.shape[-1])]
    columns += [batch["classes"] / 5.0, predicted[: len(rows)] / 5.0]
    return np.concatenate([np.concatenate(list(col), axis=0) for col in columns], axis=1)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path, *, store=None):
    """Train `config` in `workdir` (resuming from its latest checkpoint); returns the final state.

    `store`: an opened store (default: `open_store(config.data.store)`).
    """
    workdir = Path(workdir)
    components = tuple(config.data.components)

    # Mesh: one `data` axis over every device of every process.
    mesh = sharding.make_mesh()
    sharding.per_device_batch(config.train.batch_size, mesh)

    # Data.
    if store is None:
        from focalnet_jax.data.store import open_store

        store = open_store(config.data.store)
    record_run_store(workdir, store, write=jax.process_index() == 0)
    reader = input_pipeline.SliceReader(store, components)
    train_rows, val_rows = split_rows(config, store)
    batches = input_pipeline.TrainBatches(
        reader,
        train_rows,
        config.train.batch_size,
        mesh,
        seed=config.seed,
        prefetch=config.train.prefetch,
    )
    num_steps = total_steps(config, batches.steps_per_epoch)

    # Model, optimiser, loss weight.
    model, _ = train_state.build_run_model(config, axis_name=sharding.DATA_AXIS)
    tx = train_state.make_optimizer(config.optim)
    lam = mfl_weight(config, store, train_rows)
    subsets = losses.component_subsets(components, config.loss.subsets) if config.loss.mfl else []
    key = jax.random.key(config.seed)
    init_key, train_key = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)
    input_shape = (1, *store.images.shape[1:3], len(components))

    # State: workdir checkpoint, else pretrained weights, else scratch.
    manager = checkpoint.make_manager(workdir, keep=config.train.keep_checkpoints)
    abstract = train_state.abstract_train_state(model, tx, input_shape, mesh)
    state = checkpoint.resume(manager, abstract)
    if state is None:
        variables = None
        if config.model.pretrained:
            from focalnet_jax.models.pretrained import load_torchvision_resnet

            variables = load_torchvision_resnet(
                train_state.init_variables(model, init_key, input_shape),
                config.model.pretrained,
                num_components=len(components),
                model_config=config.model,
            )
        state = train_state.create_train_state(
            model, tx, init_key, input_shape, mesh, variables=variables
        )
    start = int(jax.device_get(state.step))
    checkpoint.save_config(config, workdir)
    if jax.process_index() == 0:
        log.info(
            "%d train / %d val slices, %d steps (%d per epoch), start at %d, lambda %.4g",
            len(train_rows),
            len(val_rows),
            num_steps,
            batches.steps_per_epoch,
            start,
            lam,
        )

    # Steps.
    train_step = step_lib.make_train_step(model, config, tx, mesh)
    lam_operand = jnp.float32(lam)
    eval_step = step_lib.make_eval_step(model, config, mesh)
    writer = SummaryWriter(workdir / "tb")
    first_bad = jnp.int32(-1)
    saved = set(manager.all_steps())

    def check_finite(step):
        bad = int(jax.device_get(first_bad))
        if bad >= 0:
            manager.wait_until_finished()
            raise RuntimeError(
                f"non-finite loss or gradient at step {bad + 1} (checked at step {step}); "
                f"last good checkpoint: step {manager.latest_step()} in {workdir}"
            )

    # Loop. Whatever happens, pending checkpoint writes finish and files are closed.
    progress = tqdm(
        total=num_steps, initial=start, disable=jax.process_index() != 0, desc="train", unit="step"
    )
    try:
        last_time, last_step = time.perf_counter(), start
        for step, batch in batches.iterate(start, num_steps):
            state, metrics = train_step(state, batch, train_key, lam_operand)
            first_bad = _first_bad(first_bad, metrics["loss"], metrics["grad_norm"], step)
            done = step + 1
            progress.update(1)
            final = done == num_steps
            if done % config.train.log_every == 0 or final:
                check_finite(done)
                scalars = _scalars(metrics, subsets)
                now = time.perf_counter()
                scalars["train/images_per_s"] = (
                    (done - last_step) * config.train.batch_size / max(now - last_time, 1e-9)
                )
                last_time, last_step = now, done
                writer.scalars(done, scalars)
                progress.set_postfix(loss=f"{scalars['train/loss']:.4f}", refresh=False)
            if (done % config.train.checkpoint_every == 0 or final) and done not in saved:
                check_finite(done)
                checkpoint.save(manager, done, state)
                saved.add(done)
            eval_every = config.train.eval_every
            if len(val_rows) and ((eval_every and done % eval_every == 0) or final):
                val, shown = evaluate(
                    eval_step, state, reader, val_rows, config.train.batch_size, mesh
                )
                writer.scalars(done, val)
                if writer.enabled:  # process 0: the images and the console line
                    writer.image(
                        done, "val/panel", panel(reader, shown["rows"], shown["predicted"])
                    )
                    line = ", ".join(f"{k} {v:.4f}" for k, v in sorted(val.items()))
                    progress.write(f"step {done}: {line}")
    finally:
        progress.close()
        manager.wait_until_finished()
        manager.close()
        writer.close()
    return state
