"""The FocalNet loss and train step (focalnet_jax/training/step.py), built from a `RunSpec`.

Gradient structure (frozen normalisation, so every application is the same function of the
parameters): total gradient = FL gradient + lambda * MFL gradient computed separately with the full
output as a constant, and MFL sends no gradient into the full-input output; `vmap` and `select`
MFL modes agree. All of it in one compiled function.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_train_helpers import COMPONENTS, FakeStore, tiny_config

from focalnet_jax import encoding, losses
from focalnet_jax.errors import UserError
from focalnet_jax.run import RunSpec
from focalnet_jax.training import loop, sharding, train_state
from focalnet_jax.training import step as step_lib

LAMBDA = 1000.0


def _batch(seed=0, size=32, batch=4):
    rng = np.random.default_rng(seed)
    images = rng.uniform(0.0, 1.0, (batch, size, size, 2)).astype(np.float32)
    classes = np.zeros((batch, size, size), np.int32)
    for b in range(batch):
        r, c = rng.integers(2, size - 10, 2)
        classes[b, r : r + 8, c : c + 8] = 1 + b % 5
    grade_known = np.ones_like(classes, np.uint8)
    return jnp.asarray(images), jnp.asarray(classes), jnp.asarray(grade_known)


@pytest.fixture(scope="module")
def gradients():
    config = tiny_config(overrides=["--config.model.norm=frozen"])
    model = RunSpec.from_config(config).model
    variables = train_state.init_variables(model, jax.random.key(0), (1, 32, 32, 2))
    # Non-trivial running statistics, so the frozen norm is not the identity.
    variables["batch_stats"] = jax.tree.map(
        lambda x: x + 0.1 * jax.random.uniform(jax.random.key(1), x.shape), variables["batch_stats"]
    )
    images, classes, grade_known = _batch()
    subsets = losses.component_subsets(COMPONENTS)

    def loss_with(mode=None):
        run_config = config.copy_and_resolve_references()
        run_config.loss.mfl = mode is not None
        run_config.loss.mfl_mode = mode or "vmap"
        spec = RunSpec.from_config(run_config)
        return functools.partial(step_lib.loss_fn, mfl_weight=LAMBDA, spec=spec)

    def apply(params, x):
        return model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x)

    def mfl_separately(params, images, classes):
        # The full output as a constant from a separate pass; only the subset passes depend on
        # params.
        full = jax.nn.sigmoid(jax.lax.stop_gradient(apply(params, images)))
        sub_x = losses.subset_inputs(images, COMPONENTS, subsets)
        sub = jax.nn.sigmoid(jax.vmap(lambda x: apply(params, x))(sub_x))
        return losses.mutual_finding_loss(full, sub, encoding.encode(classes, "ordinal"))[0]

    def mfl_of_full_logits(full_logits, params, images, classes):
        sub_x = losses.subset_inputs(images, COMPONENTS, subsets)
        sub = jax.nn.sigmoid(jax.vmap(lambda x: apply(params, x))(sub_x))
        full = jax.nn.sigmoid(full_logits)
        return losses.mutual_finding_loss(full, sub, encoding.encode(classes, "ordinal"))[0]

    @jax.jit
    def everything(params, images, classes, grade_known):
        bs = variables["batch_stats"]
        out = {}
        for name, mode in (("vmap", "vmap"), ("select", "select"), ("fl", None)):
            (value, (terms, _)), grads = jax.value_and_grad(loss_with(mode), has_aux=True)(
                params, bs, images, classes, grade_known
            )
            out[name] = (value, terms, grads)
        out["mfl"] = jax.value_and_grad(mfl_separately)(params, images, classes)
        full_logits = apply(params, images)
        out["d_mfl_d_full"] = jax.grad(mfl_of_full_logits)(full_logits, params, images, classes)
        return out

    return everything(variables["params"], images, classes, grade_known)


def _assert_trees_close(a, b, rtol=2e-4, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_focalnet_gradient_is_fl_plus_lambda_times_mfl(gradients):
    total, terms, grads = gradients["vmap"]
    fl_value, _, fl_grads = gradients["fl"]
    mfl_value, mfl_grads = gradients["mfl"]
    assert float(mfl_value) > 0  # the subsets disagree with the full output on lesions
    np.testing.assert_allclose(terms["mfl"], mfl_value, rtol=1e-5)
    np.testing.assert_allclose(total, fl_value + LAMBDA * mfl_value, rtol=1e-5)
    expected = jax.tree.map(lambda f, m: f + LAMBDA * m, fl_grads, mfl_grads)
    _assert_trees_close(grads, expected)
    # The MFL part itself (total - FL) matches lambda * MFL gradient to 0.1 % of its norm.
    mfl_part = jax.tree.map(lambda g, f: g - f, grads, fl_grads)
    scaled = jax.tree.map(lambda m: LAMBDA * m, mfl_grads)
    error = optax.tree.norm(jax.tree.map(jnp.subtract, mfl_part, scaled))
    assert float(optax.tree.norm(scaled)) > 1e-3
    assert float(error) < 1e-3 * float(optax.tree.norm(scaled))


def test_no_gradient_reaches_the_full_output_through_mfl(gradients):
    assert float(jnp.max(jnp.abs(gradients["d_mfl_d_full"]))) == 0.0


def test_select_mode_matches_vmap_mode(gradients):
    v_total, v_terms, v_grads = gradients["vmap"]
    s_total, s_terms, s_grads = gradients["select"]
    np.testing.assert_allclose(s_total, v_total, rtol=1e-5)
    np.testing.assert_array_equal(s_terms["mfl_subset_share"], v_terms["mfl_subset_share"])
    np.testing.assert_allclose(np.sum(v_terms["mfl_subset_share"]), 1.0)
    _assert_trees_close(s_grads, v_grads)


def test_optimizer_is_sgd_momentum_with_l2_and_staircase_decay():
    spec = RunSpec.from_config(tiny_config())
    schedule = spec.schedule
    assert [float(schedule(s)) for s in (0, 1999, 2000, 4000)] == pytest.approx(
        [1e-3, 1e-3, 7e-4, 4.9e-4]
    )
    tx = spec.tx
    params = {"w": jnp.array([2.0, -1.0])}
    grads = {"w": jnp.array([0.5, 0.25])}
    state = tx.init(params)
    u1, state = tx.update(grads, state, params)
    # L2: g + 1e-4 w, then momentum 0.9 (first step: the trace is the gradient), lr 1e-3.
    g1 = np.array([0.5 + 2e-4, 0.25 - 1e-4])
    np.testing.assert_allclose(u1["w"], -1e-3 * g1, rtol=1e-6)
    u2, _ = tx.update(grads, state, params)
    np.testing.assert_allclose(u2["w"], -1e-3 * (g1 + 0.9 * g1), rtol=1e-6)


@pytest.mark.parametrize("decay_on", ["all", "kernels"])
def test_weight_decay_covers_every_parameter_or_the_kernels_alone(decay_on):
    """With a zero loss gradient the first update is -lr * weight_decay * w on each decayed
    parameter and 0 on the others: "kernels" leaves BatchNorm scales and offsets and the
    classifier's bias alone (TensorFlow DeepLab's regulariser), "all" decays them too."""
    spec = RunSpec.from_config(
        tiny_config(overrides=[f"--config.optim.weight_decay_on={decay_on}"])
    )
    params = spec.model.init(jax.random.key(0), jnp.zeros(spec.input_shape), train=False)["params"]
    updates, _ = spec.tx.update(jax.tree.map(jnp.zeros_like, params), spec.tx.init(params), params)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    names = {jax.tree_util.keystr(path): path[-1].key for path, _ in leaves}
    assert {"kernel", "scale", "bias"} <= set(names.values())  # convolutions, BatchNorm, biases
    for (path, weight), update in zip(leaves, jax.tree.leaves(updates), strict=True):
        decayed = decay_on == "all" or path[-1].key == "kernel"
        expected = -1e-3 * 1e-4 * np.asarray(weight) if decayed else np.zeros_like(weight)
        np.testing.assert_allclose(update, expected, rtol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_an_unknown_weight_decay_on_is_refused():
    with pytest.raises(ValueError, match=r"^optim\.weight_decay_on: expected one of \('all', "):
        RunSpec.from_config(tiny_config(overrides=["--config.optim.weight_decay_on=bn"]))


def test_mfl_weight_auto_and_number():
    assert losses.parse_mfl_weight("auto") is None
    assert losses.parse_mfl_weight("130") == 130.0
    assert losses.parse_mfl_weight(2.5) == 2.5
    with pytest.raises(ValueError, match="mfl_weight"):
        losses.parse_mfl_weight("big")
    store = FakeStore()
    spec = RunSpec.from_config(tiny_config())  # loss.mfl_weight = 'auto'
    rows = spec.fold_split(store).train_rows
    classes, known = np.asarray(store.classes[rows]), np.asarray(store.grade_known[rows])
    ratio = losses.positive_bit_ratio(classes, grade_known=known)
    assert spec.mfl_weight(store, rows) == pytest.approx(1 / ratio)
    fixed = RunSpec.from_config(tiny_config(overrides=["--config.loss.mfl_weight=130"]))
    assert fixed.mfl_weight(store, rows) == 130.0
    # No lesion in the training slices: a one-line user error naming the setting and the fold.
    with pytest.raises(UserError, match="loss.mfl_weight='auto': the 5 training slices of data"):
        spec.mfl_weight(store, np.flatnonzero(~store.annotated))


def test_batch_not_divisible_by_devices_is_an_error():
    mesh = jax.make_mesh((1,), ("data",))
    assert sharding.per_device_batch(3, mesh) == 3
    with pytest.raises(ValueError, match="train.batch_size=0"):
        sharding.per_device_batch(0, mesh)


def test_one_compiled_step_serves_every_mfl_weight():
    """lambda is an operand of the train step, not a constant of it: two folds' lambdas run one
    executable (so a persistent compilation cache serves every fold), and each step's loss is
    FL + lambda * MFL with its own lambda."""
    spec = RunSpec.from_config(tiny_config(), image_size=(32, 32))
    mesh = sharding.make_mesh()
    step = step_lib.make_train_step(spec, mesh)
    images, classes, grade_known = _batch()
    batch = jax.device_put(
        {
            "images": images,
            "classes": classes,
            "grade_known": grade_known,
            "t2w_lower_ratio": jnp.zeros(images.shape[0], jnp.float32),
        },
        sharding.batch_sharding(mesh),
    )
    key = jax.random.key(0)
    for lam in (10.0, 250.0):
        state = train_state.create_train_state(spec, key, mesh)
        _, metrics = step(state, batch, key, jnp.float32(lam))
        assert float(metrics["mfl_weight"]) == lam
        assert float(metrics["mfl"]) > 0
        np.testing.assert_allclose(
            metrics["loss"], metrics["ordinal_focal"] + lam * metrics["mfl"], rtol=1e-5
        )
    assert step._cache_size() == 1


class _FixedLogits(flax.linen.Module):
    """Logits `x[..., 0] - t_k` (no parameters): a pixel of value t_k has P(class >= k) = 0.5
    exactly (tanh-form sigmoid of 0)."""

    thresholds: tuple[float, ...]

    def __call__(self, x, train: bool = False):
        return x[..., :1] - jnp.asarray(self.thresholds, jnp.float32)


@pytest.mark.parametrize(
    ("loss", "thresholds", "expected"),
    [
        # pixel values 0.05, 0.3 (bit 2 exactly 0.5), 0.5 (bit 3 exactly 0.5), 0.95
        ("sigmoid_ce", (0.1, 0.3, 0.5, 0.7, 0.9), [0, 1, 2, 5]),
        # binary: P(lesion) = 0.5 exactly at 0.3 -> background, as ordinal_decode says
        ("binary_ce", (0.3,), [0, 0, 1, 1]),
    ],
)
def test_eval_step_decodes_classes_as_ordinal_decode(loss, thresholds, expected):
    """The validation step's class map is `encoding.ordinal_decode` (a bit is on where
    P > 0.5, not >= 0.5), for ordinal and binary outputs."""
    config = tiny_config(overrides=[f"--config.loss.name={loss}", "--config.loss.mfl=false"])
    mesh = sharding.make_mesh()
    spec = dataclasses.replace(RunSpec.from_config(config), model=_FixedLogits(thresholds))
    eval_step = step_lib.make_eval_step(spec, mesh)
    values = np.array([0.05, 0.3, 0.5, 0.95], np.float32)
    images = np.broadcast_to(values[:, None, None, None], (4, 8, 8, 2)).copy()
    batch = {
        "images": jnp.asarray(images),
        "classes": jnp.zeros((4, 8, 8), jnp.int32),
        "grade_known": jnp.ones((4, 8, 8), jnp.uint8),
        "weight": jnp.ones(4, jnp.float32),
    }
    _, predicted = eval_step({}, jax.device_put(batch, sharding.batch_sharding(mesh)))
    np.testing.assert_array_equal(np.asarray(predicted)[:, 0, 0], expected)
    assert (np.asarray(predicted) == np.asarray(expected)[:, None, None]).all()


class _ClassLogits(flax.linen.Module):
    """Logits `40 (x[..., 0] - 0.2 k)`, k = 1..5: an image of value 0.2 c + 0.1 predicts class c
    with every bit at P > 0.98 or < 0.02 (a near-perfect model)."""

    def __call__(self, x, train: bool = False):
        return 40.0 * (x[..., :1] - 0.2 * jnp.arange(1, 6, dtype=jnp.float32))


def test_validation_loss_of_a_batch_dice_arm_is_its_loss_on_the_fold_as_one_batch():
    """ce_dice with batch Dice (eps 1e-5, Bosma22's arm): val/loss is CE + the Dice of the whole
    validation fold, i.e. the arm's training loss on the fold taken as one batch, over two eval
    batches with a padded slice (weight 0). It logged the mean of per-image Dice before, which is
    ~1 on every lesion-free channel whose summed P(bit) is not below eps, however good the model:
    here 0.39 for a near-perfect model whose loss is 0.27."""
    overrides = ["--config.loss.name=ce_dice", "--config.loss.mfl=false",
                 "--config.loss.batch_dice=true", "--config.loss.eps=1e-5"]  # fmt: skip
    mesh = sharding.make_mesh()
    spec = RunSpec.from_config(tiny_config(overrides=overrides))
    spec = dataclasses.replace(spec, model=_ClassLogits())
    eval_step = step_lib.make_eval_step(spec, mesh)
    classes = np.zeros((8, 8, 8), np.int32)
    classes[1, 2:5, 2:5], classes[4, 4:7, 1:3], classes[7, :4, :4] = 2, 4, 5  # slice 7: padding
    images = np.repeat((0.2 * classes + 0.1)[..., None], 2, axis=-1).astype(np.float32)
    weight = np.array([1, 1, 1, 1, 1, 1, 1, 0], np.float32)
    totals = None
    for rows in (slice(0, 4), slice(4, 8)):
        batch = {
            "images": jnp.asarray(images[rows]),
            "classes": jnp.asarray(classes[rows]),
            "grade_known": jnp.ones((4, 8, 8), jnp.uint8),
            "weight": jnp.asarray(weight[rows]),
        }
        sums, _ = eval_step({}, jax.device_put(batch, sharding.batch_sharding(mesh)))
        sums = jax.device_get(sums)
        totals = sums if totals is None else {k: totals[k] + sums[k] for k in totals}
    logits = np.asarray(_ClassLogits().apply({}, jnp.asarray(images[:7])))
    targets = encoding.ordinal_encode(classes[:7])
    expected = losses.ce_dice_loss(logits, targets, eps=1e-5, batch_dice=True)
    np.testing.assert_allclose(step_lib.validation_loss(totals, eval_step.loss), expected, 1e-5)
    per_image = losses.ce_dice_loss(logits, targets, eps=1e-5)  # what was logged before
    assert per_image - expected > 0.1
    # A per-pixel loss keeps the weighted mean of its per-slice losses.
    plain = step_lib.make_eval_step(
        dataclasses.replace(spec, loss=losses.get_loss("sigmoid_ce")), mesh
    )
    batch = {"images": jnp.asarray(images[:4]), "classes": jnp.asarray(classes[:4]),
             "grade_known": jnp.ones((4, 8, 8), jnp.uint8), "weight": jnp.ones(4)}  # fmt: skip
    sums, _ = plain({}, jax.device_put(batch, sharding.batch_sharding(mesh)))
    np.testing.assert_allclose(
        step_lib.validation_loss(jax.device_get(sums), plain.loss),
        losses.sigmoid_cross_entropy(logits[:4], targets[:4]),
        rtol=1e-5,
    )


def test_eval_step_returns_only_the_panels_class_maps_and_sums_over_the_whole_batch():
    """A batch of 8 slices (the last padding, weight 0) through a near-perfect model: the step
    hands back the class maps of the first `PANEL_SLICES` = 4 slices only (the validation panel's,
    the rest is not gathered from the devices), while its Dice sums count every weighted slice:
    9 pixels of class 2 (slice 1) and 6 of class 4 (slice 4); the 16 of slice 7 are padding."""
    config = tiny_config(overrides=["--config.loss.name=sigmoid_ce", "--config.loss.mfl=false"])
    mesh = sharding.make_mesh()
    spec = dataclasses.replace(RunSpec.from_config(config), model=_ClassLogits())
    classes = np.zeros((8, 8, 8), np.int32)
    classes[1, 2:5, 2:5], classes[4, 4:7, 1:3], classes[7, :4, :4] = 2, 4, 5
    batch = {
        "images": jnp.asarray(np.repeat((0.2 * classes + 0.1)[..., None], 2, axis=-1)),
        "classes": jnp.asarray(classes),
        "grade_known": jnp.ones((8, 8, 8), jnp.uint8),
        "weight": jnp.asarray([1, 1, 1, 1, 1, 1, 1, 0], jnp.float32),
    }
    eval_step = step_lib.make_eval_step(spec, mesh)
    sums, predicted = eval_step({}, jax.device_put(batch, sharding.batch_sharding(mesh)))
    assert step_lib.PANEL_SLICES == 4 and predicted.shape == (4, 8, 8)
    np.testing.assert_array_equal(np.asarray(predicted), classes[:4])
    sums = jax.device_get(sums)
    for k in (1, 2):
        assert (sums[f"intersect_{k}"], sums[f"predicted_{k}"], sums[f"true_{k}"]) == (15, 15, 15)
    assert sums["background"] == 7 * 64 - 15


def _totals(**given):
    sums = dict.fromkeys(("loss", "count", "score_lesion", "score_background", "background"), 0.0)
    sums |= {f"{t}_{k}": 0.0 for t in ("intersect", "predicted", "true") for k in (1, 2)}
    return sums | given


def test_validation_metrics_from_hand_counted_sums():
    """Dice 2|A & B| / (|A| + |B|) per score, mean scores per pixel kind; a binary output has no
    csPCa Dice (it predicts no grade: its csPCa Dice read 0 at every step), and a fold without
    lesion pixels has no mean lesion score (it read 0)."""
    ordinal = step_lib.EvalStep(None, losses.get_loss("ordinal_focal"))
    totals = _totals(loss=6.0, count=4.0, intersect_1=3.0, predicted_1=4.0, true_1=6.0,
                     intersect_2=1.0, predicted_2=1.0, true_2=3.0, score_lesion=1.5,
                     score_background=2.0, background=40.0)  # fmt: skip
    metrics = loop.validation_metrics(totals, ordinal)
    assert metrics == pytest.approx({"val/loss": 1.5, "val/dice_lesion": 0.6,
                                     "val/dice_cspca": 0.5, "val/mean_score_lesion": 0.25,
                                     "val/mean_score_background": 0.05})  # fmt: skip

    binary = step_lib.EvalStep(None, losses.get_loss("binary_ce"))
    assert "val/dice_cspca" not in loop.validation_metrics(totals, binary)

    no_lesion = loop.validation_metrics(_totals(count=1.0, background=10.0), ordinal)
    assert np.isnan(no_lesion["val/mean_score_lesion"])
    assert no_lesion["val/dice_lesion"] == 1.0  # nothing true, nothing predicted
    assert no_lesion["val/mean_score_background"] == 0.0


@pytest.mark.parametrize(
    ("name", "parts"),
    [("ce_dice", {"ce": "sigmoid_ce", "dice": "soft_dice"}),
     ("ce_focal", {"ce": "sigmoid_ce", "focal": "focal"})],
)  # fmt: skip
def test_a_loss_of_two_terms_logs_each_weighted_term(name, parts):
    """SPEC: TensorBoard shows every loss term. A combined loss logged its total alone, so a CE +
    Dice arm could not tell which term it trained down. Each weighted term is logged beside it
    (`train/<name>/<term>`), equal to that loss alone times its weight, the two summing to it."""
    overrides = [f"--config.loss.name={name}", "--config.loss.mfl=false",
                 "--config.loss.weights=(0.25, 2.0)"]  # fmt: skip
    spec = dataclasses.replace(
        RunSpec.from_config(tiny_config(overrides=overrides)), model=_ClassLogits()
    )
    classes = np.zeros((4, 8, 8), np.int32)
    classes[1, 2:5, 2:5], classes[3, 4:7, 1:3] = 2, 4
    noisy = 0.2 * classes + 0.1 + np.random.default_rng(0).normal(0, 0.08, classes.shape)
    images = jnp.asarray(np.repeat(noisy[..., None], 2, axis=-1), jnp.float32)  # some errors
    grade_known = jnp.ones((4, 8, 8), jnp.uint8)
    total, (terms, _) = step_lib.loss_fn({}, {}, images, classes, grade_known, 0.0, spec=spec)
    assert set(terms) == {name, *(f"{name}/{part}" for part in parts), "mfl_weight"}
    logits = _ClassLogits().apply({}, images)
    targets = encoding.ordinal_encode(classes)
    for weight, (part, alone) in zip((0.25, 2.0), parts.items(), strict=True):
        expected = weight * losses.get_loss(alone).fn(logits, targets)
        np.testing.assert_allclose(terms[f"{name}/{part}"], expected, rtol=1e-6)
    np.testing.assert_allclose(sum(terms[f"{name}/{p}"] for p in parts), total, rtol=1e-6)
    assert float(total) == float(terms[name])
    assert min(float(terms[f"{name}/{p}"]) for p in parts) > 1e-3  # neither term vanishes
