"""Defaults shared by every config: the paper's optimiser, augmentation and data settings.

Not meant to be trained directly (no store path, a ResNet-101); experiment files start from
`default.get_config()` and override what changes. It is returned locked: setting a key it
lacks (a typo such as `config.train.stpes = 5`) is an error at that line, not a value nothing
reads; a file that means to add a field does so inside `with config.unlocked():`. Every field is
overridable on the command line:
`focalnet train --config configs/focalnet.py --workdir runs/x --config.train.steps=100`.
Expected runtime: none of its own (a base, not an experiment).
Expected metric: none of its own.
"""

from __future__ import annotations

import ml_collections

from focalnet_jax.models import default_model_config


def parse_arg(arg: str | None, **defaults) -> dict:
    """Parse a `:arg` string `fold=2,runlocal` into {'fold': 2, 'runlocal': True} over `defaults`.

    Values are converted to the type of the default (int/float/str); bare words are True flags,
    for a flag (a bool default) only (a bare `fold` trained fold 1). Unknown names, and a name
    given twice, are an error naming them (and the accepted ones).
    """
    values, given, after_store = dict(defaults), set(), False
    for item in filter(None, (part.strip() for part in (arg or "").split(","))):
        name, sep, text = item.partition("=")
        if name in given:  # `fold=1,fold=2`: which one was meant?
            raise ValueError(f"config arg {name!r} given twice")
        given.add(name)
        if name not in defaults:
            expected = f"expected one of {sorted(defaults)}" if defaults else "this file takes none"
            if after_store:  # `store=/data/a,b`: the path's comma split the args
                expected += "; a store path holding a comma is given as --config.data.store=PATH"
            raise ValueError(f"config arg {name!r} unknown; {expected}")
        after_store = name == "store"
        default = defaults[name]
        if not sep:
            if not isinstance(default, bool):
                raise ValueError(f"config arg {name!r} needs a value ({name}=...)")
            values[name] = True
        elif isinstance(default, bool):
            if text.lower() not in ("1", "true", "yes", "0", "false", "no"):
                raise ValueError(f"config arg {name}={text!r}: expected true or false")
            values[name] = text.lower() in ("1", "true", "yes")
        elif isinstance(default, int | float):
            try:
                values[name] = type(default)(text)
            except ValueError:
                expected = "an integer" if isinstance(default, int) else "a number"
                raise ValueError(f"config arg {name}={text!r}: expected {expected}") from None
        else:
            values[name] = text
    return values


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    parse_arg(arg)  # takes none: `default.py:fold=2` would train fold 0
    config = ml_collections.ConfigDict()
    config.seed = 0  # parameter init, data order and augmentation all derive from it

    config.data = ml_collections.ConfigDict()
    config.data.store = ""  # preprocessed store written by `focalnet preprocess`
    config.data.fold = 0  # validation fold; the other folds train
    config.data.num_folds = 5
    config.data.fold_seed = 0  # patient-level stratified fold assignment seed
    config.data.splits = ""  # or given folds: picai_baseline's ds-config folder, splits.json
    config.data.components = ("t2w", "adc")  # input channels: store components by name, any order
    config.data.slices = "annotated"  # 'annotated' (paper: slices with lesions) or 'all'

    config.model = default_model_config()  # ResNet-101 DeepLab-v2, output stride 8

    config.loss = ml_collections.ConfigDict()
    config.loss.name = "ordinal_focal"  # losses.get_loss(name): fixes the output encoding
    config.loss.mfl = True  # add lambda * mutual finding loss over component subsets
    # MFL with a loss other than losses.MFL_LOSSES (ordinal_focal) must be asked for: a benchmark
    # loss chosen on top of this config (loss.name=ce_focal) is refused while loss.mfl is True.
    config.loss.mfl_any_loss = False
    config.loss.mfl_weight = "auto"  # 'auto' = 1 / positive bit ratio of the training split
    config.loss.mfl_mode = "select"  # 'select' (argmin subset recomputed) or 'vmap' (paper)
    config.loss.subsets = None  # None = every non-empty proper subset of data.components
    config.loss.mfl_chunk = 4  # subsets per MFL probe chunk (memory bound); 0 = all at once
    config.loss.alpha = 0.75  # ordinal focal loss positive-bit weight (eq. 1)
    config.loss.gamma = 2.0  # focal exponent (eq. 2)
    config.loss.pool_size = 3  # ordinal focal loss: side of the max filter over q (1 = none)
    # Options of the combined and Dice losses (bound only to the losses that take them):
    config.loss.weights = (1.0, 1.0)  # ce_focal (CE, FL) / ce_dice (CE, Dice) term weights
    config.loss.eps = 1.0  # Dice smoothing (nnU-Net: 1e-5)
    config.loss.batch_dice = False  # one Dice per channel over the whole batch (nnU-Net: True)
    config.loss.dice_background = True  # softmax Dice over channel 0 too (nnU-Net: False)

    config.optim = ml_collections.ConfigDict()
    config.optim.lr = 1e-3
    config.optim.momentum = 0.9
    config.optim.weight_decay = 1e-4  # L2 regulariser added to the gradient before momentum
    config.optim.weight_decay_on = "all"  # every parameter, or "kernels" (not BatchNorm, biases)
    config.optim.decay_rate = 0.7  # lr * decay_rate ** (step // decay_steps)
    config.optim.decay_steps = 2000

    config.train = ml_collections.ConfigDict()
    config.train.steps = 0  # total steps; > 0 overrides epochs
    config.train.epochs = 200
    config.train.batch_size = 16  # global batch over all devices of all processes
    config.train.log_every = 50  # TensorBoard scalars and console line
    config.train.checkpoint_every = 1000
    config.train.keep_checkpoints = 3  # latest K checkpoints kept
    config.train.eval_every = 2000  # validation loss, Dice and image panels; 0 = only at the end
    config.train.prefetch = 2  # batches queued on device ahead of the step (+1 being built)

    config.augment = ml_collections.ConfigDict()
    config.augment.shift = True
    config.augment.max_shift = 0.1  # fraction of the image size, uniform in [-max, max] per axis
    config.augment.scale = True
    config.augment.scale_range = (0.9, 1.1)  # isotropic zoom factor, uniform
    config.augment.flip = True  # left-right, probability 0.5
    config.augment.intensity = True  # T2w upper-threshold variation
    config.augment.intensity_range = (-0.15, 0.20)  # u ~ U(lo, hi) on the upper threshold
    config.lock()
    return config
