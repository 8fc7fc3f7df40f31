"""Input checks shared by the losses: shapes, dtypes and 0/1 values, with messages naming the
argument.

The 0/1 check needs the values, so it runs on concrete arrays only and is skipped under
``jit``/``grad`` tracing.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x) -> bool:
    """True for arrays whose values are known now (not a tracer)."""
    return not isinstance(x, jax.core.Tracer)


def check_bits(x, name: str, shape: tuple[int, ...], dtype):
    """Checks a 0/1 array of the given shape (values only where concrete); casts it to dtype."""
    x = jnp.asarray(x) if isinstance(x, jax.Array) else np.asarray(x)
    if x.dtype != np.bool_ and not (
        jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)
    ):
        raise TypeError(f"{name}: expected 0/1 bits (float, int or bool), got dtype {x.dtype}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(x.shape)}")
    if is_concrete(x):
        values = np.asarray(x)
        bad = values[(values != 0) & (values != 1)]
        if bad.size:
            raise ValueError(f"{name}: expected only 0/1 bits, got values such as {bad[:3]}")
    return jnp.asarray(x, dtype)


def check_floating(x, name: str, ndim: int, layout: str):
    """``x`` as a floating array of rank ``ndim`` (``layout`` names the axes in the message)."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name}: expected a floating array, got dtype {x.dtype}")
    if x.ndim != ndim:
        raise ValueError(f"{name}: expected shape {layout}, got {x.shape}")
    return x


def check_inputs(logits, targets, valid):
    """Validated (logits, targets, valid) with targets and valid in the dtype of logits."""
    logits = check_floating(logits, "logits", 4, "[B, H, W, K]")
    targets = check_bits(targets, "targets", logits.shape, logits.dtype)
    if valid is None:
        return logits, targets, jnp.ones_like(targets)
    return logits, targets, check_bits(valid, "valid", logits.shape, logits.dtype)


def concrete_real(value) -> float | None:
    """``value`` as a Python float when it is a concrete real scalar (a Python, NumPy or 0-d JAX
    number; bool excluded), else None (a tracer, or not a number)."""
    if isinstance(value, bool | np.bool_) or not is_concrete(value):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, np.ndarray | jax.Array) and value.ndim == 0:
        kind = np.dtype(value.dtype).kind
        return float(value) if kind in "iuf" else None
    return None


def check_scalar(value, name: str, low: float, high: float | None = None):
    """Range check for hyperparameters given as Python, NumPy or concrete 0-d JAX numbers (a
    traced 0-d value passes through unchecked); inf and NaN are refused (gamma = inf trains with
    loss 0 and NaN gradients, eps = inf a NaN Dice), and so is any other value: a concrete array
    of another shape (`np.array([2.0])` trained alpha 2 unchecked), a bool, None or a string."""
    number = concrete_real(value)
    if number is None:
        if is_concrete(value):
            raise ValueError(f"{name}: expected a real number, got {value!r}")
        if jnp.ndim(value) != 0:
            raise ValueError(f"{name}: expected a scalar, got shape {jnp.shape(value)}")
        return
    if not math.isfinite(number):
        raise ValueError(f"{name}: expected a finite value, got {number}")
    if not (number >= low and (high is None or number <= high)):
        interval = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name}: expected a value in {interval}, got {number}")
