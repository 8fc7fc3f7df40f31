"""The run layer: a config validated once and resolved once into a frozen :class:`RunSpec`.

Training (`focalnet_jax.training`), inference and `focalnet predict` (`focalnet_jax.evaluation`),
the benchmarks and the tests all build from a `RunSpec`; nothing else re-reads the config to
decide the output encoding, the MFL encoding and subsets, lambda, the model, the optimiser, the
input shape or the fold rows.

`RunSpec.from_config(config)` raises a `ValueError` whose message starts with the offending key
(`loss.mfl_mode: ...`, `train.batch_size=...`) before anything is compiled.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from focalnet_jax import encoding, losses
from focalnet_jax.data import folds
from focalnet_jax.data.preprocess_config import PreprocessConfig
from focalnet_jax.data.store import component_channels
from focalnet_jax.errors import UserError
from focalnet_jax.losses.checks import check_scalar, concrete_real
from focalnet_jax.models import (
    build_model,
    check_input_size,
    check_model_config,
    input_multiple,
)
from focalnet_jax.run.optimizer import WEIGHT_DECAY_ON, build_optimizer

DATA_AXIS = "data"
"""Name of the 1-D device mesh axis (data parallelism, sync-BN statistics)."""


_SECTIONS = ("seed", "data", "loss", "model", "train", "augment", "optim")  # of a training config


def clip_inputs(images: jax.Array) -> jax.Array:
    """Clip every component to [0, 1]: the model's input range, at training and at inference."""
    return jnp.clip(images, 0.0, 1.0)


def per_device_batch(global_batch: int, num_devices: int) -> int:
    """Examples per device; a global batch the devices do not divide is an error."""
    if isinstance(global_batch, bool) or not isinstance(global_batch, int):
        raise UserError(f"train.batch_size: expected an int, got {global_batch!r}")
    if global_batch <= 0:
        raise UserError(f"train.batch_size={global_batch}: must be positive")
    if global_batch % num_devices:
        processes, local = jax.process_count(), jax.local_device_count()
        layout = f"{processes} processes x {local} local devices"
        if processes * local != num_devices:  # processes of unequal devices (refused later)
            layout = f"{processes} processes, this one driving {local}"
        raise UserError(
            f"train.batch_size={global_batch} is not divisible by the {num_devices} devices of the "
            f"'{DATA_AXIS}' mesh ({layout}); choose a multiple of the device count"
        )
    return global_batch // num_devices


@dataclasses.dataclass(frozen=True)
class FoldSplit:
    """Cases and store rows (int64, ascending) of a run's training and validation folds."""

    train_cases: tuple[str, ...]
    val_cases: tuple[str, ...]
    train_rows: np.ndarray
    val_rows: np.ndarray


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """Everything a run's config decides, resolved once (see :meth:`from_config`).

    Fields: `config` (the frozen source, for the loop's logging/checkpoint cadence); data:
    `components`, `t2w_channel`, `image_size`; loss: `loss` (a `losses.LossSpec` with the
    config's hyperparameters bound), `output_encoding`, `mfl`, `mfl_mode`, `mfl_encoding`,
    `subsets` (empty without MFL), `mfl_chunk` (subsets per probe chunk, 0 = all),
    `mfl_weight_setting` (None = 'auto'); `model` (BatchNorm
    synced over `DATA_AXIS` in training mode); `schedule`, `tx`; `global_batch`; `augment`.
    """

    config: ml_collections.FrozenConfigDict
    components: tuple[str, ...]
    t2w_channel: int | None
    image_size: tuple[int, int]
    loss: losses.LossSpec
    output_encoding: str
    mfl: bool
    mfl_mode: str
    mfl_chunk: int
    mfl_encoding: str
    subsets: tuple[tuple[str, ...], ...]
    mfl_weight_setting: float | None
    model: nn.Module
    schedule: optax.Schedule
    tx: optax.GradientTransformation
    global_batch: int
    augment: ml_collections.FrozenConfigDict

    @classmethod
    def from_config(
        cls,
        config: ml_collections.ConfigDict,
        *,
        num_devices: int | None = None,
        image_size: tuple[int, int] | None = None,
        training: bool = True,
    ) -> RunSpec:
        """Validate `config` and resolve it; `training=False` (a trained run loaded to predict)
        skips the checks of what training alone would do wrong (`_check_training_only`), so a
        run trained before them still predicts.

        Args:
          config: a run config (`configs/default.py` fields).
          num_devices: devices of the data mesh (default `jax.device_count()`); the global batch
            must be a multiple of it. Inference passes 1.
          image_size: (H, W) of the model input (default: the preprocessing crop size; the
            training loop passes its store's).
        """
        try:
            spec = cls._resolve(config, num_devices, image_size)
            if training:
                _check_training_only(config)
            return spec
        except UserError:
            raise
        except (TypeError, ValueError) as error:  # every config error is the user's to fix
            raise UserError(str(error)) from error

    @classmethod
    def _resolve(cls, config, num_devices, image_size) -> RunSpec:
        if missing := [key for key in _SECTIONS if key not in config]:  # else an AttributeError
            raise ValueError(
                f"not a training config: it has no {', '.join(missing)} (a training config "
                "starts from configs/default.py)"
            )
        _check_seed(config.seed)
        components = _check_data(config.data)
        loss, subsets, mfl_weight = _check_loss(config.loss, components)
        check_model_config(config.model)
        _check_train(config.train)
        _check_augment(config.augment)
        _check_optim(config.optim)
        schedule, tx = build_optimizer(config.optim)
        per_device_batch(config.train.batch_size, num_devices or jax.device_count())
        if image_size is None:  # the store's comes with `for_store`; parameters fit any size
            multiple = input_multiple(config.model)
            side = -(-PreprocessConfig().crop_size // multiple) * multiple
            image_size = (side, side)
        check_input_size(config.model, image_size)
        model = build_model(
            config.model,
            num_outputs=encoding.num_outputs(loss.encoding),
            num_components=len(components),
            axis_name=DATA_AXIS,
        )
        return cls(
            config=ml_collections.FrozenConfigDict(config),
            components=components,
            t2w_channel=components.index("t2w") if "t2w" in components else None,
            image_size=tuple(image_size),
            loss=loss,
            output_encoding=loss.encoding,
            mfl=bool(config.loss.mfl),
            mfl_mode=config.loss.mfl_mode,
            mfl_chunk=_check_mfl_chunk(config.loss.mfl_chunk),
            mfl_encoding=losses.mfl_encoding(loss.encoding),
            subsets=tuple(subsets),
            mfl_weight_setting=mfl_weight,
            model=model,
            schedule=schedule,
            tx=tx,
            global_batch=int(config.train.batch_size),
            augment=ml_collections.FrozenConfigDict(config.augment),
        )

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        """`[1, H, W, C]`: one model input (initialisation, shapes of the state)."""
        return (1, *self.image_size, len(self.components))

    @property
    def augmenting(self) -> bool:
        a = self.augment
        return bool(a.shift or a.scale or a.flip or a.intensity)

    def for_store(self, store) -> RunSpec:
        """The spec with the store's image size; the store must hold every component."""
        component_channels(store, self.components)
        image_size = tuple(store.images.shape[1:3])
        try:
            check_input_size(self.config.model, image_size)
        except ValueError as error:
            raise UserError(f"store {store.path}: {error}") from None
        return dataclasses.replace(self, image_size=image_size)

    def fold_split(self, store) -> FoldSplit:
        """Training and validation cases and rows of `data.fold` (patient-level folds, or those
        of the split files `data.splits` names)."""
        data = self.config.data
        splits = data.get("splits", "")
        train, val = folds.split_cases(store, data.fold, data.num_folds, data.fold_seed, splits)
        return FoldSplit(
            train_cases=tuple(train),
            val_cases=tuple(val),
            train_rows=folds.case_rows(store, train, data.slices),
            val_rows=folds.case_rows(store, val, data.slices),
        )

    def mfl_weight(self, store, train_rows: np.ndarray) -> float:
        """lambda of eq. 4: 0 without MFL, the configured number, or for 'auto' 1 / the
        positive-bit ratio (in the MFL encoding) of the training rows."""
        if not self.mfl:
            return 0.0
        if self.mfl_weight_setting is not None:
            return self.mfl_weight_setting
        try:
            return losses.mfl_weight(
                store.classes,
                rows=train_rows,
                encoding=self.mfl_encoding,
                grade_known=store.grade_known,
            )
        except ValueError as error:  # e.g. no lesion in the training folds
            raise UserError(
                f"loss.mfl_weight='auto': the {len(train_rows)} training slices of "
                f"data.fold={self.config.data.fold} in store {store.path}: {error}"
            ) from None

    def root_key(self) -> jax.Array:
        """The run's root key from `seed` (an int in [0, 2**63)). JAX without x64 keeps a seed's
        low 32 bits only (seeds 0 and 2**32 gave one initialisation and augmentation), so the
        high bits are folded in; a seed below 2**32 keeps its key, `jax.random.key(seed)`."""
        seed = int(self.config.seed)
        key = jax.random.key(seed % 2**32)
        return jax.random.fold_in(key, seed >> 32) if seed >> 32 else key

    def total_steps(self, steps_per_epoch: int) -> int:
        """`train.steps` when > 0, else `train.epochs` whole epochs."""
        train = self.config.train
        return int(train.steps) if train.steps > 0 else int(train.epochs * steps_per_epoch)


def _check_data(data) -> tuple[str, ...]:
    components = data.components
    if (
        isinstance(components, str)
        or not components
        or not all(isinstance(c, str) for c in components)
        or len(set(components)) != len(components)
    ):
        raise ValueError(f"data.components: expected distinct component names, got {components!r}")
    if data.slices not in folds.SLICE_MODES:
        raise ValueError(f"data.slices: expected one of {folds.SLICE_MODES}, got {data.slices!r}")
    if not _is_int(data.num_folds) or data.num_folds < 2:
        raise ValueError(f"data.num_folds: expected an int >= 2, got {data.num_folds!r}")
    if not (_is_int(data.fold) and 0 <= data.fold < data.num_folds):
        raise ValueError(f"data.fold={data.fold!r} not in [0, data.num_folds={data.num_folds})")
    seed = data.fold_seed
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"data.fold_seed: expected an int >= 0, got {seed!r}")
    return tuple(components)


def _is_int(value) -> bool:
    """An int, not a bool (True passed as fold 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value, key: str, low: float, high: float | None = None) -> None:
    """A config's hyperparameter: a finite number in [low, high] (`check_scalar`). None (a config
    file's `config.optim.momentum = None`), a string or a bool is refused: None as the momentum
    trained plain SGD without a word, as the learning rate failed inside optax's schedule."""
    if concrete_real(value) is None:
        raise ValueError(f"{key}: expected a number, got {value!r}")
    check_scalar(value, key, low, high)


def _check_loss(loss_config, components: Sequence[str]):
    """(LossSpec with hyperparameters bound, MFL subsets, lambda setting) of `loss_config`."""
    name = loss_config.name
    if name not in losses.LOSS_NAMES:
        raise ValueError(f"loss.name: unknown loss {name!r}; expected one of {losses.LOSS_NAMES}")
    takes = losses.get_loss(name).hyperparameters
    _number(loss_config.alpha, "loss.alpha", 0.0, 1.0)
    _number(loss_config.gamma, "loss.gamma", 0.0)
    spec = losses.get_loss(name, **{k: loss_config[k] for k in takes if k in loss_config})
    _check_bound_options(spec)
    if loss_config.mfl_mode not in losses.MFL_MODES:
        raise ValueError(
            f"loss.mfl_mode: expected one of {losses.MFL_MODES}, got {loss_config.mfl_mode!r}"
        )
    # The MFL settings are checked with MFL off too, not first when someone turns it on.
    if loss_config.mfl and len(components) < 2:  # one component trains, MFL has nothing to compare
        raise ValueError(
            f"data.components={tuple(components)}: MFL (loss.mfl=True) compares subsets of at "
            "least 2 components; add a component or set loss.mfl=False"
        )
    if len(components) < 2 and loss_config.subsets is not None:
        raise ValueError(
            f"loss.subsets={loss_config.subsets!r}: data.components={tuple(components)} has no "
            "proper subset to name; set loss.subsets=None"
        )
    subsets = _check_subsets(loss_config.subsets, components) if len(components) > 1 else []
    mfl_weight = losses.parse_mfl_weight(loss_config.mfl_weight)
    if not loss_config.mfl:
        return spec, [], None
    return spec, subsets, mfl_weight


def _check_subsets(subsets, components: Sequence[str]) -> list[tuple[str, ...]]:
    """`loss.subsets` resolved for 2 or more `components` (None = every non-empty proper subset)."""
    try:
        return losses.component_subsets(components, subsets)
    except (TypeError, ValueError) as error:
        key = "data" if str(error).startswith("components") else "loss"
        raise ValueError(f"{key}.{error}") from None


def _check_bound_options(spec: losses.LossSpec) -> None:
    """Traces the bound loss once on a `[1, 3, 3, K]` batch, so that an option it refuses
    (`loss.eps=0`, `loss.weights` of one number, `loss.dice_background=False` with a sigmoid
    output) is an error naming it now, not a traceback once the train step compiles."""
    shape = jax.ShapeDtypeStruct((1, 3, 3, encoding.num_outputs(spec.encoding)), jnp.float32)
    try:
        jax.eval_shape(spec.fn, shape, shape)
    except (TypeError, ValueError) as error:
        raise ValueError(f"loss.{error}") from None


def _check_seed(seed) -> None:
    # The data order draws from numpy.random.default_rng((seed, epoch)), which refuses negatives.
    if isinstance(seed, bool) or not (isinstance(seed, int) and 0 <= seed < 2**63):
        raise ValueError(f"seed: expected an int in [0, 2**63), got {seed!r}")


def _check_range(value, key: str, above: float) -> None:
    """`value` = (low, high), finite numbers with `above` < low <= high (an infinite zoom reads
    every pixel from the centre, an infinite T2w divisor makes T2w 0: blank inputs, no NaN)."""
    pair = isinstance(value, list | tuple) and len(value) == 2
    numbers = pair and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    if not (numbers and np.isfinite(value).all() and above < value[0] <= value[1]):
        raise ValueError(
            f"{key}: expected finite (low, high) with {above:g} < low <= high, got {value!r}"
        )


def _check_training_only(config) -> None:
    """What training alone would do wrong: MFL added to a benchmark loss without
    `loss.mfl_any_loss`, and a loss option the loss does not take (ignored by the loss; a run
    trained before these two checks holds either); an augmentation switch that is no boolean
    (`None` set in a config file read as off); ASPP v3's image-pooling branch (one value per
    channel and slice) under batch statistics of a one-slice batch: its BatchNorm gives its bias
    alone, so the branch would never train (no gradient reaches its convolution)."""
    loss = config.loss
    losses.check_mfl(loss.name, bool(loss.mfl), bool(loss.get("mfl_any_loss", False)))
    losses.check_loss_options(loss.name, loss)  # also for a config made in Python, not loaded
    for switch in ("shift", "scale", "flip", "intensity"):
        value = config.augment[switch]
        if not isinstance(value, bool):
            raise ValueError(f"augment.{switch}: expected true or false, got {value!r}")
    model, batch_size = config.model, config.train.batch_size
    if model.name == "deeplab" and model.aspp == "v3" and model.norm == "batch" and batch_size < 2:
        raise ValueError(
            f"model.aspp=v3 with model.norm=batch and train.batch_size={batch_size}: the image-"
            "pooling branch's BatchNorm sees one value per channel, so the branch gives a "
            "constant and never trains; use a batch of >= 2, model.norm=frozen or model.aspp=v2"
        )


def _check_augment(augment) -> None:
    """The ranges the augmentation draws from (`training.augment`): `jax.random.uniform` with
    minval > maxval returns minval every time, so a reversed range or a negative shift limit
    would apply one fixed zoom or shift to every slice without a word; a zoom <= 0 or an upper
    T2w threshold moved by <= -100 % has no meaning."""
    _number(augment.max_shift, "augment.max_shift", 0.0, 1.0)
    _check_range(augment.scale_range, "augment.scale_range", 0.0)
    _check_range(augment.intensity_range, "augment.intensity_range", -1.0)


def _check_mfl_chunk(chunk) -> int:
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
        raise ValueError(f"loss.mfl_chunk: expected an int >= 0 (0 = all subsets), got {chunk!r}")
    return chunk


def _check_train(train) -> None:
    # A negative step count would otherwise read as 0 (= use train.epochs) without a word.
    for key, zero in (("steps", "train.epochs"), ("epochs", "train.steps")):
        value = train[key]
        if isinstance(value, bool) or not (isinstance(value, int) and value >= 0):
            raise ValueError(f"train.{key}: expected an int >= 0 (0 = use {zero}), got {value!r}")
    if train.steps == 0 and train.epochs == 0:
        raise ValueError("train.steps and train.epochs are both 0; set one of them")
    # keep_checkpoints=0 would have Orbax delete every checkpoint as soon as it is written.
    for key in ("log_every", "checkpoint_every", "keep_checkpoints", "prefetch"):
        if isinstance(train[key], bool) or not (isinstance(train[key], int) and train[key] >= 1):
            raise ValueError(f"train.{key}: expected a positive int, got {train[key]!r}")
    eval_every = train.eval_every
    if isinstance(eval_every, bool) or not (isinstance(eval_every, int) and eval_every >= 0):
        raise ValueError(
            f"train.eval_every: expected an int >= 0 (0 = at the end), got {eval_every!r}"
        )


def _check_optim(optim) -> None:
    """The `optim` section's values (`optimizer.build_optimizer` takes them as they are)."""
    if not (_is_int(optim.decay_steps) and optim.decay_steps >= 1):
        raise ValueError(f"optim.decay_steps: expected a positive int, got {optim.decay_steps!r}")
    _number(optim.lr, "optim.lr", 0.0)
    _number(optim.momentum, "optim.momentum", 0.0, 1.0)
    _number(optim.weight_decay, "optim.weight_decay", 0.0)
    if optim.weight_decay_on not in WEIGHT_DECAY_ON:
        raise ValueError(
            f"optim.weight_decay_on: expected one of {WEIGHT_DECAY_ON}, "
            f"got {optim.weight_decay_on!r}"
        )
    rate = optim.decay_rate  # <= 0 zeroes the rate or flips its sign, > 1 grows it without end
    if isinstance(rate, bool) or not (isinstance(rate, int | float) and 0 < rate <= 1):
        raise ValueError(f"optim.decay_rate: expected a number in (0, 1], got {rate!r}")
