"""The run layer (focalnet_jax/run.py): `RunSpec.from_config` rejects every invalid config with a
message that starts with the offending key, before anything is compiled, and resolves each field
of a valid one."""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_train_helpers import REPO, FakeStore, tiny_config

from focalnet_jax import cli, losses
from focalnet_jax.errors import UserError
from focalnet_jax.models.deeplab import DeepLab
from focalnet_jax.models.unet import UNet
from focalnet_jax.run import DATA_AXIS, RunSpec
from focalnet_jax.training.run_start import unused_settings

INVALID = [
    (["--config.loss.mfl_mode=scan"], r"^loss\.mfl_mode: expected one of \('vmap', 'select'\)"),
    (["--config.loss.name=hinge", "--config.loss.mfl=False"], r"^loss\.name: unknown loss 'hinge'"),
    (["--config.loss.subsets=[['t2w', 'hbv']]"], r"^loss\.subsets\[0\]: unknown component"),
    (
        ["--config.loss.subsets=[['t2w', 'adc']]"],
        r"^loss\.subsets\[0\]: expected a non-empty proper",
    ),
    (["--config.loss.subsets=[['adc'], ['adc']]"], r"^loss\.subsets\[1\]: .* listed twice"),
    # One component trains (test_a_single_component_trains_without_mfl); MFL needs two.
    (["--config.data.components=t2w"], r"^data\.components=\('t2w',\): MFL \(loss\.mfl=True\)"),
    (["--config.loss.mfl_weight=lots"], r"^loss\.mfl_weight: expected 'auto' or a number"),
    # The MFL settings are checked with MFL off too: they failed once loss.mfl was set True.
    (
        ["--config.loss.mfl=False", "--config.loss.subsets=[['t2w', 'hbv']]"],
        r"^loss\.subsets\[0\]: unknown component",
    ),
    (
        ["--config.loss.mfl=False", "--config.loss.mfl_weight=-1.0"],
        r"^loss\.mfl_weight: expected a finite number >= 0, got '-1.0'",
    ),
    (["--config.loss.mfl=False", "--config.loss.mfl_chunk=-1"], r"^loss\.mfl_chunk: expected"),
    (
        [
            "--config.loss.mfl=False",
            "--config.data.components=t2w",
            "--config.loss.subsets=[['t2w']]",
        ],
        r"^loss\.subsets=\[\['t2w'\]\]: data\.components=\('t2w',\) has no proper subset",
    ),
    (["--config.loss.alpha=1.5"], r"^loss\.alpha: expected a value in \[0.0, 1.0\]"),
    (["--config.loss.gamma=-1.0"], r"^loss\.gamma: expected a value in >= 0.0"),
    # Accepted, gamma = inf trained with loss 0 and NaN gradients; eps = inf made Dice NaN.
    (["--config.loss.gamma=inf"], r"^loss\.gamma: expected a finite value, got inf"),
    (
        ["--config.loss.name=soft_dice", "--config.loss.mfl=False", "--config.loss.eps=inf"],
        r"^loss\.eps: expected a finite value, got inf",
    ),
    (
        [
            "--config.loss.name=ce_focal",
            "--config.loss.mfl=False",
            "--config.loss.weights=(inf,1.0)",
        ],
        r"^loss\.weights: expected two finite non-negative numbers",
    ),
    (["--config.optim.lr=inf"], r"^optim\.lr: expected a finite value, got inf"),
    (["--config.data.fold=5"], r"^data\.fold=5 not in \[0, data\.num_folds=5\)"),
    (["--config.data.slices=some"], r"^data\.slices: expected one of"),
    (["--config.data.components=t2w,t2w"], r"^data\.components: expected distinct"),
    (["--config.model.name=vit"], r"^model\.name: expected one of"),
    (["--config.train.batch_size=0"], r"^train\.batch_size=0: must be positive$"),
    (["--config.train.steps=0", "--config.train.epochs=0"], r"^train\.steps and train\.epochs"),
    # A negative count read as 0 (= use the other one): 200 epochs instead of failing.
    (["--config.train.steps=-5"], r"^train\.steps: expected an int >= 0 \(0 = use train\.epochs\)"),
    (["--config.train.epochs=-1"], r"^train\.epochs: expected an int >= 0 \(0 = use train\.steps"),
    (["--config.train.log_every=0"], r"^train\.log_every: expected a positive int"),
    # 0 kept: Orbax deleted each checkpoint once written (no resume, nothing to evaluate).
    (["--config.train.keep_checkpoints=0"], r"^train\.keep_checkpoints: expected a positive"),
    (["--config.train.prefetch=-1"], r"^train\.prefetch: expected a positive int"),
    (["--config.train.eval_every=-5"], r"^train\.eval_every: expected an int >= 0"),
    (["--config.optim.decay_steps=0"], r"^optim\.decay_steps: expected a positive int"),
    # Flipped the sign of the learning rate every decay_steps (gradient ascent), silently.
    (["--config.optim.decay_rate=-0.7"], r"^optim\.decay_rate: expected a number in \(0, 1\]"),
    # numpy's default_rng((seed, epoch)) refused it in the prefetch thread, with a traceback.
    (["--config.seed=-1"], r"^seed: expected an int in \[0, 2\*\*63\)"),
    # jax.random.uniform(minval > maxval) is minval every time: one fixed zoom or shift.
    (["--config.augment.scale_range=(1.1, 0.9)"], r"^augment\.scale_range: expected finite \(low"),
    # An infinite zoom or T2w divisor: every slice a blank input, the loss finite.
    (["--config.augment.scale_range=(0.9, 1e999)"], r"^augment\.scale_range: .* \(0\.9, inf\)$"),
    (["--config.augment.intensity_range=(-0.15, 1e999)"], r"^augment\.intensity_range: expected"),
    (["--config.augment.max_shift=-0.1"], r"^augment\.max_shift: expected a value in \[0.0, 1.0\]"),
    # None for a pair: a bare `object of type 'NoneType' has no len()` naming no key.
    (["--config.augment.scale_range=None"], r"^augment\.scale_range: expected .* got None$"),
    (["--config.augment.intensity_range=None"], r"^augment\.intensity_range: expected .* None$"),
    # An entry of loss.subsets that is no list of names: `loss.'NoneType' object is not iterable`.
    (
        ["--config.loss.subsets=[('t2w',), None]"],
        r"^loss\.subsets\[1\]: expected a sequence of names, got None$",
    ),
    (["--config.loss.subsets=3"], r"^loss\.subsets: expected a non-empty list of subsets, got 3$"),
    # u <= -1 moves the upper T2w threshold to <= 0: a divisor <= 0, T2w clipped to 0.
    (["--config.augment.intensity_range=(-1.5, 0.2)"], r"^augment\.intensity_range: expected"),
    # Options the loss checks when traced: a traceback once the train step compiled.
    (
        ["--config.loss.name=ce_dice", "--config.loss.mfl=False", "--config.loss.eps=0.0"],
        r"^loss\.eps: expected a value in >= 1e-12, got 0.0",
    ),
    (
        ["--config.loss.name=ce_focal", "--config.loss.mfl=False", "--config.loss.weights=(1.0,)"],
        r"^loss\.weights: expected two finite non-negative numbers",
    ),
    (  # loss 0 and gradient 0 everywhere: an arm that trains nothing
        ["--config.loss.name=ce_focal", "--config.loss.mfl=False", "--config.loss.weights=(0,0)"],
        r"^loss\.weights: at least one term must weigh more than 0, got \(0, 0\)",
    ),
    (
        [
            "--config.loss.name=soft_dice",
            "--config.loss.mfl=False",
            "--config.loss.dice_background=False",
        ],
        r"^loss\.dice_background=False: only a softmax output has a background channel",
    ),
]


def test_a_single_component_trains_without_mfl():
    spec = RunSpec.from_config(
        tiny_config(overrides=["--config.data.components=t2w", "--config.loss.mfl=False"])
    )
    assert spec.components == ("t2w",) and spec.subsets == () and not spec.mfl


def test_valid_mfl_settings_with_mfl_off_leave_the_run_without_mfl():
    config = tiny_config(
        overrides=[
            "--config.loss.mfl=False",
            "--config.loss.subsets=[['adc']]",
            "--config.loss.mfl_weight=2.5",
            "--config.loss.mfl_chunk=1",
        ]
    )
    spec = RunSpec.from_config(config)
    assert not spec.mfl and spec.subsets == () and spec.mfl_weight_setting is None
    assert spec.mfl_weight(None, None) == 0.0
    # config.json records them, so the run read as an MFL run: training names them unused.
    assert unused_settings(config, spec) == [
        "loss.mfl_weight=2.5, loss.subsets=[['adc']] unused: loss.mfl is False (no MFL in this run)"
    ]
    plain = tiny_config(overrides=["--config.loss.mfl=False"])
    assert unused_settings(plain, RunSpec.from_config(plain)) == []


def test_the_t2w_intensity_augmentation_without_a_t2w_is_named_unused():
    """`ablation_augment.py:augment=advanced` and `basic` on components without T2w trained the
    same run, each recorded with its own augmentation."""
    components = "--config.data.components=adc,hbv"
    for arm, unused in (("advanced", True), ("basic", False)):
        config = tiny_config(f"configs/ablation_augment.py:augment={arm}", [components])
        assert unused_settings(config, RunSpec.from_config(config)) == unused * [
            "augment.intensity unused: data.components=('adc', 'hbv') has no t2w (the intensity "
            "augmentation scales the T2w only)"
        ]


@pytest.mark.parametrize(("overrides", "message"), INVALID)
def test_invalid_config_names_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        RunSpec.from_config(tiny_config(overrides=overrides))


def test_a_loss_option_the_loss_does_not_take_is_refused_in_a_config_made_in_python():
    """`load_config` refused it; a config built in Python (a notebook, `train_and_evaluate`)
    trained plain CE while its `alpha` was believed applied."""
    config = tiny_config(overrides=["--config.loss.name=sigmoid_ce", "--config.loss.mfl=False"])
    config.loss.alpha = 0.25
    with pytest.raises(ValueError, match=r"^loss\.alpha=0\.25: loss 'sigmoid_ce' does not take"):
        RunSpec.from_config(config)


@pytest.mark.parametrize(
    "key", ["optim.lr", "optim.momentum", "optim.weight_decay", "augment.max_shift", "loss.alpha",
            "loss.gamma"],
)  # fmt: skip
def test_a_hyperparameter_of_none_is_refused(key):
    """Set so in a config file (ml_collections takes None for any field; an override of None is
    refused when parsed): None as the momentum trained plain SGD without a word, as the learning
    rate failed inside optax's schedule."""
    config = tiny_config()
    section, name = key.split(".")
    config[section][name] = None
    with pytest.raises(ValueError, match=f"^{re.escape(key)}: expected a number, got None$"):
        RunSpec.from_config(config)


@pytest.mark.parametrize("key", ["pool_size", "weights", "eps", "batch_dice"])
def test_a_loss_option_of_none_is_refused(key):
    """The loss binds only the options that are not None: `loss.pool_size = None` in a config
    file trained with pooling 3 while config.json said null; `--config.loss.weights=None`
    ended in a TypeError traceback."""
    config = tiny_config(overrides=["--config.loss.name=ce_dice", "--config.loss.mfl=False"])
    config.loss[key] = None
    with pytest.raises(ValueError, match=f"^loss\\.{key}: expected a value, got None"):
        RunSpec.from_config(config)


def test_a_loss_option_of_none_is_refused_as_an_override():
    with pytest.raises(ValueError, match=r"^loss\.weights: expected a value, got None"):
        tiny_config(overrides=["--config.loss.weights=None"])


def test_a_bool_fold_is_refused():
    """True is an int in Python: a config file that set `data.fold = True` (a bare `:fold` did)
    trained fold 1."""
    config = tiny_config()
    config.data.fold = True
    with pytest.raises(UserError, match=r"^data\.fold=True not in \[0, data\.num_folds=5\)"):
        RunSpec.from_config(config, num_devices=1)


@pytest.mark.parametrize(
    ("key", "message"),
    [
        # The learning rate cut x0.7 at every step instead of every 2000.
        ("optim.decay_steps", r"^optim\.decay_steps: expected a positive int, got True$"),
        ("model.unet_features", r"^model\.unet_features: expected a positive int, got True$"),
        ("model.unet_levels", r"^model\.unet_levels: expected a positive int, got True$"),
    ],
)
def test_a_bool_count_is_refused(key, message):
    """True is an int in Python: set in a config file, it was taken as 1."""
    config = tiny_config("configs/unet_sing.py" if "unet" in key else "configs/focalnet.py")
    section, name = key.split(".")
    config[section][name] = True
    with pytest.raises(ValueError, match=message):
        RunSpec.from_config(config, num_devices=1)


@pytest.mark.parametrize("switch", ["shift", "scale", "flip", "intensity"])
def test_an_augmentation_switch_of_none_is_refused(switch):
    """`config.augment.flip = None` in a config file trained without that augmentation."""
    config = tiny_config()
    config.augment[switch] = None
    with pytest.raises(UserError, match=rf"^augment\.{switch}: expected true or false, got None$"):
        RunSpec.from_config(config, num_devices=1)
    RunSpec.from_config(config, num_devices=1, training=False)  # a run trained so still predicts


def test_aspp_v3_with_batch_statistics_of_one_slice_is_refused(tmp_path):
    """Its image-pooling branch gave its BatchNorm's bias alone and never trained (no gradient)."""
    from focalnet_jax.run import workdir

    config = tiny_config(overrides=["--config.model.aspp=v3", "--config.train.batch_size=1"])
    with pytest.raises(UserError, match=r"^model\.aspp=v3 with model\.norm=batch and train\."):
        RunSpec.from_config(config, num_devices=1)
    # A run trained so before this check still predicts: only training is refused.
    workdir.save_config(config, tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        workdir.load_for_inference(tmp_path)
    config.model.norm = "frozen"
    RunSpec.from_config(config, num_devices=1)
    config.model.norm, config.train.batch_size = "batch", 2
    RunSpec.from_config(config, num_devices=1)


def test_global_batch_the_devices_do_not_divide():
    config = tiny_config(overrides=["--config.train.batch_size=6"])
    with pytest.raises(ValueError, match=r"^train\.batch_size=6 is not divisible by the 4 dev"):
        RunSpec.from_config(config, num_devices=4)
    assert RunSpec.from_config(config, num_devices=3).global_batch == 6


def test_cli_rejects_a_bad_config_in_one_line_before_opening_the_store(tmp_path):
    """`focalnet train` validates the config at load: one line naming the key, no workdir written,
    no store opened (the config has none), nothing compiled."""
    workdir = tmp_path / "run"
    argv = ["train", f"--config={REPO / 'configs' / 'focalnet.py'}", f"--workdir={workdir}"]
    with pytest.raises(
        SystemExit, match=r"^focalnet train: error: loss\.mfl_mode: expected one of"
    ):
        cli.main([*argv, "--config.loss.mfl_mode=scan"])
    assert not workdir.exists()


def test_every_field_of_a_resolved_run():
    config = tiny_config(overrides=["--config.loss.mfl_mode=select", "--config.loss.gamma=1.5"])
    spec = RunSpec.from_config(config, num_devices=1)
    assert spec.config.to_dict() == config.to_dict() and spec.config.loss.gamma == 1.5
    assert spec.components == ("t2w", "adc") and spec.t2w_channel == 0
    assert spec.image_size == (128, 128) and spec.input_shape == (1, 128, 128, 2)
    # Loss: ordinal focal with the config's alpha, gamma and pool size bound into the scalar and
    # the map.
    assert (spec.loss.name, spec.output_encoding) == ("ordinal_focal", "ordinal")
    assert spec.loss.fn.keywords == {"alpha": 0.75, "gamma": 1.5, "pool_size": 3}
    assert spec.loss.map_fn.keywords == {"alpha": 0.75, "gamma": 1.5, "pool_size": 3}
    assert (spec.mfl, spec.mfl_mode, spec.mfl_encoding) == (True, "select", "ordinal")
    assert spec.subsets == (("t2w",), ("adc",))
    assert spec.mfl_weight_setting is None  # 'auto'
    # Model: ResNet-18 DeepLab at width 0.125, output stride 16, 5 ordinal outputs, sync-BN axis.
    assert isinstance(spec.model, DeepLab)
    assert (spec.model.depth, spec.model.width, spec.model.output_stride) == (18, 0.125, 16)
    assert (spec.model.num_outputs, spec.model.num_components) == (5, 2)
    assert spec.model.axis_name == DATA_AXIS
    # Optimiser: lr 1e-3 decayed x0.7 every 2000 steps, SGD momentum 0.9 after L2 1e-4.
    assert [float(spec.schedule(s)) for s in (0, 2000)] == pytest.approx([1e-3, 7e-4])
    params = {"w": jnp.array([2.0])}
    update, _ = spec.tx.update({"w": jnp.array([0.5])}, spec.tx.init(params), params)
    np.testing.assert_allclose(update["w"], [-1e-3 * (0.5 + 1e-4 * 2.0)], rtol=1e-6)
    assert isinstance(spec.tx, optax.GradientTransformation)
    assert spec.global_batch == 4
    assert spec.augmenting and spec.augment.intensity_range == (-0.15, 0.20)


def test_store_dependent_fields():
    store = FakeStore(patients=10, slices=3, size=32)
    spec = RunSpec.from_config(tiny_config(), num_devices=1).for_store(store)
    assert spec.image_size == (32, 32) and spec.input_shape == (1, 32, 32, 2)
    split = spec.fold_split(store)
    assert not set(split.train_cases) & set(split.val_cases)
    assert sorted(split.train_cases + split.val_cases) == store.case_ids
    for cases, rows in ((split.train_cases, split.train_rows), (split.val_cases, split.val_rows)):
        expected = [
            r for c in cases for r in range(*store.case_slices(c).indices(len(store)))
            if store.annotated[r]
        ]  # fmt: skip
        np.testing.assert_array_equal(rows, sorted(expected))
    classes = np.asarray(store.classes[split.train_rows])
    ratio = losses.positive_bit_ratio(classes, grade_known=store.grade_known[split.train_rows])
    assert spec.mfl_weight(store, split.train_rows) == pytest.approx(1 / ratio)

    class Reads:
        """A store array that records how many slices each read takes."""

        def __init__(self, array):
            self.array, self.dtype, self.shape, self.ndim = array, array.dtype, array.shape, 3
            self.sizes = []

        def __getitem__(self, index):
            part = self.array[index]
            self.sizes.append(len(part))
            return part

    counted = FakeStore(patients=10, slices=3, size=32)
    counted.classes, counted.grade_known = Reads(store.classes), Reads(store.grade_known)
    rows = np.repeat(split.train_rows, 10)  # more rows than one chunk of 64
    assert spec.mfl_weight(counted, rows) == pytest.approx(1 / ratio)
    assert max(counted.classes.sizes + counted.grade_known.sizes) == 64  # never the whole split
    assert spec.total_steps(7) == 200 * 7  # train.epochs = 200, train.steps = 0
    hbv = tiny_config(overrides=["--config.data.components=t2w,hbv"])
    with pytest.raises(ValueError, match=r"\['hbv'\] not in store"):
        RunSpec.from_config(hbv).for_store(store)


def test_baselines_resolve_their_encodings():
    onehot = RunSpec.from_config(tiny_config("configs/deeplab_onehot.py"), num_devices=1)
    assert (onehot.output_encoding, onehot.model.num_outputs) == ("onehot", 6)
    assert onehot.mfl_encoding == "ordinal"  # MFL on a one-hot output compares ordinal bits
    single = RunSpec.from_config(tiny_config("configs/unet_sing.py"), num_devices=1)
    assert isinstance(single.model, UNet)
    assert (single.output_encoding, single.model.num_outputs) == ("binary", 1)
    assert not single.mfl and single.subsets == () and single.mfl_weight(None, None) == 0.0


def test_a_unet_too_deep_for_the_stores_images_is_refused_in_one_line():
    """A U-Net halves its input `unet_levels` times. Before, a store of 32 x 32 images with
    `unet_levels=6` (64) passed the config checks and ended in a ValueError traceback from
    inside `model.init`."""
    deep = tiny_config("configs/unet_sing.py", ["--config.model.unet_levels=6"])
    spec = RunSpec.from_config(deep, num_devices=1)  # the store's size is not known yet
    assert spec.image_size == (128, 128)
    with pytest.raises(UserError) as error:
        spec.for_store(FakeStore(patients=4, slices=2, size=32))
    assert str(error.value) == (
        "store memory:/fake-store: model.unet_levels=6: the U-Net halves its input 6 times, so "
        "the image height and width must be multiples of 64, but the images are 32 x 32 "
        "pixels; lower model.unet_levels or preprocess with a crop size that is a multiple of 64"
    )
    with pytest.raises(UserError, match=r"^model\.unet_levels=6: .* images are 96 x 96 pixels"):
        RunSpec.from_config(deep, num_devices=1, image_size=(96, 96))
    # Inference describes the saved state before any store: a default size the U-Net takes.
    deeper = tiny_config("configs/unet_sing.py", ["--config.model.unet_levels=8"])
    assert RunSpec.from_config(deeper, num_devices=1).image_size == (256, 256)
    assert RunSpec.from_config(tiny_config(), num_devices=1).image_size == (128, 128)


def test_seeds_that_differ_above_32_bits_give_different_keys():
    """JAX without x64 keeps a seed's low 32 bits: seeds 0 and 2**32 trained from one
    initialisation with one augmentation (their data order, from NumPy, differed)."""
    import jax

    def key_data(seed):
        config = tiny_config(overrides=[f"--config.seed={seed}"])
        return tuple(
            jax.random.key_data(RunSpec.from_config(config, num_devices=1).root_key()).tolist()
        )

    for seed in (0, 5, 2**32 - 1):  # below 2**32: the key of earlier runs, so a resume matches
        assert key_data(seed) == tuple(jax.random.key_data(jax.random.key(seed)).tolist())
    keys = [key_data(seed) for seed in (0, 2**32, 2**33, 5, 2**32 + 5, 2**63 - 1)]
    assert len(set(keys)) == len(keys)


def test_data_splits_takes_the_folds_from_given_split_files(tmp_path):
    """`data.splits` (e.g. picai_baseline's folds) decides fold k's cases, not `data.fold_seed`."""
    import json

    store = FakeStore(patients=6, slices=3, size=32)
    ids = store.case_ids
    folds = [{"train": ids[2:], "val": ids[:2]}, {"train": ids[:4], "val": ids[4:]}]
    (tmp_path / "splits.json").write_text(json.dumps(folds))
    for k in (0, 1):
        overrides = [
            f"--config.data.splits={tmp_path / 'splits.json'}",
            "--config.data.num_folds=2",
        ]
        config = tiny_config(overrides=[*overrides, f"--config.data.fold={k}"])
        split = RunSpec.from_config(config, num_devices=1).for_store(store).fold_split(store)
        assert (list(split.train_cases), list(split.val_cases)) == (
            folds[k]["train"],
            folds[k]["val"],
        )


def test_a_run_trained_before_the_loss_option_checks_still_predicts():
    """MFL added to a benchmark loss (before `loss.mfl_any_loss`), and an option the loss did not
    take (ignored then): such a run trained, and resumes only with the setting that allows it;
    its evaluation and `predict` (which take no overrides) were refused for good."""
    config = tiny_config(overrides=["--config.loss.name=sigmoid_ce", "--config.loss.mfl=False"])
    config.loss.mfl, config.loss.gamma = True, 1.0
    with pytest.raises(UserError, match=r"^loss\.mfl=True with loss\.name='sigmoid_ce'"):
        RunSpec.from_config(config, num_devices=1)
    spec = RunSpec.from_config(config, num_devices=1, training=False)
    assert spec.loss.name == "sigmoid_ce"
    config.loss.mfl = False
    with pytest.raises(UserError, match=r"^loss\.gamma=1\.0: loss 'sigmoid_ce' does not take"):
        RunSpec.from_config(config, num_devices=1)
    RunSpec.from_config(config, num_devices=1, training=False)
