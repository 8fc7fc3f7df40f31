"""Bad arguments to the losses of focalnet_jax.losses: each error names the argument; NumPy and JAX
scalars are range-checked like Python floats, traced ones pass unchecked when scalar."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from focalnet_jax import losses

_X = np.zeros((1, 2, 2, 5), np.float32)
_Y = np.zeros((1, 2, 2, 5), np.float32)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: losses.ordinal_focal_loss(_X.astype(np.int32), _Y), TypeError, "logits"),
        (lambda: losses.ordinal_focal_loss(_X[0], _Y[0]), ValueError, "logits"),
        (lambda: losses.ordinal_focal_loss(_X, _Y[..., :4]), ValueError, "targets: expected shape"),
        (lambda: losses.ordinal_focal_loss(_X, _Y + 0.5), ValueError, "targets: expected only 0/1"),
        (lambda: losses.ordinal_focal_loss(_X, _Y, valid=_Y[:, :1]), ValueError, "valid"),
        (lambda: losses.ordinal_focal_loss(_X, _Y, valid=_Y + 2), ValueError, "valid"),
        (lambda: losses.ordinal_focal_loss(_X, _Y.astype(str)), TypeError, "targets"),
        (lambda: losses.ordinal_focal_loss(_X, _Y, alpha=1.5), ValueError, "alpha"),
        (lambda: losses.ordinal_focal_loss(_X, _Y, gamma=-1.0), ValueError, "gamma"),
        (lambda: losses.ordinal_focal_loss(_X, _Y, pool_size=2), ValueError, "pool_size"),
        (lambda: losses.ordinal_focal_loss(_X, _Y, pool_size=-1), ValueError, "pool_size"),
        (lambda: losses.ordinal_focal_loss(_X, _Y, pool_size=-3), ValueError, "pool_size"),
        (lambda: losses.sigmoid_cross_entropy(_X, _Y - 1), ValueError, "targets"),
        (lambda: losses.focal_loss(_X, _Y[..., :1]), ValueError, "targets"),
        (lambda: losses.softmax_cross_entropy(_X.astype(np.int8), _Y), TypeError, "logits"),
        (lambda: losses.soft_dice_loss(_X, _Y, activation="relu"), ValueError, "activation"),
        (lambda: losses.mutual_finding_loss(_X, _X, _Y), ValueError, "subset_probs"),
        (lambda: losses.mutual_finding_loss(_X, _X[None] + 3, _Y), ValueError, "subset_probs"),
        (lambda: losses.mutual_finding_loss(_X - 1, _X[None], _Y), ValueError, "full_probs"),
        (lambda: losses.mutual_finding_loss(_X, _X[None], _Y + 3), ValueError, "targets"),
        (lambda: losses.mfl_select(_X[None], np.zeros(2, int)), ValueError, "chosen"),
        # An index past the subsets was clamped to the last, -1 wrapped to it: another subset.
        (
            lambda: losses.mfl_select(np.zeros((2, 3)), np.array([0, 2, -1])),
            ValueError,
            r"chosen: expected subsets in 0\.\.1, got \[ 2 -1\]",
        ),
        (lambda: losses.positive_bit_ratio(_Y.astype(str)), TypeError, "labels"),
    ],
)
def test_bad_input_names_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: losses.ordinal_focal_loss(_X, _Y, gamma=np.float32(-1)), "gamma: .* >= 0.0"),
        (lambda: losses.ordinal_focal_loss(_X, _Y, gamma=jnp.array(-1.0)), "gamma: .* >= 0.0"),
        (lambda: losses.focal_loss(_X, _Y, gamma=np.float32("nan")), "gamma: .*finite"),
        (lambda: losses.focal_loss(_X, _Y, alpha=np.float32(1.5)), r"alpha: .*\[0.0, 1.0\]"),
        (lambda: losses.soft_dice_loss(_X, _Y, eps=np.float32(0)), "eps: .* >= 1e-12"),
        (lambda: losses.ce_focal_loss(_X, _Y, weights=(np.float32(-1), 1)), "weights"),
        # Not a number: a one-element array (alpha 2 weighted the negative bits by -1, unchecked),
        # None or a string (a TypeError inside JAX that named no option).
        (lambda: losses.focal_loss(_X, _Y, alpha=np.array([2.0])), r"alpha: .*real number"),
        (lambda: losses.ordinal_focal_loss(_X, _Y, gamma=np.array([-1.0])), "gamma: .*real"),
        (lambda: losses.soft_dice_loss(_X, _Y, eps=jnp.array([0.0])), "eps: .*real number"),
        (lambda: losses.focal_loss(_X, _Y, alpha=None), "alpha: expected a real number, got None"),
        (lambda: losses.focal_loss(_X, _Y, gamma="2"), "gamma: expected a real number, got '2'"),
        (lambda: losses.focal_loss(_X, _Y, gamma=(2.0,)), r"gamma: .*got \(2.0,\)"),
    ],
)
def test_numpy_and_jax_scalars_are_range_checked_like_python_floats(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_traced_hyperparameters_pass_unchecked_when_scalar():
    expected = losses.focal_loss(_X, _Y, gamma=1.5)
    traced = jax.jit(lambda gamma: losses.focal_loss(_X, _Y, gamma=gamma))(1.5)
    np.testing.assert_allclose(traced, expected, rtol=1e-6)
    with pytest.raises(ValueError, match=r"gamma: expected a scalar, got shape \(1,\)"):
        jax.jit(lambda gamma: losses.focal_loss(_X, _Y, gamma=gamma))(jnp.ones(1))


def test_numpy_integer_pool_size_and_weights_are_accepted():
    expected = losses.ordinal_focal_loss(_X, _Y, pool_size=3)
    np.testing.assert_allclose(losses.ordinal_focal_loss(_X, _Y, pool_size=np.int64(3)), expected)
    weighted = losses.ce_focal_loss(_X, _Y, weights=(np.float32(2), 1.0))
    np.testing.assert_allclose(weighted, losses.ce_focal_loss(_X, _Y, weights=(2.0, 1.0)))
