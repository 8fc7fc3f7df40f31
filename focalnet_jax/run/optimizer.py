"""The optimiser of a training config (paper II-D3): SGD with momentum after an L2 term, on a
staircase learning-rate schedule. `RunSpec` builds it once from the validated `optim` section."""

from __future__ import annotations

import jax
import optax

WEIGHT_DECAY_ON = ("all", "kernels")
"""`optim.weight_decay_on`: the parameters the L2 term covers. "all": every one, BatchNorm scales
and offsets and biases included (the default, and what runs saved before the key existed did);
"kernels": the convolution and dense kernels alone, BatchNorm and biases not decayed (TensorFlow
DeepLab's `slim` regulariser; the paper, built on TensorFlow DeepLab, does not say which)."""


def decayed_kernels(params) -> object:
    """A tree of bools like `params`: True at each leaf named `kernel` (a convolution, transposed
    convolution or dense layer's weights), False at BatchNorm scales and offsets and biases."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params
    )


def build_optimizer(optim) -> tuple[optax.Schedule, optax.GradientTransformation]:
    """(schedule, transformation) of a validated `optim` section: the staircase schedule
    lr * decay_rate ** (step // decay_steps) (paper: 1e-3 x0.7 every 2000 steps) and SGD with
    momentum after an L2 term.

    `add_decayed_weights` before `sgd` adds weight_decay * w to the gradient, i.e. the gradient of
    (weight_decay / 2) * ||w||^2 added to the loss (TensorFlow's L2 regulariser semantics), which
    then passes through momentum like the rest of the gradient; over every parameter or the
    kernels alone (`optim.weight_decay_on`). With no loss gradient, 17,400 steps (a paper fold)
    of "all" shrink a BatchNorm scale of 1 to 0.9936.
    """
    schedule = optax.exponential_decay(
        init_value=optim.lr,
        transition_steps=optim.decay_steps,
        decay_rate=optim.decay_rate,
        staircase=True,
    )
    # "all" keeps the unmasked transformation: its state (and the checkpoints' tree) as before
    mask = decayed_kernels if optim.weight_decay_on == "kernels" else None
    tx = optax.chain(
        optax.add_decayed_weights(optim.weight_decay, mask=mask),
        optax.sgd(schedule, momentum=optim.momentum),
    )
    return schedule, tx
