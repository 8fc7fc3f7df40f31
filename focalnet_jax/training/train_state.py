"""Train state and its placed initialisation.

The state is a plain pytree (`TrainState`), so it jits, shards and checkpoints without special
cases; the model's `apply` and the optimiser live in the run's `RunSpec`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from focalnet_jax.run import RunSpec
from focalnet_jax.training import sharding


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    batch_stats: Any  # BatchNorm running averages ({} for models without them)
    opt_state: Any


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


def _fresh_state(spec: RunSpec, rng: jax.Array) -> TrainState:
    return state_from_variables(init_variables(spec.model, rng, spec.input_shape), spec.tx)


def fresh_state_maker(spec: RunSpec, mesh: Mesh) -> Callable[[jax.Array], TrainState]:
    """`key -> TrainState`, a new state replicated over `mesh`: compiled at its first call, so
    further calls (e.g. one per step kind of a benchmark) make new states without compiling."""
    return jax.jit(lambda key: _fresh_state(spec, key), out_shardings=sharding.replicated(mesh))


def create_train_state(
    spec: RunSpec, rng: jax.Array, mesh: Mesh, *, variables: dict | None = None
) -> TrainState:
    """A new state created already replicated over `mesh` (never materialised on one device first).

    With `variables` (e.g. pretrained weights) the state starts from them instead of `model.init`.
    """
    if variables is None:
        return fresh_state_maker(spec, mesh)(rng)
    replicated = sharding.replicated(mesh)
    init = lambda v: state_from_variables(v, spec.tx)
    return jax.jit(init, out_shardings=replicated)(variables)


def abstract_train_state(spec: RunSpec, mesh: Mesh) -> TrainState:
    """Shapes, dtypes and (replicated) shardings of the state, for compiling and restoring."""
    shapes = jax.eval_shape(lambda key: _fresh_state(spec, key), jax.random.key(0))
    replicated = sharding.replicated(mesh)
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), shapes
    )
