"""Tests of focalnet_jax.encoding: Table I of Cao et al. 2019, decoding and P(class >= k) scores."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from focalnet_jax import encoding

# Table I of the paper: class -> (one-hot, ordinal) bit strings.
TABLE_I = [
    (0, "100000", "00000"),
    (1, "010000", "10000"),
    (2, "001000", "11000"),
    (3, "000100", "11100"),
    (4, "000010", "11110"),
    (5, "000001", "11111"),
]


def _bits(text):
    return np.array([float(c) for c in text], np.float32)


@pytest.mark.parametrize("cls, onehot, ordinal", TABLE_I)
def test_table_one_vectors(cls, onehot, ordinal):
    np.testing.assert_array_equal(encoding.ordinal_encode(np.array(cls)), _bits(ordinal))
    np.testing.assert_array_equal(encoding.onehot_encode(np.array(cls)), _bits(onehot))
    np.testing.assert_array_equal(encoding.encode(np.array(cls), "binary"), _bits(ordinal[:1]))


@pytest.mark.parametrize("as_jax", [False, True])
def test_every_class_round_trips(as_jax):
    classes = np.arange(6, dtype=np.uint8).reshape(2, 3)
    if as_jax:
        classes = jnp.asarray(classes)
    ordinal = encoding.ordinal_encode(classes)
    onehot = encoding.onehot_encode(classes)
    assert isinstance(ordinal, jax.Array) == as_jax
    assert ordinal.shape == (2, 3, 5) and ordinal.dtype == np.float32
    assert onehot.shape == (2, 3, 6) and onehot.dtype == np.float32
    np.testing.assert_array_equal(encoding.ordinal_decode(ordinal), np.asarray(classes))
    np.testing.assert_array_equal(np.argmax(onehot, -1), np.asarray(classes))
    # Tail sums of a one-hot vector are exactly its ordinal bits.
    np.testing.assert_array_equal(encoding.onehot_scores(onehot), ordinal)
    np.testing.assert_array_equal(encoding.ordinal_scores(ordinal), ordinal)


def test_decode_uses_leading_ones_only():
    probs = np.array([[1, 0, 1, 0, 0], [0.9, 0.8, 0.2, 0.9, 0.9], [0.4, 1, 1, 1, 1]], np.float32)
    np.testing.assert_array_equal(encoding.ordinal_decode(probs), [1, 2, 0])
    assert encoding.ordinal_decode(probs).dtype == np.int32
    # threshold: "above" is strict.
    np.testing.assert_array_equal(encoding.ordinal_decode(np.full((1, 5), 0.5)), [0])
    np.testing.assert_array_equal(encoding.ordinal_decode(np.full((1, 5), 0.5), 0.4), [5])


def test_decode_under_jit():
    probs = jnp.array([[0.9, 0.9, 0.9, 0.1, 0.9]])
    np.testing.assert_array_equal(jax.jit(encoding.ordinal_decode)(probs), [3])


def test_onehot_scores_are_tail_sums():
    probs = np.array([0.1, 0.2, 0.3, 0.1, 0.2, 0.1], np.float32)
    np.testing.assert_allclose(encoding.onehot_scores(probs), [0.9, 0.7, 0.4, 0.3, 0.1], atol=1e-7)
    # A tiny top-class probability survives (1 - cumsum would round it to 0 in float32).
    tiny = np.array([1.0 - 1e-9, 0, 0, 0, 0, 1e-9], np.float32)
    assert encoding.onehot_scores(tiny)[-1] == np.float32(1e-9)


@pytest.mark.parametrize("as_jax", [False, True])
def test_onehot_scores_never_exceed_one(as_jax):
    # Class 0 all but impossible: the float32 sum of the other five softmax outputs rounded to
    # 1.0000001 on 9 of these 64 pixels, and the prediction file of a one-hot model with such a
    # pixel was refused ("'scores' must be finite probabilities in [0, 1]").
    logits = np.random.default_rng(0).normal(size=(1, 8, 8, 6)).astype(np.float32)
    logits[..., 0] = -30.0
    outputs = jnp.asarray(logits) if as_jax else logits
    scores = np.asarray(encoding.scores_from_outputs(outputs, "onehot", from_logits=True))
    assert scores.dtype == np.float32 and scores.max() <= 1.0
    np.testing.assert_allclose(scores[..., 0], 1.0, rtol=0, atol=1e-6)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    assert np.asarray(encoding.onehot_scores(jnp.asarray(probs) if as_jax else probs)).max() <= 1


def test_num_outputs_and_encode_shapes():
    assert encoding.ENCODINGS == ("ordinal", "onehot", "binary")
    classes = np.array([[0, 2], [5, 1]])
    for name, k in (("ordinal", 5), ("onehot", 6), ("binary", 1)):
        assert encoding.num_outputs(name) == k
        assert encoding.encode(classes, name).shape == (2, 2, k)
    np.testing.assert_array_equal(encoding.encode(classes, "binary")[..., 0], [[0, 1], [1, 1]])


def test_target_validity_marks_grade_bits_of_grade_unknown_lesions():
    classes = np.array([0, 2, 2, 4])
    grade_known = np.array([0, 0, 1, 1], bool)  # background with 0 stays valid
    expected = {
        "ordinal": [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]],
        "onehot": [[1] * 6, [1, 1, 0, 0, 0, 0], [1] * 6, [1] * 6],
        "binary": [[1], [1], [1], [1]],
    }
    for name, valid in expected.items():
        got = encoding.target_validity(grade_known, classes, name)
        np.testing.assert_array_equal(got, np.array(valid, np.float32))
        assert got.dtype == np.float32
    # Known bits of a grade-unknown lesion stored as class 2: csPCa, i.e. ordinal 1,1.
    bits = encoding.encode(classes, "ordinal") * encoding.target_validity(
        grade_known, classes, "ordinal"
    )
    np.testing.assert_array_equal(bits[1], [1, 1, 0, 0, 0])


def test_scores_from_outputs_per_encoding():
    zeros = jnp.zeros((2, 3, 3))
    ordinal = encoding.scores_from_outputs(jnp.zeros((2, 3, 5)), "ordinal", from_logits=True)
    np.testing.assert_allclose(ordinal, np.full((2, 3, 5), 0.5))
    onehot = encoding.scores_from_outputs(jnp.zeros((2, 3, 6)), "onehot", from_logits=True)
    np.testing.assert_allclose(onehot[0, 0], [5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6], rtol=1e-6)
    binary = encoding.scores_from_outputs(zeros[..., :1] + np.log(3.0), "binary", from_logits=True)
    np.testing.assert_allclose(binary, np.full((2, 3, 5), 0.75), rtol=1e-6)
    probs = np.array([[0.7, 0.1, 0.1, 0.05, 0.04, 0.01]], np.float32)
    np.testing.assert_allclose(
        encoding.scores_from_outputs(probs, "onehot", from_logits=False),
        [[0.3, 0.2, 0.1, 0.05, 0.01]],
        atol=1e-7,
    )
    # Large logits stay finite (sigmoid and softmax are overflow-safe in NumPy too).
    big = np.array([[1e4, -1e4, 0, 0, 0, 0]], np.float32)
    assert np.all(np.isfinite(encoding.scores_from_outputs(big, "onehot", from_logits=True)))
    np.testing.assert_array_equal(
        encoding.scores_from_outputs(big[:, :5], "ordinal", from_logits=True)[0, :2], [1, 0]
    )


@pytest.mark.parametrize(
    "call, error, argument",
    [
        (lambda: encoding.ordinal_encode(np.array([0.0, 1.0])), TypeError, "classes"),
        (lambda: encoding.ordinal_encode(np.array([0, 6])), ValueError, "classes"),
        (lambda: encoding.onehot_encode(np.array([-1, 2])), ValueError, "classes"),
        (lambda: encoding.onehot_encode(np.array([1]), num_classes=1), ValueError, "num_classes"),
        (lambda: encoding.ordinal_decode(np.array(["a"])), TypeError, "probs"),
        (lambda: encoding.onehot_scores(np.array([0.5, 1.5])), ValueError, "probs"),
        (lambda: encoding.ordinal_scores(np.array([1, 0])), TypeError, "probs"),
        (lambda: encoding.encode(np.array([1]), "softmax"), ValueError, "encoding"),
        (lambda: encoding.num_outputs("ordinal5"), ValueError, "encoding"),
        (
            lambda: encoding.target_validity(np.ones(3), np.array([1, 2, 3]), "ordinal"),
            TypeError,
            "grade_known",
        ),
        (
            lambda: encoding.target_validity(np.ones(2, int), np.array([1, 2, 3]), "ordinal"),
            ValueError,
            "grade_known",
        ),
        (
            lambda: encoding.scores_from_outputs(np.zeros((2, 5)), "onehot", from_logits=True),
            ValueError,
            "outputs",
        ),
        (
            lambda: encoding.scores_from_outputs(
                np.full((2, 5), 2.0), "ordinal", from_logits=False
            ),
            ValueError,
            "outputs",
        ),
    ],
)
def test_bad_input_names_the_argument(call, error, argument):
    with pytest.raises(error, match=argument):
        call()


@pytest.mark.parametrize("as_jax", [False, True])
@pytest.mark.parametrize("enc", ["ordinal", "binary"])
def test_sigmoid_scores_keep_relative_precision_of_small_probabilities(as_jax, enc):
    # P(class >= k) ranks detections (GS ROC, FROC thresholds), so a small probability must keep
    # its relative precision rather than round to a multiple of float32's epsilon near 1.
    logits = np.array([-5.0, -10.0, -12.0, -16.0, -20.0, -30.0, -80.0, 0.0, 12.0], np.float64)
    reference = 1.0 / (1.0 + np.exp(-logits))  # float64, exact to float32 precision here
    k = encoding.num_outputs(enc)
    outputs = np.repeat(logits[:, None], k, axis=1).astype(np.float32)
    scores = encoding.scores_from_outputs(
        jnp.asarray(outputs) if as_jax else outputs, enc, from_logits=True
    )
    np.testing.assert_allclose(np.asarray(scores)[:, 0], reference, rtol=1e-5, atol=0)
    assert np.all(np.diff(np.asarray(scores)[:7, 0]) < 0)  # strictly ordered, no ties at 0


def test_arrays_closed_over_by_a_jitted_function():
    """A concrete JAX array captured by a traced function (a fixed label batch closed over by a
    jitted loss): its value check ran `min()` on it, which jit stages, and ended in a
    ConcretizationTypeError."""
    classes = jnp.array([0, 3])
    probs = jnp.array([[0.9, 0.2, 0.1, 0.0, 0.0]])
    cases = [
        (encoding.ordinal_encode, classes, [[0, 0, 0, 0, 0], [1, 1, 1, 0, 0]]),
        (encoding.onehot_encode, classes, [[1, 0, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0]]),
        (encoding.ordinal_scores, probs, [[0.9, 0.2, 0.1, 0.0, 0.0]]),
    ]
    for function, captured, expected in cases:
        traced = jax.jit(lambda scale, f=function, x=captured: scale * f(x))(1.0)
        np.testing.assert_allclose(traced, expected, rtol=1e-6)
