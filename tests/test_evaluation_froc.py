"""The 5 mm hit rule and FROC on hand-built cases small enough to count by hand: lesion diameters
and index lesions, GS groups, lesion-free patients, annotated slices, lesions of unknown grade."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from froc_cases import make_case, three_patients

from focalnet_jax.evaluation.froc import (
    count_patients,
    fp_at_sensitivity,
    froc_analysis,
    froc_curve,
    lesion_table,
    partial_auc,
    sensitivity_at,
)
from focalnet_jax.evaluation.localization import Detections
from focalnet_jax.evaluation.matching import lesion_diameters, lesion_hits, summarize_case


def detections_at(points):
    points = np.asarray(points, np.int32).reshape(-1, 3)
    return Detections(
        slice=points[:, 0],
        row=points[:, 1],
        col=points[:, 2],
        scores=np.ones((len(points), 5), np.float32),
    )


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
