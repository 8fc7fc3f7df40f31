"""Train state, optimiser and placed initialisation.

The state is a plain pytree (`TrainState`), so it jits, shards and checkpoints without special
cases; the optimiser and the model's `apply` live outside it.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from focalnet_jax import encoding, losses
from focalnet_jax.models import build_model
from focalnet_jax.training import sharding


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    batch_stats: Any  # BatchNorm running averages ({} for models without them)
    opt_state: Any


def build_run_model(
    config: ml_collections.ConfigDict, *, axis_name: str | None = None
) -> tuple[nn.Module, str]:
    """The network a run trains and its output encoding (fixed by `config.loss.name`).

    Outputs: 5 ordinal bits, 6 one-hot classes or 1 lesion bit; inputs: `data.components`.
    """
    enc = losses.get_loss(config.loss.name).encoding
    model = build_model(
        config.model,
        num_outputs=encoding.num_outputs(enc),
        num_components=len(config.data.components),
        axis_name=axis_name,
    )
    return model, enc


def learning_rate_schedule(optim: ml_collections.ConfigDict) -> optax.Schedule:
    """lr * decay_rate ** (step // decay_steps) (staircase; paper: 1e-3 x0.7 every 2000 steps)."""
    return optax.exponential_decay(
        init_value=optim.lr,
        transition_steps=optim.decay_steps,
        decay_rate=optim.decay_rate,
        staircase=True,
    )


def make_optimizer(optim: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """SGD with momentum and an L2 regulariser (paper II-D3).

    `add_decayed_weights` before `sgd` adds weight_decay * w to the gradient, i.e. the gradient of
    (weight_decay / 2) * ||w||^2 added to the loss (TensorFlow's L2 regulariser semantics), which
    then passes through momentum like the rest of the gradient. It covers every parameter.
    """
    return optax.chain(
        optax.add_decayed_weights(optim.weight_decay),
        optax.sgd(learning_rate_schedule(optim), momentum=optim.momentum),
    )


def init_variables(model: nn.Module, rng: jax.Array, input_shape: tuple[int, ...]) -> dict:
    """`model.init` on a zero batch of `input_shape` [B, H, W, C]; {'params', 'batch_stats'}."""
    variables = model.init(rng, jnp.zeros(input_shape, jnp.float32), train=False)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def state_from_variables(variables: dict, tx: optax.GradientTransformation) -> TrainState:
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(params),
    )


def create_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    rng: jax.Array,
    input_shape: tuple[int, ...],
    mesh: Mesh,
    *,
    variables: dict | None = None,
) -> TrainState:
    """A new state created already replicated over `mesh` (never materialised on one device first).

    With `variables` (e.g. pretrained weights) the state starts from them instead of `model.init`.
    """
    replicated = sharding.replicated(mesh)
    if variables is None:
        init = lambda key: state_from_variables(init_variables(model, key, input_shape), tx)
        return jax.jit(init, out_shardings=replicated)(rng)
    return jax.jit(lambda v: state_from_variables(v, tx), out_shardings=replicated)(variables)


def abstract_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    input_shape: tuple[int, ...],
    mesh: Mesh,
) -> TrainState:
    """Shapes, dtypes and (replicated) shardings of the state, for compiling and restoring."""
    shapes = jax.eval_shape(
        lambda key: state_from_variables(init_variables(model, key, input_shape), tx),
        jax.random.key(0),
    )
    replicated = sharding.replicated(mesh)
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), shapes
    )
