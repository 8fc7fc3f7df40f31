"""The mutual finding loss of focalnet_jax.losses (Cao et al. 2019, eq. 3) against hand values and
the NumPy reference: the per-slice choice of subset, its gradients and ties, `select`; component
subsets and their inputs, the positive-bit ratio and the MFL weight."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from loss_reference import ref_mfl

from focalnet_jax import encoding, losses


def _mfl_example():
    """B=2, 2x2 pixels, K=2, two subsets; positive bits: slice 0 (0,0,bit 1); slice 1 (1,1,both).

    full = 0.8 everywhere. Slice 0: subset 0 has 0.6 there -> d = 0.2^2 = 0.04, subset 1 has 0.3
    -> 0.25: chooses 0. Slice 1: subset 0 has 0.2, 0.4 -> 0.36 + 0.16 = 0.52; subset 1 has 0.7, 0.9
    -> 0.01 + 0.01 = 0.02: chooses 1. MFL = mean(0.04, 0.02) / (2 * 2) = 0.0075.
    Every other subset output is 0 or 1, far from full, so counting them would change the result.
    """
    targets = np.zeros((2, 2, 2, 2), np.float32)
    targets[0, 0, 0, 0] = 1
    targets[1, 1, 1, :] = 1
    full = np.full((2, 2, 2, 2), 0.8, np.float32)
    subsets = np.zeros((2, 2, 2, 2, 2), np.float32)
    subsets[1] = 1.0
    subsets[0, 0, 0, 0, 0], subsets[1, 0, 0, 0, 0] = 0.6, 0.3
    subsets[0, 1, 1, 1], subsets[1, 1, 1, 1] = [0.2, 0.4], [0.7, 0.9]
    return full, subsets, targets


def test_mutual_finding_loss_hand_example_and_per_slice_choice():
    full, subsets, targets = _mfl_example()
    loss, chosen = losses.mutual_finding_loss(full, subsets, targets)
    np.testing.assert_allclose(loss, 0.0075, rtol=1e-6)
    np.testing.assert_array_equal(chosen, [0, 1])
    assert chosen.dtype == jnp.int32
    expected_loss, expected_chosen = ref_mfl(full, subsets, targets)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
    assert list(chosen) == expected_chosen


def test_mutual_finding_loss_ignores_pixels_outside_positive_bits():
    full, subsets, targets = _mfl_example()
    noise = np.random.default_rng(0).random(subsets.shape).astype(np.float32)
    changed = np.where(targets[None] == 1, subsets, noise)
    loss, chosen = losses.mutual_finding_loss(np.where(targets == 1, full, 0.1), changed, targets)
    np.testing.assert_allclose(loss, 0.0075, rtol=1e-6)
    np.testing.assert_array_equal(chosen, [0, 1])


def test_mutual_finding_loss_takes_the_tail_sums_of_a_onehot_output():
    # The softmax tail sums MFL compares for a one-hot model rounded above 1 where class 0 is
    # all but impossible, and mutual_finding_loss refused its own inputs outside jit.
    logits = np.random.default_rng(0).normal(size=(1, 8, 8, 6)).astype(np.float32)
    logits[..., 0] = -30.0
    full = losses.mfl_probs(jnp.asarray(logits), "onehot")
    subsets = losses.mfl_probs(jnp.asarray(logits[None] + 1.0), "onehot")
    targets = np.ones((1, 8, 8, 5), np.float32)
    loss, chosen = losses.mutual_finding_loss(full, subsets, targets)
    expected = np.sum((np.asarray(full) - np.asarray(subsets[0])) ** 2) / 64
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    assert chosen.tolist() == [0]


def test_mutual_finding_loss_gradients():
    full, subsets, targets = _mfl_example()
    grad_full = jax.grad(lambda f: losses.mutual_finding_loss(f, subsets, targets)[0])(full)
    assert np.all(np.asarray(grad_full) == 0.0)
    grad_sub = jax.grad(lambda s: losses.mutual_finding_loss(full, s, targets)[0])(subsets)
    # d/ds of mean_b d_b / (HW) = -2 y (full - s) / (B H W), on the chosen subset only.
    expected = np.zeros_like(subsets)
    for b, i in enumerate([0, 1]):
        expected[i, b] = -2 * targets[b] * (full[b] - subsets[i, b]) / (2 * 2 * 2)
    np.testing.assert_allclose(grad_sub, expected, atol=1e-7)


def test_mutual_finding_loss_valid_mask_removes_bits():
    full, subsets, targets = _mfl_example()
    valid = np.ones_like(targets)
    valid[1, 1, 1, 1] = 0  # slice 1 keeps bit 1 only: subset 0 -> 0.36, subset 1 -> 0.01
    loss, chosen = losses.mutual_finding_loss(full, subsets, targets, valid=valid)
    np.testing.assert_allclose(loss, (0.04 + 0.01) / 2 / 4, rtol=1e-6)
    np.testing.assert_array_equal(chosen, [0, 1])


def test_select_mode_matches_all_subsets():
    rng = np.random.default_rng(5)
    full = rng.random((3, 4, 4, 5)).astype(np.float32)
    subsets = rng.random((3, 3, 4, 4, 5)).astype(np.float32)
    targets = encoding.ordinal_encode(rng.integers(0, 6, (3, 4, 4)))
    loss, chosen = losses.mutual_finding_loss(full, subsets, targets)
    picked = losses.mfl_select(subsets, chosen)
    assert picked.shape == (3, 4, 4, 5)
    for b in range(3):
        np.testing.assert_array_equal(picked[b], subsets[int(chosen[b]), b])
    selected_loss, single = losses.mutual_finding_loss(full, picked[None], targets)
    np.testing.assert_allclose(selected_loss, loss, rtol=1e-6)
    np.testing.assert_array_equal(single, [0, 0, 0])


def test_component_subsets_default_order_and_validation():
    assert losses.component_subsets(("t2w", "adc")) == [("t2w",), ("adc",)]
    assert losses.component_subsets(["t2w", "adc", "hbv"]) == [
        ("t2w",),
        ("adc",),
        ("hbv",),
        ("t2w", "adc"),
        ("t2w", "hbv"),
        ("adc", "hbv"),
    ]
    given = losses.component_subsets(("t2w", "adc", "hbv"), [["adc", "t2w"], ("hbv",)])
    assert given == [("t2w", "adc"), ("hbv",)]


@pytest.mark.parametrize(
    "components, subsets, error, match",
    [
        (("t2w", "adc"), [], ValueError, "subsets: expected a non-empty list"),
        (("t2w", "adc"), [("dwi",)], ValueError, r"subsets\[0\]: unknown component.*dwi"),
        (("t2w", "adc"), [("t2w",), ()], ValueError, r"subsets\[1\]: expected a non-empty"),
        (("t2w", "adc"), [("t2w", "adc")], ValueError, r"subsets\[0\].*proper subset"),
        (("t2w", "adc"), [("adc",), ("adc",)], ValueError, r"subsets\[1\].*listed twice"),
        (("t2w", "adc"), ["t2w"], TypeError, r"subsets\[0\].*string"),
        (("t2w",), None, ValueError, "components: expected at least 2"),
        (("t2w", "t2w"), None, ValueError, "components"),
    ],
)
def test_component_subsets_bad_input(components, subsets, error, match):
    with pytest.raises(error, match=match):
        losses.component_subsets(components, subsets)


def test_subset_inputs_zero_the_other_components():
    images = np.arange(2 * 3 * 3 * 3, dtype=np.float32).reshape(2, 3, 3, 3) + 1
    out = losses.subset_inputs(images, ("t2w", "adc", "hbv"), [("adc",), ("t2w", "hbv")])
    assert out.shape == (2, 2, 3, 3, 3)
    np.testing.assert_array_equal(out[0], images * np.array([0, 1, 0]))
    np.testing.assert_array_equal(out[1], images * np.array([1, 0, 1]))
    assert losses.subset_inputs(images, ("t2w", "adc", "hbv")).shape == (6, 2, 3, 3, 3)
    with pytest.raises(ValueError, match="images: expected 2 channels"):
        losses.subset_inputs(images, ("t2w", "adc"), None)


def test_positive_bit_ratio_from_classes_memmap_and_bits(tmp_path):
    classes = np.zeros((5, 4, 4), np.uint8)
    classes[0, 0, :3] = [1, 3, 5]  # 1 + 3 + 5 = 9 ordinal one-bits
    classes[3, 2, 2] = 2  # 2 more
    grade_known = np.ones_like(classes)
    grade_known[0, 0, 2] = 0  # class-5 pixel of unknown grade: 2 known ones of 2 valid bits
    total_bits = classes.size * 5
    stored = np.memmap(tmp_path / "classes.u8", np.uint8, "w+", shape=classes.shape)
    stored[:] = classes
    for chunk_size in (1, 2, 64):
        ratio = losses.positive_bit_ratio(stored, chunk_size=chunk_size)
        assert ratio == pytest.approx(11 / total_bits)
        ratio = losses.positive_bit_ratio(classes, grade_known=grade_known, chunk_size=chunk_size)
        assert ratio == pytest.approx(8 / (total_bits - 3))
    bits = encoding.ordinal_encode(classes)
    valid = encoding.target_validity(grade_known, classes, "ordinal")
    assert losses.positive_bit_ratio(bits, valid=valid) == pytest.approx(8 / (total_bits - 3))
    assert losses.positive_bit_ratio(classes, encoding="binary") == pytest.approx(4 / 80)
    assert losses.mfl_weight(classes) == pytest.approx(total_bits / 11)
    with pytest.raises(ValueError, match="labels: no positive target bits"):
        losses.mfl_weight(np.zeros((2, 3, 3), np.uint8))
    with pytest.raises(ValueError, match="labels: expected classes in 0..5"):
        losses.positive_bit_ratio(np.full((2, 2), 7, np.uint8))
    with pytest.raises(ValueError, match="grade_known: expected the shape"):
        losses.positive_bit_ratio(classes, grade_known=grade_known[:2])
    rows = np.array([0, 3, 4])  # the three slices counted; 11 ones of which 3 bits invalid
    for chunk_size in (1, 2, 64):
        ratio = losses.positive_bit_ratio(
            stored, grade_known=grade_known, rows=rows, chunk_size=chunk_size
        )
        assert ratio == pytest.approx(8 / (3 * 16 * 5 - 3))
    assert losses.positive_bit_ratio(stored, rows=np.array([1, 2])) == 0.0
    with pytest.raises(ValueError, match="rows: expected a 1-D integer index"):
        losses.positive_bit_ratio(classes, rows=np.array([0.0, 1.0]))


def test_mutual_finding_loss_ties_train_the_first_subset_only():
    # Equal distances (here identical subset outputs, or a slice without lesions where every
    # distance is 0) choose the first subset, and only it receives the gradient, as `select`
    # recomputes only that one.
    full, subsets, targets = _mfl_example()
    tied = np.stack([subsets[1], subsets[1], subsets[0]])
    targets = targets.copy()
    targets[0] = 0  # slice 0: no positive bit, every distance 0
    loss, chosen = losses.mutual_finding_loss(full, tied, targets)
    np.testing.assert_array_equal(chosen, [0, 0])
    np.testing.assert_allclose(loss, 0.02 / 2 / 4, rtol=1e-6)  # slice 1 as subset 1 before
    grad = jax.grad(lambda s: losses.mutual_finding_loss(full, s, targets)[0])(tied)
    expected = np.zeros_like(tied)
    expected[0, 1] = -2 * targets[1] * (full[1] - tied[0, 1]) / (2 * 2 * 2)
    np.testing.assert_allclose(grad, expected, atol=1e-7)
    assert ref_mfl(full, tied, targets) == (pytest.approx(float(loss)), [0, 0])


@pytest.mark.parametrize("value", ["-130", -1.0, "nan", float("inf"), True])
def test_mfl_weight_must_be_auto_or_a_finite_non_negative_number(value):
    # A negative lambda would ascend MFL, a NaN or infinite one makes every step's loss NaN.
    with pytest.raises(ValueError, match=r"^loss\.mfl_weight: expected .*number"):
        losses.parse_mfl_weight(value)
    assert losses.parse_mfl_weight(" Auto ") is None
    assert losses.parse_mfl_weight("0") == 0.0 and losses.parse_mfl_weight(130) == 130.0


def test_mfl_select_traced_reads_no_other_subset_for_an_index_outside():
    select = jax.jit(losses.mfl_select)
    values = jnp.array([[10.0, 11.0], [20.0, 21.0]])
    for outside in (2, -1):  # clamped, or wrapped, to subset 1 (20) before
        picked = select(values, jnp.array([outside, 0]))
        assert np.isnan(picked[0]) and picked[1] == 11.0
    assert select(values.astype(jnp.int32), jnp.array([-1, 1])).tolist() == [0, 21]
