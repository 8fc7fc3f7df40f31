"""The FocalNet loss and the per-device train step (pmap style under `jax.shard_map`).

Loss (paper eq. 4): `L = loss(f(x)) + lambda * MFL`, where `loss` is chosen by name
(`losses.get_loss`), so the same step trains FocalNet, every baseline and every ablation.

* One application on the full input, `train=True` with `mutable=['batch_stats']`: the only pass
  whose BatchNorm running averages are kept.
* MFL (`config.loss.mfl`): the component-subset inputs (`losses.subset_inputs`, the other
  components zeroed) go through the same network in one `jax.vmap`-ped application. These passes
  normalise with their own batch statistics (training mode, as every training-time application
  in the paper) but their running-average updates are discarded, so the running averages describe
  full inputs only, which is what evaluation sees. `mutual_finding_loss` stops the gradient into
  the full output, which serves as the reference (paper Fig. 3).
* MFL mode `select`: every subset is applied without gradients, each slice's argmin subset is
  picked, and only that input is recomputed with gradients. With `frozen` normalisation value and
  gradients equal the `vmap` mode (the min's gradient is the argmin's); with `batch`
  normalisation the recomputed batch mixes subsets, so its batch statistics differ.

For MFL the outputs are probabilities P(class >= k): sigmoid of ordinal/binary logits, the
softmax tail sums for one-hot outputs (with ordinal targets), so MFL also applies to one-hot
baselines.

Data parallelism: the step is written per device; gradients, loss terms and metrics are
`lax.pmean`-ed over `data` (equal per-device batches, so the mean of means is the global-batch
mean) and BatchNorm reduces its statistics over `data` (sync-BN), so N devices compute the same
update as one device with the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from focalnet_jax import augment, encoding, losses
from focalnet_jax.sharding import DATA_AXIS
from focalnet_jax.training.train_state import TrainState, learning_rate_schedule

MFL_MODES = ("vmap", "select")


def named_loss(loss_config: ml_collections.ConfigDict):
    """`(encoding, fn(logits, targets, *, valid))` for `loss_config.name`, with the config's values
    of the loss's hyperparameters bound (alpha, gamma, weights, Dice options)."""
    spec = losses.get_loss(loss_config.name)
    bound = {k: loss_config[k] for k in spec.hyperparameters if k in loss_config}
    spec = losses.get_loss(loss_config.name, **bound)
    return spec.encoding, spec.fn


def resolve_mfl_weight(value, positive_ratio: Callable[[], float]) -> float:
    """lambda: 'auto' -> 1 / positive_ratio() (paper eq. 4), else the number given."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        ratio = float(positive_ratio())
        if not ratio > 0:
            raise ValueError("loss.mfl_weight='auto': the training split has no positive bit")
        return 1.0 / ratio
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"loss.mfl_weight: expected 'auto' or a number, got {value!r}") from None


def _targets(classes, grade_known, enc: str):
    return encoding.encode(classes, enc), encoding.target_validity(grade_known, classes, enc)


def _mfl_probs(logits, enc: str):
    """P(class >= k) for MFL: sigmoid bits (ordinal/binary) or one-hot tail sums."""
    if enc == "onehot":
        return encoding.scores_from_outputs(logits, enc, from_logits=True)
    return jax.nn.sigmoid(logits)


def make_loss_fn(
    model: nn.Module,
    loss_config: ml_collections.ConfigDict,
    components: Sequence[str],
    *,
    mfl_weight: float | jax.Array = 0.0,
):
    """`loss_fn(params, batch_stats, images, classes, grade_known)`
    `-> (total, (terms, batch_stats))`.

    `mfl_weight`: lambda, a number or a traced float32 scalar.

    images `[B,H,W,C]` (already augmented and clipped), classes / grade_known `[B,H,W]`. `terms`:
    the named loss, `mfl`, `mfl_weight` and `mfl_subset_share [M]` (share of slices whose MFL
    chose each subset; empty without MFL). The returned batch_stats come from the full-input pass.
    """
    enc, fn = named_loss(loss_config)
    name = loss_config.name
    use_mfl = bool(loss_config.mfl)
    mode = loss_config.mfl_mode
    if mode not in MFL_MODES:
        raise ValueError(f"loss.mfl_mode: expected one of {MFL_MODES}, got {mode!r}")
    subsets = losses.component_subsets(tuple(components), loss_config.subsets) if use_mfl else []
    mfl_enc = "ordinal" if enc == "onehot" else enc

    def loss_fn(params, batch_stats, images, classes, grade_known):
        variables = {"params": params, "batch_stats": batch_stats}

        def apply(x, variables=variables):
            out, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
            return out, updates.get("batch_stats", batch_stats)

        targets, valid = _targets(classes, grade_known, enc)
        logits, new_batch_stats = apply(images)
        main = fn(logits, targets, valid=valid)
        terms = {name: main}
        total = main
        if use_mfl:
            mfl_targets, mfl_valid = _targets(classes, grade_known, mfl_enc)
            full_probs = _mfl_probs(logits, enc)
            sub_x = losses.subset_inputs(images, tuple(components), subsets)  # [M,B,H,W,C]
            if mode == "vmap":
                sub_logits = jax.vmap(lambda x: apply(x)[0])(sub_x)
                mfl, chosen = losses.mutual_finding_loss(
                    full_probs, _mfl_probs(sub_logits, enc), mfl_targets, valid=mfl_valid
                )
            else:
                frozen = jax.tree.map(lax.stop_gradient, variables)
                probe = jax.vmap(lambda x: apply(x, frozen)[0])(sub_x)
                _, chosen = losses.mutual_finding_loss(
                    full_probs, _mfl_probs(probe, enc), mfl_targets, valid=mfl_valid
                )
                picked = losses.mfl_select(sub_x, chosen)  # [B,H,W,C]
                sel_logits, _ = apply(picked)
                mfl, _ = losses.mutual_finding_loss(
                    full_probs, _mfl_probs(sel_logits, enc)[None], mfl_targets, valid=mfl_valid
                )
            total = total + mfl_weight * mfl
            terms["mfl"] = mfl
            terms["mfl_subset_share"] = jnp.mean(jax.nn.one_hot(chosen, len(subsets)), axis=0)
        terms["mfl_weight"] = jnp.asarray(mfl_weight if use_mfl else 0.0, jnp.float32)
        return total, (terms, new_batch_stats)

    return loss_fn


def make_train_step(
    model: nn.Module,
    config: ml_collections.ConfigDict,
    tx: optax.GradientTransformation,
    mesh: Mesh,
):
    """Jitted `train_step(state, batch, key, mfl_weight) -> (state, metrics)`, the state donated.

    batch: `images [B,H,W,C]` float32 (T2w unclipped), `classes [B,H,W]` int32, `grade_known
    [B,H,W]` uint8, `t2w_lower_ratio [B]` float32 (air / bladder), sharded over `data`; key: the
    run's base key; `mfl_weight`: lambda of eq. 4, a float32 scalar operand rather than a constant
    of the compiled step, so every fold (each with its own lambda) runs the same executable and a
    persistent compilation cache (`JAX_COMPILATION_CACHE_DIR`) serves folds and restarts.
    Per-slice augmentation keys are `fold_in(fold_in(key, step), global row)`, so results do not
    depend on the device count.
    Metrics (replicated scalars): `loss`, each term, `mfl_weight`, `lr`, `grad_norm`,
    `param_norm`, `mfl_subset_share [M]`.
    """
    components = tuple(config.data.components)
    schedule = learning_rate_schedule(config.optim)
    aug = config.augment
    augmenting = aug.shift or aug.scale or aug.flip or aug.intensity
    t2w_channel = components.index("t2w") if "t2w" in components else None

    def per_device_step(state: TrainState, batch, key, mfl_weight):
        images, classes, grade_known = batch["images"], batch["classes"], batch["grade_known"]
        local = images.shape[0]
        rows = lax.axis_index(DATA_AXIS) * local + jnp.arange(local)
        step_key = jax.random.fold_in(key, state.step)
        if augmenting:
            keys = jax.vmap(lambda r: jax.random.fold_in(step_key, r))(rows)
            images, classes, grade_known = augment.augment_batch(
                keys,
                images,
                classes,
                grade_known,
                aug,
                t2w_channel=t2w_channel,
                lower_ratio=batch["t2w_lower_ratio"],
            )
        else:
            images = augment.clip_inputs(images)
        # Differentiate with respect to a per-device ("varying") copy of the replicated params:
        # this device's gradient, as under pmap (for the replicated params themselves, shard_map's
        # autodiff would already sum over devices). Cross-device BatchNorm terms still arrive
        # through the transposed statistics collectives; the pmean then averages over devices.
        params = lax.pcast(state.params, DATA_AXIS, to="varying")
        loss_fn = make_loss_fn(model, config.loss, components, mfl_weight=mfl_weight)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (total, (terms, batch_stats)), grads = grad_fn(
            params, state.batch_stats, images, classes, grade_known
        )
        grads = lax.pmean(grads, DATA_AXIS)
        metrics = lax.pmean({"loss": total, **terms}, DATA_AXIS)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["lr"] = schedule(state.step)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["param_norm"] = optax.tree.norm(params)
        new_state = state.replace(
            step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
        )
        return new_state, metrics

    sharded = jax.shard_map(
        per_device_step,
        mesh=mesh,
        in_specs=(P(), P(DATA_AXIS), P(), P()),
        out_specs=(P(), P()),
    )
    return jax.jit(sharded, donate_argnums=0)


def make_eval_step(model: nn.Module, config: ml_collections.ConfigDict, mesh: Mesh):
    """Jitted global-view `eval_step(variables, batch) -> (sums, predicted_classes)`.

    batch: `images`, `classes`, `grade_known` as in training plus `weight [B]` (0 on padding).
    Inputs are clipped to [0, 1], not augmented; BatchNorm uses running averages. `sums` holds
    weighted sums over the batch (`loss`, `count`; per score k in (1, 2) (lesion, csPCa) the Dice
    terms `intersect_k`, `predicted_k`, `true_k` of the class map
    decoded by `encoding.ordinal_decode` (P(class >= k) > 0.5); P(class >= 1) summed over
    lesion pixels (`score_lesion`) and background pixels (`score_background`, `background`));
    `predicted_classes [B,H,W]` int32 is the decoded class map (0/1 for a binary output). Outputs
    are replicated, so every process can read them.
    """
    enc, fn = named_loss(config.loss)

    def eval_step(variables, batch):
        images = augment.clip_inputs(batch["images"])
        weight = batch["weight"].astype(jnp.float32)
        logits = model.apply(variables, images, train=False)
        targets, valid = _targets(batch["classes"], batch["grade_known"], enc)
        per_slice = jax.vmap(lambda lg, t, v: fn(lg[None], t[None], valid=v[None]))(
            logits, targets, valid
        )
        scores = encoding.scores_from_outputs(logits, enc, from_logits=True)
        # A binary output repeats P(lesion) in all five columns: decode its first column only.
        predicted = encoding.ordinal_decode(scores[..., :1] if enc == "binary" else scores)
        sums = {"loss": jnp.sum(weight * per_slice), "count": jnp.sum(weight)}
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
        return sums, predicted

    return jax.jit(eval_step, out_shardings=NamedSharding(mesh, P()))
