"""Losses by name (``config.loss.name``): each name fixes the model's output encoding and binds
the hyperparameters the config gives."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import NamedTuple

from focalnet_jax.losses import pixel


class LossSpec(NamedTuple):
    """A loss chosen by name: its output encoding, ``fn(logits, targets, *, valid=None)`` (the
    scalar) and ``map_fn`` (the same loss per pixel ``[B, H, W]`` or per image ``[B]``; reduce it
    with :mod:`focalnet_jax.losses.reductions`; the batch Dice's ``fn`` is one Dice over the batch,
    not a reduction of ``map_fn``). ``takes_axis_name``: ``fn`` also takes
    ``axis_name``, the data axis over which a batch-level reduction (batch Dice) sums under
    ``jax.shard_map``, so a data-parallel step gets the global batch's loss. ``terms_fn``: for a
    loss of two weighted terms, the same arguments as ``fn`` -> ``{term: weighted scalar}``
    summing to it (logged beside it), else None."""

    name: str
    encoding: str
    fn: Callable
    hyperparameters: tuple[str, ...] = ()
    map_fn: Callable | None = None
    takes_axis_name: bool = False
    terms_fn: Callable | None = None


def _spec(name, encoding, fn, map_fn, hyperparameters=(), terms_fn=None, **bound) -> LossSpec:
    if bound:
        fn, map_fn = functools.partial(fn, **bound), functools.partial(map_fn, **bound)
        terms_fn = terms_fn and functools.partial(terms_fn, **bound)
    takes_axis_name = "batch_dice" in hyperparameters
    return LossSpec(name, encoding, fn, hyperparameters, map_fn, takes_axis_name, terms_fn)


_FOCAL = ("alpha", "gamma")
_DICE = ("eps", "batch_dice", "dice_background")
_CE_DICE = (*_DICE, "weights")
_REGISTRY = {
    spec.name: spec
    for spec in (
        _spec(
            "ordinal_focal",
            "ordinal",
            pixel.ordinal_focal_loss,
            pixel.ordinal_focal_loss_map,
            ("alpha", "gamma", "pool_size"),
        ),
        _spec(
            "sigmoid_ce", "ordinal", pixel.sigmoid_cross_entropy, pixel.sigmoid_cross_entropy_map
        ),
        _spec("focal", "ordinal", pixel.focal_loss, pixel.focal_loss_map, _FOCAL),
        _spec("softmax_ce", "onehot", pixel.softmax_cross_entropy, pixel.softmax_cross_entropy_map),
        _spec("soft_dice", "ordinal", pixel.soft_dice_loss, pixel.soft_dice_loss_map, _DICE),
        _spec(
            "ce_dice",
            "ordinal",
            pixel.ce_dice_loss,
            pixel.ce_dice_loss_map,
            _CE_DICE,
            terms_fn=pixel.ce_dice_terms,
        ),
        _spec(
            "ce_focal",
            "ordinal",
            pixel.ce_focal_loss,
            pixel.ce_focal_loss_map,
            (*_FOCAL, "weights"),
            terms_fn=pixel.ce_focal_terms,
        ),
        _spec(
            "softmax_ce_dice",
            "onehot",
            pixel.ce_dice_loss,
            pixel.ce_dice_loss_map,
            _CE_DICE,
            terms_fn=pixel.ce_dice_terms,
            activation="softmax",
        ),
        _spec("binary_ce", "binary", pixel.sigmoid_cross_entropy, pixel.sigmoid_cross_entropy_map),
        _spec("binary_focal", "binary", pixel.focal_loss, pixel.focal_loss_map, _FOCAL),
    )
}
LOSS_NAMES = tuple(_REGISTRY)
"""Names accepted by :func:`get_loss`."""


def get_loss(name: str, **hyperparameters) -> LossSpec:
    """The registered loss ``name``, with hyperparameters bound into ``fn`` and ``map_fn``.

    Args:
      name: one of :data:`LOSS_NAMES`.
      **hyperparameters: values for the names in the spec's ``hyperparameters`` (e.g. ``alpha``,
        ``gamma`` for focal losses); None keeps the loss's default.

    Returns:
      :class:`LossSpec`; ``spec.fn(logits, targets, valid=None)`` returns a scalar.

    >>> spec = get_loss("ordinal_focal", gamma=1.0)
    >>> spec.encoding, spec.fn.keywords
    ('ordinal', {'gamma': 1.0})
    """
    if name not in _REGISTRY:
        raise ValueError(f"name: unknown loss {name!r}; expected one of {LOSS_NAMES}")
    spec = _REGISTRY[name]
    given = {key: value for key, value in hyperparameters.items() if value is not None}
    unknown = sorted(set(given) - set(spec.hyperparameters))
    if unknown:
        raise ValueError(
            f"hyperparameters: loss {name!r} does not take {unknown}; "
            f"it takes {list(spec.hyperparameters)}"
        )
    if not given:
        return spec
    bind = functools.partial
    terms_fn = spec.terms_fn and bind(spec.terms_fn, **given)
    return spec._replace(
        fn=bind(spec.fn, **given), map_fn=bind(spec.map_fn, **given), terms_fn=terms_fn
    )


def _option_defaults() -> dict:
    """{hyperparameter: the default of the losses that take it} (the same for every such loss)."""
    defaults = {}
    for spec in _REGISTRY.values():
        parameters = inspect.signature(spec.fn).parameters
        for name in spec.hyperparameters:
            defaults.setdefault(name, parameters[name].default)
    return defaults


def check_loss_options(name: str, options) -> None:
    """Refuses a hyperparameter that loss `name` does not take, set to other than its default
    (e.g. `loss.alpha=0.25` with `sigmoid_ce`, `loss.eps=1e-5` with `focal`): the loss would
    train without it, so an arm meant to differ would silently repeat another. `options`: the
    config's `loss` section (keys that are not hyperparameters are ignored). None, for any
    hyperparameter, is refused: `get_loss` would bind the loss's default (`loss.pool_size=None`
    trained with pooling 3) while the run's config.json says null."""
    takes = get_loss(name).hyperparameters
    for option, default in _option_defaults().items():
        if option not in options:
            continue
        value = options[option]
        if value is None:
            raise ValueError(
                f"loss.{option}: expected a value, got None (the default is {default!r})"
            )
        if option in takes:
            continue
        same = tuple(value) == tuple(default) if isinstance(default, tuple) else value == default
        if not same:
            raise ValueError(
                f"loss.{option}={value!r}: loss {name!r} does not take {option} (it takes "
                f"{list(takes)}), so it would train without it; leave it at {default!r} or "
                "choose a loss that takes it"
            )


def batch_dice_options(spec: LossSpec) -> dict | None:
    """For a loss bound with ``batch_dice=True`` (`soft_dice`, `ce_dice`, `softmax_ce_dice`), the
    options that finish it from :func:`pixel.dice_sums` summed over many batches: ``eps``,
    ``activation``, ``dice_background`` and the weights ``ce`` and ``dice`` (`soft_dice`: 0 and
    1); None for every other loss (a mean over pixels or images, which per-image maps give).

    >>> batch_dice_options(get_loss("ce_dice", batch_dice=True, eps=1e-5))["eps"]
    1e-05
    >>> batch_dice_options(get_loss("ce_dice")) is None
    True
    """
    bound = {
        name: p.default
        for name, p in inspect.signature(spec.fn).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    if not bound.get("batch_dice"):
        return None
    ce, dice = bound.get("weights", (0.0, 1.0))
    keys = ("eps", "activation", "dice_background")
    return {key: bound[key] for key in keys} | {"ce": float(ce), "dice": float(dice)}
