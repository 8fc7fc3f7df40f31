"""The FocalNet loss and the per-device train step (pmap style under `jax.shard_map`), and the
evaluation step. Both are module-level functions of a `RunSpec`, bound with `functools.partial`.

Loss (paper eq. 4): `L = loss(f(x)) + lambda * MFL`, where `loss` is the run's named loss
(`spec.loss`), so the same step trains FocalNet, every baseline and every ablation.

* One application on the full input, `train=True` with `mutable=['batch_stats']`: the only pass
  whose BatchNorm running averages are kept.
* MFL (`spec.mfl`): the component-subset inputs (the other components zeroed, masked inside
  each chunk) go through the same network, `spec.mfl_chunk` subsets per `jax.vmap`-ped
  application and the chunks one after another (`losses.subset_distances`), so with chunks the
  probe's memory does not grow with the number of subsets. These passes normalise
  with their own batch statistics (training mode, as every training-time application in the
  paper) but their running-average updates are discarded, so the running averages describe full
  inputs only, which is what evaluation sees. `mutual_finding_loss` stops the gradient into the
  full output, which serves as the reference (paper Fig. 3).
* MFL mode `vmap` with chunks: each chunk is `jax.checkpoint`-ed, so the backward pass
  recomputes one chunk's forward at a time instead of keeping every subset's activations.
* MFL mode `select` (the default): every subset is applied without gradients, each slice's argmin
  subset is picked (its input rebuilt from the subset's channel mask, no gather over subsets),
  and only that input is recomputed with gradients. With `frozen` normalisation value and
  gradients equal the `vmap` mode (the min's gradient is the argmin's; in bfloat16 to its
  rounding: docs/mfl.md); with `batch`
  normalisation the recomputed batch mixes subsets, so its batch statistics differ.

MFL compares P(class >= k) (`losses.mfl_probs`): sigmoid bits of ordinal/binary logits, the
softmax tail sums of one-hot outputs (with ordinal targets), so MFL also applies to one-hot
baselines.

Data parallelism: the train step is written per device; gradients, loss terms and metrics are
`lax.pmean`-ed over `data` (equal per-device batches, so the mean of means is the global-batch
mean), a batch Dice sums over `data` (`losses.soft_dice_loss`'s `axis_name`) and BatchNorm
reduces its statistics over `data` (sync-BN), so N devices compute the same update as one device
with the whole batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from focalnet_jax import encoding, losses
from focalnet_jax.losses import reductions
from focalnet_jax.run import DATA_AXIS, RunSpec, clip_inputs
from focalnet_jax.training import augment
from focalnet_jax.training.train_state import TrainState


def _targets(classes, grade_known, enc: str):
    return encoding.encode(classes, enc), encoding.target_validity(grade_known, classes, enc)


def _mfl(apply, variables, full_logits, images, classes, grade_known, spec: RunSpec):
    """(MFL, subset share `[M]`) in the run's MFL mode, the subsets run `spec.mfl_chunk` at a
    time (`losses.subset_distances`). The share of subset i is the fraction of the batch's slices
    whose MFL trained subset i: a slice without known positive bits has distance 0 to every
    subset and trains none, so the shares sum to the fraction of slices with a lesion."""
    targets, valid = _targets(classes, grade_known, spec.mfl_encoding)
    full_probs = losses.mfl_probs(full_logits, spec.output_encoding)
    masks = losses.subset_masks(spec.components, spec.subsets, images.dtype)  # [M, C]
    probs_of = lambda x, v=variables: losses.mfl_probs(apply(x, v)[0], spec.output_encoding)
    chunk = losses.probe_chunk(spec.mfl_chunk, len(spec.subsets))
    distances = functools.partial(
        losses.subset_distances, images=images, masks=masks, full_probs=full_probs,
        targets=targets, valid=valid, chunk=chunk,
    )  # fmt: skip
    size = images.shape[1:3]
    lesion = (jnp.sum(targets * valid, axis=(1, 2, 3)) > 0).astype(jnp.float32)  # [B]

    def share(chosen):
        return jnp.mean(jax.nn.one_hot(chosen, len(spec.subsets)) * lesion[:, None], axis=0)

    if spec.mfl_mode == "vmap":
        # Chunked, the backward pass recomputes each chunk's forward instead of saving all M.
        per_slice, chosen = losses.loss_from_distances(
            distances(jax.checkpoint(probs_of) if chunk else probs_of), *size
        )
        return reductions.mean(per_slice), share(chosen)
    frozen = jax.tree.map(lax.stop_gradient, variables)
    _, chosen = losses.loss_from_distances(distances(lambda x: probs_of(x, frozen)), *size)
    picked = images * jnp.asarray(masks)[chosen][:, None, None, :]  # [B,H,W,C]
    mfl, _ = losses.mutual_finding_loss(full_probs, probs_of(picked)[None], targets, valid=valid)
    return mfl, share(chosen)


def loss_fn(params, batch_stats, images, classes, grade_known, mfl_weight, *, spec: RunSpec):
    """`(total, (terms, batch_stats))` of eq. 4 on one (augmented, clipped) batch.

    images `[B,H,W,C]`, classes / grade_known `[B,H,W]`; `mfl_weight`: lambda, a number or a
    float32 scalar. `terms`: the named loss (and `<name>/<term>`, each weighted term of a loss of
    two, e.g. `ce_dice/ce`, `ce_dice/dice`), `mfl`, `mfl_weight` and `mfl_subset_share [M]`
    (share of the slices whose MFL trained each subset; lesion-free slices train none). The
    batch_stats are the full-input pass's.
    """

    def apply(x, variables):
        out, updates = spec.model.apply(variables, x, train=True, mutable=["batch_stats"])
        return out, updates.get("batch_stats", batch_stats)

    variables = {"params": params, "batch_stats": batch_stats}
    targets, valid = _targets(classes, grade_known, spec.output_encoding)
    logits, new_batch_stats = apply(images, variables)
    across = {"axis_name": DATA_AXIS} if spec.loss.takes_axis_name else {}
    main = spec.loss.fn(logits, targets, valid=valid, **across)  # batch Dice: the global batch
    terms, total = {spec.loss.name: main}, main
    if spec.loss.terms_fn is not None:  # a loss of two terms: each logged beside it
        parts = spec.loss.terms_fn(logits, targets, valid=valid, **across)
        terms.update({f"{spec.loss.name}/{term}": value for term, value in parts.items()})
    if spec.mfl:
        mfl, share = _mfl(apply, variables, logits, images, classes, grade_known, spec)
        total = total + mfl_weight * mfl
        terms["mfl"], terms["mfl_subset_share"] = mfl, share
    terms["mfl_weight"] = jnp.asarray(mfl_weight if spec.mfl else 0.0, jnp.float32)
    return total, (terms, new_batch_stats)


def train_step(state: TrainState, batch, key, mfl_weight, *, spec: RunSpec):
    """One SGD step on this device's share of the batch -> `(state, metrics)`.

    Per-slice augmentation keys are `fold_in(fold_in(key, step), global row)`, so results do not
    depend on the device count. Gradients are taken with respect to a per-device ("varying") copy
    of the replicated params, as under pmap, then `pmean`-ed over `data`.
    """
    images, classes, grade_known = batch["images"], batch["classes"], batch["grade_known"]
    if spec.augmenting:
        local = images.shape[0]
        rows = lax.axis_index(DATA_AXIS) * local + jnp.arange(local)
        step_key = jax.random.fold_in(key, state.step)
        keys = jax.vmap(lambda r: jax.random.fold_in(step_key, r))(rows)
        images, classes, grade_known = augment.augment_batch(
            keys, images, classes, grade_known, spec.augment,
            t2w_channel=spec.t2w_channel, lower_ratio=batch["t2w_lower_ratio"],
        )  # fmt: skip
    else:
        images = clip_inputs(images)
    params = lax.pcast(state.params, DATA_AXIS, to="varying")
    grad_fn = jax.value_and_grad(functools.partial(loss_fn, spec=spec), has_aux=True)
    (total, (terms, batch_stats)), grads = grad_fn(
        params, state.batch_stats, images, classes, grade_known, mfl_weight
    )
    grads = lax.pmean(grads, DATA_AXIS)
    metrics = lax.pmean({"loss": total, **terms}, DATA_AXIS)
    updates, opt_state = spec.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["lr"] = spec.schedule(state.step)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["param_norm"] = optax.tree.norm(params)
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
    )
    return new_state, metrics


def make_train_step(spec: RunSpec, mesh: Mesh):
    """Jitted global-view `train_step(state, batch, key, mfl_weight) -> (state, metrics)`, the
    state donated.

    batch: `images [B,H,W,C]` float32 (T2w unclipped), `classes [B,H,W]` int32, `grade_known
    [B,H,W]` uint8, `t2w_lower_ratio [B]` float32 (air / bladder), sharded over `data`; key: the
    run's base key; `mfl_weight`: lambda of eq. 4, a float32 scalar operand rather than a constant
    of the compiled step, so every fold (each with its own lambda) runs the same executable and a
    persistent compilation cache (`JAX_COMPILATION_CACHE_DIR`) serves folds and restarts.
    Metrics (replicated scalars): `loss`, each term, `mfl_weight`, `lr`, `grad_norm`,
    `param_norm`, `mfl_subset_share [M]`.
    """
    sharded = jax.shard_map(
        functools.partial(train_step, spec=spec),
        mesh=mesh,
        in_specs=(P(), P(DATA_AXIS), P(), P()),
        out_specs=(P(), P()),
    )
    return jax.jit(sharded, donate_argnums=0)


PANEL_SLICES = 4  # slices of the validation image panel: the class maps `eval_step` returns


def predicted_classes(scores, output_encoding: str):
    """Decoded class map `[B,H,W]` int32 from P(class >= k) scores (0/1 for a binary output)."""
    # A binary output repeats P(lesion) in all five columns: decode its first column only.
    return encoding.ordinal_decode(scores[..., :1] if output_encoding == "binary" else scores)


def _loss_sums(logits, targets, valid, weight, loss: losses.LossSpec) -> dict:
    """The validation loss's sums over a batch (`weight [B]`: 0 on padding): `loss` (each
    slice's loss, reduced per image, times its weight) and `count`; for a batch-Dice loss also
    `dice_overlap`, `dice_total` (`losses.dice_sums` of the weighted slices), since its Dice is
    one over the whole fold (`validation_loss`), not a mean of per-image Dice."""
    options = losses.batch_dice_options(loss)
    if options is None:
        per_slice = reductions.per_image(loss.map_fn(logits, targets, valid=valid))
        return {"loss": jnp.sum(weight * per_slice), "count": jnp.sum(weight)}
    ce_map = {"sigmoid": losses.sigmoid_cross_entropy_map}.get(
        options["activation"], losses.softmax_cross_entropy_map
    )
    per_slice = options["ce"] * reductions.per_image(ce_map(logits, targets, valid=valid))
    overlap, total = losses.dice_sums(
        logits, targets, valid=valid * weight[:, None, None, None],
        activation=options["activation"], dice_background=options["dice_background"],
    )  # fmt: skip
    return {
        "loss": jnp.sum(weight * per_slice),
        "count": jnp.sum(weight),
        "dice_overlap": overlap,
        "dice_total": total,
    }


def validation_loss(totals: dict, loss: losses.LossSpec) -> float:
    """The validation loss from `eval_step` sums added over every batch of the fold: the
    weighted mean of the per-slice losses, plus for a batch-Dice loss its Dice weight times the
    Dice loss of the fold taken as one batch (the arm's own loss; a mean of per-image Dice with
    eps 1e-5 is ~1 on every lesion-free channel and does not fall with training). `totals`:
    host (NumPy) values, as `jax.device_get` returns them; they are finished on the host."""
    value = float(totals["loss"]) / max(float(totals["count"]), 1.0)
    options = losses.batch_dice_options(loss)
    if options is not None:
        dice = losses.dice_loss_from_sums(
            totals["dice_overlap"], totals["dice_total"], options["eps"]
        )
        value += options["dice"] * float(dice)
    return value


def eval_step(variables, batch, *, spec: RunSpec, shown: int = PANEL_SLICES):
    """`(sums, predicted classes of the first `shown` slices)` of one validation batch; see
    `make_eval_step`."""
    images = clip_inputs(batch["images"])
    weight = batch["weight"].astype(jnp.float32)
    logits = spec.model.apply(variables, images, train=False)
    targets, valid = _targets(batch["classes"], batch["grade_known"], spec.output_encoding)
    sums = _loss_sums(logits, targets, valid, weight, spec.loss)
    scores = encoding.scores_from_outputs(logits, spec.output_encoding, from_logits=True)
    predicted = predicted_classes(scores, spec.output_encoding)
    lesion = (batch["classes"] >= 1).astype(jnp.float32) * weight[:, None, None]
    background = (batch["classes"] == 0).astype(jnp.float32) * weight[:, None, None]
    sums["score_lesion"] = jnp.sum(scores[..., 0] * lesion)
    sums["score_background"] = jnp.sum(scores[..., 0] * background)
    sums["background"] = jnp.sum(background)
    for k in (1, 2):
        pred = (predicted >= k).astype(jnp.float32) * weight[:, None, None]
        true = (batch["classes"] >= k).astype(jnp.float32) * weight[:, None, None]
        sums[f"intersect_{k}"] = jnp.sum(pred * true)
        sums[f"predicted_{k}"] = jnp.sum(pred)
        sums[f"true_{k}"] = jnp.sum(true)
    return sums, predicted[:shown]


class EvalStep(NamedTuple):
    """`make_eval_step`'s jitted step, called as it, and the loss spec whose `validation_loss`
    finishes its sums."""

    fn: Callable
    loss: losses.LossSpec

    def __call__(self, variables, batch):
        return self.fn(variables, batch)


def make_eval_step(spec: RunSpec, mesh: Mesh, shown: int = PANEL_SLICES) -> EvalStep:
    """Jitted global-view `eval_step(variables, batch) -> (sums, predicted_classes)`.

    batch: `images`, `classes`, `grade_known` as in training plus `weight [B]` (0 on padding).
    Inputs are clipped to [0, 1], not augmented; BatchNorm uses running averages. `sums` holds
    weighted sums over the batch (the loss sums of `_loss_sums`, finished by `validation_loss`; per
    score k in (1, 2) (lesion, csPCa) the Dice terms `intersect_k`, `predicted_k`, `true_k` of
    the class map decoded by `encoding.ordinal_decode` (P(class >= k) > 0.5); P(class >= 1)
    summed over lesion pixels (`score_lesion`) and background pixels (`score_background`,
    `background`)); `predicted_classes [min(shown, B),H,W]` int32 is the decoded class map (0/1
    for a binary output) of the batch's first `shown` slices, those the validation image panel
    shows: only they are gathered from the devices. Outputs are replicated, so every process
    can read them.
    """
    bound = functools.partial(eval_step, spec=spec, shown=shown)
    return EvalStep(jax.jit(bound, out_shardings=NamedSharding(mesh, P())), spec.loss)
