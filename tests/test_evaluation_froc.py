"""Localisation, the 5 mm hit rule and FROC on hand-built cases small enough to count by hand."""

from __future__ import annotations

import dataclasses
import logging
from fractions import Fraction

import numpy as np
import pytest
from scipy import ndimage

from focalnet_jax.errors import UserError
from focalnet_jax.evaluation.evaluate import evaluate_predictions
from focalnet_jax.evaluation.froc import (
    count_patients,
    fp_at_sensitivity,
    froc_analysis,
    froc_curve,
    lesion_table,
    partial_auc,
    sensitivity_at,
)
from focalnet_jax.evaluation.localization import Detections, local_maxima, window_radius
from focalnet_jax.evaluation.matching import lesion_diameters, lesion_hits, summarize_case
from focalnet_jax.evaluation.predictions import CasePredictions, write_case


def make_case(case_id, patient_id, shape, boxes=(), peaks=(), spacing=(1.0, 1.0)):
    """A case with rectangular lesions and single-pixel score peaks on a zero background.

    boxes: (slice, row0, row1, col0, col1, class), inclusive bounds, lesion ids in order.
    peaks: (slice, row, col, s1) or (slice, row, col, [s1..s5]).
    """
    scores = np.zeros((*shape, 5), np.float32)
    lesions = np.zeros(shape, np.int32)
    for lesion_id, (z, r0, r1, c0, c1, _) in enumerate(boxes, 1):
        lesions[z, r0 : r1 + 1, c0 : c1 + 1] = lesion_id
    for z, r, c, s in peaks:
        scores[z, r, c] = np.broadcast_to(np.asarray(s, np.float32), (5,))
    return CasePredictions(
        case_id=case_id,
        patient_id=patient_id,
        scores=scores,
        lesions=lesions,
        lesion_classes=np.asarray([b[-1] for b in boxes], np.int32),
        spacing=np.asarray(spacing, np.float64),
    )


def detections_at(points):
    points = np.asarray(points, np.int32).reshape(-1, 3)
    return Detections(
        slice=points[:, 0],
        row=points[:, 1],
        col=points[:, 2],
        scores=np.ones((len(points), 5), np.float32),
    )


# --- localisation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spacing, expected", [((0.625, 0.625), (8, 8)), ((1.0, 1.0), (5, 5)), ((2.0, 0.5), (3, 10))]
)
def test_window_radius_rounds_half_up(spacing, expected):
    # 5 / 0.625 = 8; 5 / 2 = 2.5 -> 3 (halves round up); 5 / 0.5 = 10.
    assert window_radius(spacing) == expected


@pytest.mark.parametrize("crop_mm, size, expected", [(80, 120, 8), (80, 200, 13), (80, 128, 8)])
def test_window_radius_of_a_float32_spacing_rounds_half_up(crop_mm, size, expected):
    """A crop of 80 mm on 120 pixels: 5 mm = 7.5 pixels, 8 rounded half up. The predictions file
    stores the spacing as float32 (0.6666667 > 2/3): 7.4999997 pixels, which rounded down to 7,
    so `evaluate` used a smaller window than `predict` (float64 spacing) and the SPEC."""
    spacing = np.float32(crop_mm / size)
    assert window_radius((spacing, spacing)) == (expected, expected)
    assert window_radius((crop_mm / size,) * 2) == (expected, expected)
    scores = np.zeros((1, size, size, 5), np.float32)
    scores[0, 40, 40], scores[0, 40, 40 + expected] = 0.9, 0.5  # r pixels apart: one window
    assert len(local_maxima(scores, (spacing, spacing))) == 1


def test_local_maxima_window_border_and_min_score():
    scores = np.zeros((2, 40, 40, 5), np.float32)
    s1 = scores[..., 0]
    s1[0, 10, 10] = 0.9
    s1[0, 10, 18] = 0.5  # 8 px = 5 mm at 0.625 mm: inside the 17 x 17 window of 0.9 -> suppressed
    s1[0, 30, 10] = 0.5
    s1[0, 30, 19] = 0.4  # 9 px away from 0.5: outside its window -> kept
    s1[1, 0, 39] = 0.2  # corner: zero padding outside the image -> kept
    s1[1, 20, 5] = 1e-3  # not above min_score
    s1[1, 20, 25] = 2e-3
    scores[1, 0, 39, 1:] = [0.1, 0.05, 0.02, 0.01]
    det = local_maxima(scores, (0.625, 0.625))
    got = list(zip(det.slice.tolist(), det.row.tolist(), det.col.tolist(), strict=True))
    assert got == [(0, 10, 10), (0, 30, 10), (0, 30, 19), (1, 0, 39), (1, 20, 25)]
    np.testing.assert_allclose(det.scores[:, 0], [0.9, 0.5, 0.4, 0.2, 2e-3])
    np.testing.assert_allclose(det.scores[3], [0.2, 0.1, 0.05, 0.02, 0.01])


def _points(det):
    return list(zip(det.slice.tolist(), det.row.tolist(), det.col.tolist(), strict=True))


def _window_max_count(s1, radius):
    """Window-maximum pixels counted one by one (the rule before flat maxima were grouped)."""
    size = (1, 2 * radius + 1, 2 * radius + 1)
    window_max = ndimage.maximum_filter(s1, size=size, mode="constant", cval=0.0)
    return int(((s1 == window_max) & (s1 > 1e-3)).sum())


def test_border_strip_of_four_pixels_is_one_detection():
    scores = np.zeros((1, 20, 20, 5), np.float32)
    scores[0, 0, 8:12] = [0.7, 0.3, 0.2, 0.1, 0.05]  # row 0, columns 8..11
    assert _window_max_count(scores[..., 0], 5) == 4
    det = local_maxima(scores, (1.0, 1.0))
    # Centroid (0, 9.5): columns 9 and 10 are 0.5 px from it; the lower column wins.
    assert _points(det) == [(0, 0, 9)]
    np.testing.assert_allclose(det.scores, [[0.7, 0.3, 0.2, 0.1, 0.05]])


def test_corner_block_of_four_by_four_is_one_detection():
    """The worked example of docs/evaluation.md (Localisation)."""
    scores = np.zeros((1, 20, 20, 5), np.float32)
    scores[0, :5, :5, 0] = 0.5
    scores[0, 4, 4, 0] = 0.4
    scores[0, :4, :4, 0] = 0.6
    assert _window_max_count(scores[..., 0], 5) == 16
    # Centroid (1.5, 1.5): four pixels at equal distance; lowest row, then lowest column.
    det = local_maxima(scores, (1.0, 1.0))
    assert _points(det) == [(0, 1, 1)]
    np.testing.assert_allclose(det.scores[:, 0], [0.6])


@pytest.mark.parametrize(
    "pixels, expected",
    [
        ([(4, 4), (4, 5), (5, 4), (5, 5)], (4, 4)),  # 2 x 2: all at sqrt(0.5) px -> lowest row, col
        ([(3, 7), (4, 7), (5, 7)], (4, 7)),  # vertical strip: the middle pixel
        # L shape: centroid (2.6, 2.6); (2, 3) and (3, 2) are both sqrt(0.52) px away, the corner
        # (2, 2) sqrt(0.72) px: the lower row wins.
        ([(2, 2), (2, 3), (2, 4), (3, 2), (4, 2)], (2, 3)),
        ([(6, 6), (7, 7), (8, 8)], (7, 7)),  # diagonal neighbours touch (8-connectivity)
    ],
)
def test_flat_maximum_is_placed_at_the_pixel_nearest_its_centroid(pixels, expected):
    scores = np.zeros((1, 12, 12, 5), np.float32)
    for r, c in pixels:
        scores[0, r, c, 0] = 0.5
    assert _points(local_maxima(scores, (1.0, 1.0))) == [(0, *expected)]


def test_equal_peaks_that_do_not_touch_are_separate_detections():
    scores = np.zeros((2, 30, 30, 5), np.float32)
    scores[0, 5, 5, 0] = scores[0, 5, 17, 0] = 0.7  # 12 px apart: outside each other's window
    scores[1, 5, 5, 0] = scores[1, 5, 7, 0] = 0.7  # inside the window but not touching
    scores[1, 5, 6, 0] = 0.2
    det = local_maxima(scores, (1.0, 1.0))
    assert _points(det) == [(0, 5, 5), (0, 5, 17), (1, 5, 5), (1, 5, 7)]


def test_flat_maxima_on_adjacent_slices_are_not_joined():
    scores = np.zeros((2, 10, 10, 5), np.float32)
    scores[:, 4:6, 4, 0] = 0.8
    assert _points(local_maxima(scores, (1.0, 1.0))) == [(0, 4, 4), (1, 4, 4)]


def _flat_maxima_reference(maxima):
    """Flood fill of each 8-connected group and an exact (Fraction) centroid, pixel by pixel."""
    points = []
    seen = np.zeros_like(maxima)
    for start in zip(*np.nonzero(maxima), strict=True):
        if seen[start]:
            continue
        group, stack = [], [start]
        seen[start] = True
        while stack:
            z, r, c = stack.pop()
            group.append((r, c))
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    q = (z, r + dr, c + dc)
                    inside = 0 <= q[1] < maxima.shape[1] and 0 <= q[2] < maxima.shape[2]
                    if inside and maxima[q] and not seen[q]:
                        seen[q] = True
                        stack.append(q)
        cy = Fraction(sum(r for r, _ in group), len(group))
        cx = Fraction(sum(c for _, c in group), len(group))
        r, c = min(group, key=lambda p: ((p[0] - cy) ** 2 + (p[1] - cx) ** 2, p[0], p[1]))
        points.append((int(start[0]), int(r), int(c)))
    return sorted(points)


def test_flat_maxima_match_a_flood_fill_reference():
    rng = np.random.default_rng(0)
    # Coarse random levels in 3 x 3 blocks: many plateaus of odd shapes, some touching diagonally.
    coarse = rng.integers(0, 4, (3, 10, 10)) / 4.0
    s1 = np.kron(coarse, np.ones((1, 3, 3)))[:, :28, :27] * rng.choice([1.0, 0.9], (3, 28, 27))
    scores = np.repeat(s1[..., None], 5, axis=-1).astype(np.float32)
    det = local_maxima(scores, (5.0, 5.0))  # r = 1 pixel
    window_max = ndimage.maximum_filter(s1.astype(np.float32), size=(1, 3, 3), mode="constant")
    maxima = (scores[..., 0] == window_max) & (scores[..., 0] > 1e-3)
    expected = _flat_maxima_reference(maxima)
    assert len(expected) > 20 and len(expected) < maxima.sum()  # real groups, not single pixels
    assert sorted(_points(det)) == expected


def test_bilinear_upsampling_flat_tops_count_once():
    """Score maps made like a network's: a 16 x 16 logit map upsampled x8 (half-pixel centres,
    edges clamped) has flat tops of 4 x 4 pixels at a corner bump and 2 x 2 at an interior one."""
    import jax

    logits = np.full((16, 16), -8.0, np.float32)  # s1 = 3e-4: below min_score
    logits[0, 0] = -2.0  # weak corner bump
    logits[8, 8] = 1.0  # interior peak
    up = np.asarray(jax.image.resize(logits, (128, 128), "bilinear"))
    s1 = 1.0 / (1.0 + np.exp(-up.astype(np.float64)))
    scores = np.repeat(s1[None, ..., None], 5, axis=-1).astype(np.float32)
    assert _window_max_count(scores[..., 0], 5) == 16 + 4
    det = local_maxima(scores, (1.0, 1.0))
    # Input pixel i has its centre at output coordinate 8 i + 3.5.
    assert _points(det) == [(0, 67, 67), (0, 1, 1)]


def test_plateau_on_a_lesion_is_one_hit_and_a_plateau_off_it_one_fp():
    case = make_case("c", "p", (1, 60, 60), boxes=[(0, 10, 20, 10, 20, 2)])
    case.scores[0, 14:17, 14:17] = 0.8  # 3 x 3 plateau inside the lesion
    case.scores[0, 40:42, 40:42] = 0.5  # 2 x 2 plateau far from it
    assert _window_max_count(case.scores[..., 0], 5) == 9 + 4
    summary = summarize_case(case)
    assert _points(summary.detections) == [(0, 15, 15), (0, 40, 40)]
    assert summary.fp_scores.tolist() == [0.5]
    assert summary.lesion_score.tolist() == [pytest.approx(0.8)]
    froc = froc_analysis([summary])
    assert froc["all"]["curve"]["sensitivity"].tolist() == [1.0, 1.0]
    assert froc["all"]["curve"]["fp"].tolist() == [0.0, 1.0]


def test_reach_of_a_flat_maximum_is_its_farthest_pixel_in_mm():
    """A 3 x 7 plateau at 0.5 x 2 mm pixels: its point is the centre pixel (row 1, column 3),
    the farthest pixels 1 row and 3 columns away: sqrt(0.5^2 + 6^2) mm. A single pixel: 0."""
    scores = np.zeros((1, 20, 20, 5), np.float32)
    scores[0, 5:8, 5:12] = 0.9
    scores[0, 16, 16] = 0.4
    det = local_maxima(scores, (0.5, 2.0), radius_mm=1.0)
    assert _points(det) == [(0, 6, 8), (0, 16, 16)]
    np.testing.assert_allclose(det.reach_mm, [np.hypot(0.5, 6.0), 0.0], rtol=1e-6)


def test_a_saturated_plateau_over_two_lesions_is_one_point_and_counted_in_metrics(tmp_path, caplog):
    """Scores of 1.0 (float32 sigmoid of a logit >= 17) over two lesions 15 mm apart are one flat
    maximum, one detection midway, which hits neither (SPEC: one detection per flat maximum);
    unsaturated, the two peaks are two hits. The evaluation counts such detections and says so."""
    yy, xx = np.mgrid[:64, :64]
    bumps = np.maximum(
        np.exp(-((yy - 32) ** 2 + (xx - 16) ** 2) / 200.0),
        np.exp(-((yy - 32) ** 2 + (xx - 40) ** 2) / 200.0),
    )
    boxes = [(0, 30, 33, 14, 17, 2), (0, 30, 33, 38, 41, 2)]
    counts = {}
    for name, s1 in (("unsaturated", 0.45 * bumps), ("saturated", np.minimum(1.0, 3 * bumps))):
        case = make_case("c", "p", (1, 64, 64), boxes=boxes, spacing=(0.625, 0.625))
        case.scores[0] = s1[..., None]
        summary = summarize_case(case)
        counts[name] = (len(summary.detections), int(np.isfinite(summary.lesion_score).sum()))
        if name == "saturated":
            assert float(summary.detections.reach_mm[0]) > 5.0
    assert counts == {"unsaturated": (2, 2), "saturated": (1, 0)}
    write_case(
        tmp_path / "preds", "c", scores=case.scores, lesions=case.lesions,
        lesion_classes=case.lesion_classes, spacing=case.spacing, patient_id="p",
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="focalnet_jax.evaluation.evaluate"):
        metrics = evaluate_predictions(tmp_path / "preds", tmp_path / "eval", with_picai=False)
    assert metrics["wide_flat_maxima"] == 1
    warned = [r.getMessage() for r in caplog.records if "flat maximum reaching" in r.message]
    assert len(warned) == 1 and "case c, slice 0" in warned[0]


def test_a_radius_under_half_a_pixel_is_refused():
    """Its window is one pixel: every pixel above min_score was a maximum, and the touching ones
    one detection with the score at its centroid (0.004 for peaks of 0.9 and 0.6)."""
    scores = np.zeros((1, 20, 20, 5), np.float32)
    scores[0, 5, 5] = 0.9
    with pytest.raises(UserError, match=r"radius_mm 0.3 is under half a pixel \(spacing 0.625 x"):
        local_maxima(scores, (0.625, 0.625), radius_mm=0.3)
    assert len(local_maxima(scores, (0.625, 0.625), radius_mm=0.32)) == 1  # rounds to 1 pixel


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"radius_mm": -5.0}, "radius_mm -5.0: expected a positive distance in mm, at most 1000"),
        ({"radius_mm": 1e19},
         r"radius_mm 1e\+19: expected a positive distance in mm, at most 1000"),
        ({"min_score": -0.5}, r"min_score -0.5: expected a probability in \[0, 1\)"),
        ({"min_score": 1.5}, r"min_score 1.5: expected a probability in \[0, 1\)"),
    ],
)  # fmt: skip
def test_evaluate_predictions_refuses_settings_out_of_range(tmp_path, setting, message):
    """The Python API took any radius and floor: -5 mm or 1e19 mm (the window radius overflowed)
    missed a detection inside its lesion, a floor of -0.5 made score-0 plateaus detections, 1.5
    left an empty curve; nothing said so."""
    write_case(tmp_path / "p", "c0", scores=np.zeros((1, 16, 16, 5), np.float32),
               lesions=np.zeros((1, 16, 16), np.int32), lesion_classes=[], spacing=(1.0, 1.0),
               patient_id="a")  # fmt: skip
    with pytest.raises(UserError, match="^" + message + "$"):
        evaluate_predictions(tmp_path / "p", with_picai=False, with_figures=False, **setting)


# --- hit rule -------------------------------------------------------------------------------------


def test_hit_at_exactly_5mm_and_miss_at_5_1mm():
    lesions = np.zeros((1, 30, 30), np.int32)
    lesions[0, 10:13, 10:13] = 1  # rows/cols 10..12
    points = [(0, 11, 17), (0, 16, 16), (0, 11, 11), (0, 11, 18)]
    # (0, 11, 17): 5 px right of col 12; (0, 16, 16): (4, 4) px from (12, 12) = 5.66 px;
    # (0, 11, 11): inside (0 mm); (0, 11, 18): 6 px.
    hits = lesion_hits(detections_at(points), lesions, (1.0, 1.0), 1)
    assert hits[:, 0].tolist() == [True, False, True, False]
    # 5 px at 1.02 mm is 5.1 mm: a miss; at 1.0 mm it was exactly 5 mm: a hit.
    hits = lesion_hits(detections_at(points[:1]), lesions, (1.02, 1.02), 1)
    assert hits[:, 0].tolist() == [False]
    # Diagonal 3-4-5: (15, 16) is (3, 4) px from the corner pixel (12, 12).
    hits = lesion_hits(detections_at([(0, 15, 16)]), lesions, (1.0, 1.0), 1)
    assert hits[:, 0].tolist() == [True]
    # Anisotropic: 5 rows of 1.0 mm hit; with 1.02 mm rows and 0.5 mm columns they do not.
    hits = lesion_hits(detections_at([(0, 17, 11)]), lesions, (1.02, 0.5), 1)
    assert hits[:, 0].tolist() == [False]


def test_detection_on_wrong_slice_misses():
    lesions = np.zeros((3, 30, 30), np.int32)
    lesions[1, 10:13, 10:13] = 1
    hits = lesion_hits(detections_at([(0, 11, 11), (1, 11, 11), (2, 11, 11)]), lesions, (1, 1), 1)
    assert hits[:, 0].tolist() == [False, True, False]


def test_two_points_on_one_lesion_count_once_and_no_fp():
    case = make_case(
        "c",
        "p",
        (1, 60, 60),
        boxes=[(0, 10, 40, 10, 20, 2)],
        peaks=[(0, 12, 15, 0.6), (0, 38, 15, 0.8)],
    )
    summary = summarize_case(case)
    assert len(summary.detections) == 2
    assert summary.fp_scores.size == 0
    assert summary.lesion_score.tolist() == [pytest.approx(0.8)]
    froc = froc_analysis([summary])
    # Thresholds 0.8 and 0.6: the lesion is detected at both, no FP.
    assert froc["all"]["curve"]["sensitivity"].tolist() == [1.0, 1.0]
    assert froc["all"]["curve"]["fp"].tolist() == [0.0, 0.0]


def test_lesion_diameters_and_index_tie_break():
    lesions = np.zeros((2, 40, 40), np.int32)
    lesions[0, 5:8, 5:8] = 1  # 3 x 3: diagonal between pixel centres 2 * sqrt(2)
    lesions[1, 20:28, 20:22] = 2  # 8 x 2: diameter sqrt(7^2 + 1^2)
    np.testing.assert_allclose(
        lesion_diameters(lesions, (1.0, 1.0), 3), [2 * np.sqrt(2), np.sqrt(50), 0.0]
    )
    # Patient p: two class-2 lesions in two cases; the larger one (case b) is the index lesion.
    a = make_case("a", "p", (1, 40, 40), boxes=[(0, 5, 7, 5, 7, 2), (0, 20, 22, 20, 22, 1)])
    b = make_case("b", "p", (1, 40, 40), boxes=[(0, 5, 12, 5, 12, 2)])
    c = make_case("c", "q", (1, 40, 40), boxes=[(0, 5, 7, 5, 7, 1), (0, 20, 21, 20, 21, 1)])
    table = lesion_table([summarize_case(x) for x in (a, b, c)])
    assert table.classes.tolist() == [2, 1, 2, 1, 1]
    assert table.index.tolist() == [False, False, True, True, False]


# --- FROC of a 3-patient example ------------------------------------------------------------------


def three_patients():
    """Patient A: a GS 4+3 lesion hit at 0.9, a GS 3+3 lesion hit at 0.3, a FP at 0.6.
    Patient B: a GS 3+4 lesion hit at 0.5 (exactly 5 mm away), FPs at 0.8 and 0.2.
    Patient C: no lesion, FPs at 0.7 and 0.4."""
    a = make_case(
        "A",
        "A",
        (1, 64, 64),
        boxes=[(0, 10, 14, 10, 14, 3), (0, 40, 44, 40, 44, 1)],
        peaks=[(0, 12, 12, 0.9), (0, 12, 30, 0.6), (0, 42, 42, 0.3)],
    )
    b = make_case(
        "B",
        "B",
        (1, 64, 64),
        boxes=[(0, 20, 24, 20, 24, 2)],
        peaks=[(0, 50, 50, 0.8), (0, 22, 29, 0.5), (0, 5, 5, 0.2)],
    )
    c = make_case("C", "C", (1, 64, 64), peaks=[(0, 30, 30, 0.7), (0, 10, 50, 0.4)])
    return [summarize_case(x) for x in (a, b, c)]


def test_froc_three_patients_all_lesions():
    froc = froc_analysis(three_patients())
    result = froc["all"]
    # Thresholds 0.9 .. 0.2; FP detections 0.8, 0.7, 0.6, 0.4, 0.2 over 3 patients; lesions hit
    # at 0.9, 0.5, 0.3 out of 3. Full curve (fp, sens):
    #   0.9 (0, 1/3) 0.8 (1/3, 1/3) 0.7 (2/3, 1/3) 0.6 (1, 1/3) 0.5 (1, 2/3) 0.4 (4/3, 2/3)
    #   0.3 (4/3, 1) 0.2 (5/3, 1): one point per distinct detection score.
    np.testing.assert_allclose(
        result["curve"]["threshold"], [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]
    )
    np.testing.assert_allclose(result["curve"]["fp"], [0, 1 / 3, 2 / 3, 1, 1, 4 / 3, 4 / 3, 5 / 3])
    np.testing.assert_allclose(
        result["curve"]["sensitivity"], [1 / 3, 1 / 3, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 1, 1]
    )
    assert result["num_lesions"] == 3
    # S(x): 1/3 up to FP 1, 2/3 on [1, 4/3), 1 from 4/3.
    expected_sens = {"0.25": 1 / 3, "0.5": 1 / 3, "1": 2 / 3, "2": 1.0, "3": 1.0}
    assert result["sensitivity_at_fp"] == pytest.approx(expected_sens)
    assert result["fp_at_sensitivity"] == pytest.approx(
        {"0.6": 1.0, "0.7": 4 / 3, "0.8": 4 / 3, "0.9": 4 / 3}
    )
    # pAUC [0.01, 1] = 0.99 * 1/3; [0.1, 3] = 0.9 * 1/3 + (4/3 - 1) * 2/3 + (3 - 4/3) * 1.
    assert result["pauc"]["0.01-1"] == pytest.approx(0.99 / 3)
    assert result["pauc"]["0.1-3"] == pytest.approx(0.3 + 2 / 9 + 5 / 3)


def test_froc_three_patients_groups():
    froc = froc_analysis(three_patients())
    # Clinically significant: A's 4+3 (0.9) and B's 3+4 (0.5). The 0.3 detection on A's 3+3
    # lesion is neither a hit nor a FP, so FP stays 4/3 at 0.3.
    cs = froc["clinically_significant"]
    assert cs["num_lesions"] == 2
    # Thresholds 0.9 .. 0.2: FPs 0.8, 0.7, 0.6, 0.4, 0.2 (not 0.3) over 3 patients.
    np.testing.assert_allclose(cs["curve"]["fp"], [0, 1 / 3, 2 / 3, 1, 1, 4 / 3, 4 / 3, 5 / 3])
    np.testing.assert_allclose(cs["curve"]["sensitivity"], [0.5, 0.5, 0.5, 0.5, 1, 1, 1, 1])
    assert cs["sensitivity_at_fp"] == pytest.approx(
        {"0.25": 0.5, "0.5": 0.5, "1": 1.0, "2": 1.0, "3": 1.0}
    )
    assert cs["fp_at_sensitivity"] == pytest.approx({k: 1.0 for k in ("0.6", "0.7", "0.8", "0.9")})
    assert cs["pauc"]["0.01-1"] == pytest.approx(0.99 * 0.5)
    assert cs["pauc"]["0.1-3"] == pytest.approx(0.9 * 0.5 + 2.0)
    # Index lesions: A's highest class (4+3), B's only lesion: the same two lesions.
    assert froc["index"]["num_lesions"] == 2
    assert froc["index"]["pauc"] == pytest.approx(cs["pauc"])
    # Per GS group.
    assert froc["gs_3+3"]["sensitivity_at_fp"]["1"] == 0.0
    assert froc["gs_3+3"]["sensitivity_at_fp"]["2"] == 1.0
    assert froc["gs_3+3"]["fp_at_sensitivity"]["0.6"] == pytest.approx(4 / 3)
    assert froc["gs_3+4"]["fp_at_sensitivity"]["0.9"] == pytest.approx(1.0)
    assert froc["gs_4+3"]["fp_at_sensitivity"]["0.9"] == 0.0
    assert froc["gs_4+3"]["sensitivity_at_fp"]["0.25"] == 1.0
    # No GS >= 8 lesion: summaries are undefined.
    assert froc["gs_8+"]["num_lesions"] == 0
    assert froc["gs_8+"]["fp_at_sensitivity"]["0.9"] is None
    assert froc["gs_8+"]["pauc"]["0.01-1"] is None


def test_lesion_free_patients_count_in_fp_per_patient():
    summaries = three_patients()
    # A fourth patient without lesions or detections: FP per patient scales by 3/4.
    d = summarize_case(make_case("D", "D", (1, 64, 64)))
    base = froc_analysis(summaries)["all"]["curve"]["fp"]
    more = froc_analysis([*summaries, d])["all"]["curve"]["fp"]
    np.testing.assert_allclose(more, base * 3 / 4)


def test_fp_at_sensitivity_never_reached_is_none_and_s_is_zero_before_first_point():
    threshold, fp, sens = froc_curve(np.array([0.5, -np.inf]), np.array([0.7]), [0.7, 0.5], 2)
    # t = 0.7: one FP over 2 patients, nothing detected; t = 0.5: half the lesions.
    np.testing.assert_allclose(fp, [0.5, 0.5])
    np.testing.assert_allclose(sens, [0.0, 0.5])
    assert sensitivity_at(fp, sens, [0.49, 0.5, 10]).tolist() == [0.0, 0.5, 0.5]
    # S = 0 on [0.01, 0.5) and 0.5 on [0.5, 1]: 0.25.
    assert partial_auc(fp, sens, 0.01, 1.0) == pytest.approx(0.25)
    assert fp_at_sensitivity(fp, sens, 0.6) is None


def test_annotated_slices_keep_only_detections_on_lesion_slices():
    # Slice 0 holds the lesion; the FP on slice 1 counts with slices='all' only. A lesion-free
    # patient has no annotated slice, so it is not evaluated with slices='annotated'.
    case = make_case(
        "a",
        "A",
        (2, 40, 40),
        boxes=[(0, 10, 14, 10, 14, 2)],
        peaks=[(0, 12, 12, 0.9), (1, 30, 30, 0.8)],
    )
    free = make_case("b", "B", (2, 40, 40), peaks=[(0, 30, 30, 0.7)])
    everything = [summarize_case(case), summarize_case(free)]
    annotated = [summarize_case(case, slices="annotated"), summarize_case(free, slices="annotated")]
    assert everything[0].fp_scores.tolist() == [pytest.approx(0.8)]
    assert annotated[0].fp_scores.size == 0 and annotated[0].num_slices == 1
    assert (count_patients(everything), count_patients(annotated)) == (2, 1)
    np.testing.assert_allclose(froc_analysis(everything)["all"]["curve"]["fp"], [0, 0.5, 1])
    np.testing.assert_allclose(froc_analysis(annotated)["all"]["curve"]["fp"], [0])


def test_lesion_of_unknown_grade_is_clinically_significant_but_in_no_gs_group():
    # One patient, 64 x 64 slice, 1 mm: lesion 1 GS 3+4 (known) hit at 0.9, lesion 2 csPCa of
    # unknown grade (PI-CAI label 1, stored as class 2) never hit; one FP at 0.5.
    # clinically significant: 1 of 2 detected at 0.9; gs_3+4: only lesion 1, detected (1 of 1).
    # Counted as a 3+4 (before), gs_3+4 would have held 2 lesions and reached only 1/2.
    case = make_case(
        "a",
        "A",
        (1, 64, 64),
        boxes=[(0, 10, 14, 10, 14, 2), (0, 40, 44, 40, 44, 2)],
        peaks=[(0, 12, 12, 0.9), (0, 25, 55, 0.5)],
    )
    case = dataclasses.replace(case, lesion_grade_known=np.array([True, False]))
    froc = froc_analysis([summarize_case(case)])
    assert froc["clinically_significant"]["num_lesions"] == 2
    np.testing.assert_allclose(froc["clinically_significant"]["curve"]["sensitivity"], [0.5, 0.5])
    assert froc["gs_3+4"]["num_lesions"] == 1
    np.testing.assert_allclose(froc["gs_3+4"]["curve"]["sensitivity"], [1.0, 1.0])
    assert froc["gs_3+4"]["fp_at_sensitivity"]["0.9"] == 0.0
    assert [froc[g]["num_lesions"] for g in ("all", "index", "gs_4+3", "gs_8+")] == [2, 1, 0, 0]


def test_lesion_grade_known_round_trips_and_defaults_to_known(tmp_path):
    from focalnet_jax.evaluation.predictions import PredictionsError, read_case, write_case

    case = make_case("a", "A", (1, 16, 16), boxes=[(0, 2, 4, 2, 4, 2), (0, 9, 11, 9, 11, 3)])
    arrays = {k: getattr(case, k) for k in ("scores", "lesions", "lesion_classes", "spacing")}
    write_case(tmp_path, "u", patient_id="A", lesion_grade_known=[False, True], **arrays)
    write_case(tmp_path, "k", patient_id="A", **arrays)
    assert read_case(tmp_path / "u.npz").grade_known.tolist() == [False, True]
    assert read_case(tmp_path / "k.npz").lesion_grade_known is None
    assert read_case(tmp_path / "k.npz").grade_known.tolist() == [True, True]
    with pytest.raises(PredictionsError, match="unknown grade .* must have class 2"):
        write_case(tmp_path, "bad", patient_id="A", lesion_grade_known=[True, False], **arrays)


@pytest.mark.parametrize("spacing", [(np.inf, 1.0), (1.0, np.nan), (0.0, 1.0)])
def test_spacing_that_is_not_a_positive_finite_distance_is_refused(tmp_path, spacing):
    """An infinite spacing made the window radius 0 (every pixel above min_score a detection) and
    every distance infinite (no hit): sensitivity 0 without a word."""
    from focalnet_jax.evaluation.predictions import PredictionsError, write_case

    case = make_case("a", "A", (1, 16, 16), boxes=[(0, 2, 4, 2, 4, 2)], peaks=[(0, 3, 3, 0.9)])
    arrays = {k: getattr(case, k) for k in ("scores", "lesions", "lesion_classes")}
    with pytest.raises(PredictionsError, match=r"a\.npz: 'spacing' must be 2 positive numbers"):
        write_case(tmp_path, "a", patient_id="A", spacing=spacing, **arrays)


def test_montage_draws_a_lesion_of_unknown_grade_apart_from_gs_3_4(tmp_path, monkeypatch):
    """A lesion known only as clinically significant (class 2, grade unknown) was drawn and
    named 'GS 3+4' in montage.png; its pixels are now their own contour and legend entry."""
    from focalnet_jax.evaluation import evaluate, figures
    from focalnet_jax.evaluation.predictions import write_case

    case = make_case("a", "A", (1, 16, 16), boxes=[(0, 2, 4, 2, 4, 2), (0, 9, 11, 9, 11, 2)],
                     peaks=[(0, 3, 3, 0.9)])  # fmt: skip
    arrays = {k: getattr(case, k) for k in ("scores", "lesions", "lesion_classes", "spacing")}
    path = write_case(tmp_path, "a", patient_id="A", lesion_grade_known=[False, True],
                      t2w=np.zeros((1, 16, 16)), **arrays)  # fmt: skip
    column = evaluate._montage_column(path, summarize_case(case), threshold=0.5, radius_mm=5.0)
    np.testing.assert_array_equal(column.unknown_grade, case.lesions[0] == 1)  # 9 pixels
    assert column.points.tolist() == [[3, 3]]
    legends = []

    def keep_legend(fig, out):
        legends.append([t.get_text() for t in fig.legends[0].get_texts()])
        return out

    monkeypatch.setattr(figures, "save_png", keep_legend)
    figures.montage_figure(tmp_path / "m.png", [column])
    assert legends[0] == [*figures.GS_NAMES.values(), "csPCa, GS unknown", "detection"]
