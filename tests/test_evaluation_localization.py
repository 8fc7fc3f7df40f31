"""Localisation on hand-built score maps: the 5 mm window, a flat maximum as one detection at the
pixel nearest its centroid, its reach, and a radius or score floor out of range refused."""

from __future__ import annotations

import logging
from fractions import Fraction

import numpy as np
import pytest
from froc_cases import make_case
from scipy import ndimage

from focalnet_jax.errors import UserError
from focalnet_jax.evaluation.evaluate import evaluate_predictions
from focalnet_jax.evaluation.froc import froc_analysis
from focalnet_jax.evaluation.localization import local_maxima, window_radius
from focalnet_jax.evaluation.matching import summarize_case
from focalnet_jax.evaluation.predictions import write_case


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
