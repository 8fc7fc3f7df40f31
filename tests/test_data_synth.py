"""Synthetic mp-MRI: geometry, determinism, realistic values, lesion visibility, PI-CAI layout."""

from __future__ import annotations

import csv
import json
from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk

from focalnet_jax.data.layouts import discover_picai
from focalnet_jax.data.preprocess import preprocess_case
from focalnet_jax.data.synth import (
    Lesion,
    SynthConfig,
    _lesions,
    _scene,
    synth_case,
    write_dataset,
)


def _at(image, point, radius_vox=1):
    """Median of the voxels within `radius_vox` of the voxel holding a world point."""
    i, j, k = image.TransformPhysicalPointToIndex(tuple(float(c) for c in point))
    a = sitk.GetArrayViewFromImage(image)
    r = radius_vox
    return float(np.median(a[k, max(j - r, 0) : j + r + 1, max(i - r, 0) : i + r + 1]))


def test_default_geometry_matches_picai_protocol():
    sc = synth_case(0)
    t2w, adc, hbv = sc.images["t2w"], sc.images["adc"], sc.images["hbv"]
    assert t2w.GetSize() == (384, 384, 20) and t2w.GetSpacing() == (0.5, 0.5, 3.0)
    assert adc.GetSize() == (84, 128, 20) and adc.GetSpacing() == (2.0, 2.0, 3.0)
    assert hbv.GetOrigin() == adc.GetOrigin() and adc.GetOrigin() != t2w.GetOrigin()
    assert sc.label.GetSize() == t2w.GetSize() and sc.mask.GetOrigin() == t2w.GetOrigin()
    # The gland mask is about prostate-sized: 20-80 mL.
    volume_ml = sitk.GetArrayViewFromImage(sc.mask).sum() * 0.5 * 0.5 * 3.0 / 1000
    assert 20 < volume_ml < 80


def test_deterministic_from_seed():
    cfg = SynthConfig.small()
    a, b, c = synth_case([5, 1], cfg), synth_case([5, 1], cfg), synth_case([5, 2], cfg)
    for name in ("t2w", "adc", "hbv"):
        np.testing.assert_array_equal(
            sitk.GetArrayViewFromImage(a.images[name]), sitk.GetArrayViewFromImage(b.images[name])
        )
    assert not np.array_equal(
        sitk.GetArrayViewFromImage(a.images["t2w"]), sitk.GetArrayViewFromImage(c.images["t2w"])
    )


def test_realistic_adc_and_t2w_values():
    cfg = SynthConfig.small(noise=0.0, coil_share=0.0)
    probe = synth_case(2, cfg, lesions=[])
    p = np.asarray(probe.prostate_center)
    spots = [(-14, 9, 0), (14, 9, 0), (-7, 13, 0), (7, 13, 0), (0, 15, 0)]  # posterior PZ
    lesions = [
        Lesion(tuple(p + s), (3.5, 3.5, 4.0), 0.0, cls, "both", "pz")
        for cls, s in zip(range(1, 6), spots, strict=True)
    ]
    sc = synth_case(2, cfg, lesions=lesions)
    adc, t2w = sc.images["adc"], sc.images["t2w"]
    pz = _at(probe.images["adc"], p + [-14, 9, 0])
    tz = _at(probe.images["adc"], p + [0, -4, 0])
    assert 1600 <= pz <= 2000 and 1150 <= tz <= 1450
    lesion_adc = [_at(adc, les.center, 0) for les in lesions]
    assert all(550 <= v <= 1200 for v in lesion_adc)
    assert lesion_adc == sorted(lesion_adc, reverse=True)  # falls with class
    # T2w: lesions darker than the PZ, more so with class; label holds the classes.
    t2_pz = _at(probe.images["t2w"], p + [-14, 9, 0], 2)
    contrast = [1 - _at(t2w, les.center, 1) / t2_pz for les in lesions]
    assert contrast[0] > 0.1 and contrast[-1] > contrast[0] + 0.2
    label = sitk.GetArrayViewFromImage(sc.label)
    for les in lesions:
        i, j, k = sc.label.TransformPhysicalPointToIndex(les.center)
        assert label[k, j, i] == les.cls


def test_visibility_only_in_one_component():
    cfg = SynthConfig.small(noise=0.0)
    probe = synth_case(4, cfg, lesions=[])
    center = tuple(np.asarray(probe.prostate_center) + [-12, 9, 0])
    for visible, changed, same in (("t2w", "t2w", "adc"), ("adc", "adc", "t2w")):
        les = Lesion(center, (4.0, 4.0, 4.0), 0.0, 5, visible, "pz")
        sc = synth_case(4, cfg, lesions=[les])
        assert _at(sc.images[same], center) == pytest.approx(
            _at(probe.images[same], center), rel=0.1
        )
        assert _at(sc.images[changed], center) < 0.7 * _at(probe.images[changed], center)


def test_lesion_shares_and_all_classes():
    cfg = SynthConfig()
    draws = []
    for seed in range(300):
        rng = np.random.default_rng(seed)
        draws += _lesions(rng, cfg, {**_scene(rng, cfg, (0, 0, 0)), "z_range": (-30, 30)})
    visible = np.array([d.visible_in for d in draws])
    assert abs(np.mean(visible == "t2w") - 0.15) < 0.05
    assert abs(np.mean(visible == "adc") - 0.15) < 0.05
    assert {d.cls for d in draws} == {1, 2, 3, 4, 5}
    only_t2w = SynthConfig(t2w_only_share=1.0, adc_only_share=0.0)
    rng = np.random.default_rng(0)
    scenes = [{**_scene(rng, only_t2w, (0, 0, 0)), "z_range": (-30, 30)} for _ in range(20)]
    les = [x for scene in scenes for x in _lesions(rng, only_t2w, scene)]
    assert les and all(x.visible_in == "t2w" for x in les)


def test_write_dataset_picai_layout(tmp_path):
    ids = write_dataset(tmp_path, 3, seed=9, cfg=SynthConfig.small())
    assert len(ids) == 3
    for case in ids:
        patient = case.split("_")[0]
        for name in ("t2w", "adc", "hbv"):
            assert (tmp_path / "images" / patient / f"{case}_{name}.mha").is_file()
        assert (tmp_path / "labels" / f"{case}.nii.gz").is_file()
        assert (tmp_path / "masks" / f"{case}.nii.gz").is_file()
    assert json.loads((tmp_path / "labels" / "dataset.json").read_text()) == {
        "label_values": "isup"
    }
    with (tmp_path / "lesions.csv").open() as f:
        rows = list(csv.DictReader(f))
    for row in rows:  # every listed lesion is in its label at its world centre
        label = sitk.ReadImage(str(tmp_path / "labels" / f"{row['case_id']}.nii.gz"))
        i, j, k = label.TransformPhysicalPointToIndex(
            (float(row["x"]), float(row["y"]), float(row["z"]))
        )
        assert sitk.GetArrayViewFromImage(label)[k, j, i] == int(row["class"])
    again = tmp_path / "again"
    write_dataset(again, 3, seed=9, cfg=SynthConfig.small())
    a = sitk.ReadImage(str(tmp_path / "images" / ids[1].split("_")[0] / f"{ids[1]}_adc.mha"))
    b = sitk.ReadImage(str(again / "images" / ids[1].split("_")[0] / f"{ids[1]}_adc.mha"))
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b))


FOUR = ("t2w", "adc", "hbv", "dce")


def _inside_around(image, lesion):
    """Median of a DCE/T2w/ADC image inside a lesion's core and in a ring 3-6 mm outside it."""
    a = sitk.GetArrayViewFromImage(image)
    k = image.TransformPhysicalPointToIndex(lesion.center)[2]
    nz, ny, nx = a.shape
    points = np.stack(np.meshgrid(np.arange(nx), np.arange(ny), indexing="xy"), -1).reshape(-1, 2)
    world = np.array([image.TransformIndexToPhysicalPoint((int(i), int(j), k)) for i, j in points])
    r = np.hypot(*(world[:, :2] - lesion.center[:2]).T).reshape(ny, nx)
    core, ring = r <= 0.5 * lesion.radii[0], (r >= lesion.radii[0] + 3) & (r <= lesion.radii[0] + 6)
    return float(np.median(a[k][core])), float(np.median(a[k][ring]))


def test_dce_grid_and_other_components_unchanged():
    cfg = SynthConfig.small(components=FOUR, dce_only_share=0.0)
    three, four = synth_case([5, 1], SynthConfig.small()), synth_case([5, 1], cfg)
    dce = four.images["dce"]
    assert dce.GetSize() == (64, 64, 6) and dce.GetSpacing() == (1.5, 1.5, 3.0)
    assert dce.GetOrigin() not in (four.images["t2w"].GetOrigin(), four.images["adc"].GetOrigin())
    # DCE draws from a stream of its own: the other components and lesions are bit-identical.
    for name in ("t2w", "adc", "hbv"):
        np.testing.assert_array_equal(
            sitk.GetArrayViewFromImage(three.images[name]),
            sitk.GetArrayViewFromImage(four.images[name]),
        )
    assert three.lesions == four.lesions
    # With a DCE-only share the same lesions are drawn; some become visible only in DCE.
    draws, with_dce = [], SynthConfig(components=FOUR)
    for seed in range(300):
        rng, rng_dce = np.random.default_rng(seed), np.random.default_rng(seed)
        scene = {**_scene(rng, with_dce, (0, 0, 0)), "z_range": (-30, 30)}
        _scene(rng_dce, with_dce, (0, 0, 0))
        pair = _lesions(rng, SynthConfig(), scene), _lesions(rng_dce, with_dce, scene)
        draws += zip(*pair, strict=True)
    assert all((a.center, a.cls) == (b.center, b.cls) for a, b in draws)
    changed = [(a.visible_in, b.visible_in) for a, b in draws if a.visible_in != b.visible_in]
    assert set(changed) == {("both", "dce")}
    assert abs(len(changed) / len(draws) - 0.15) < 0.05


def test_the_order_of_the_components_given_changes_no_image():
    """`--components t2w,hbv,adc` drew the ADC and HBV voxels in that order: the same files as
    `t2w,adc,hbv` held other images."""
    given = synth_case([5, 1], SynthConfig.small(components=("t2w", "hbv", "adc")))
    default = synth_case([5, 1], SynthConfig.small())
    assert list(given.images) == ["t2w", "hbv", "adc"]
    for name in ("t2w", "adc", "hbv"):
        np.testing.assert_array_equal(
            sitk.GetArrayViewFromImage(given.images[name]),
            sitk.GetArrayViewFromImage(default.images[name]),
        )


@pytest.mark.parametrize("components", [("t2w",), ("t2w", "dce")])
def test_without_adc_and_hbv_no_lesion_is_shown_only_there(components):
    """`--components t2w` or `t2w,dce` kept the default ADC/HBV-only share: 15 % of the lesions
    were labelled and in no image written. Their share goes to those visible everywhere."""
    cfg, counts = SynthConfig(components=components), {}
    for seed in range(300):
        rng = np.random.default_rng(seed)
        scene = {**_scene(rng, cfg, (0, 0, 0)), "z_range": (-30, 30)}
        for lesion in _lesions(rng, cfg, scene):
            counts[lesion.visible_in] = counts.get(lesion.visible_in, 0) + 1
    assert "adc" not in counts and counts["both"] > counts["t2w"] > 0, counts


def test_adding_dce_changes_only_the_lesions_that_become_dce_only():
    """With the default DCE-only share, a lesion that became DCE-only skipped its ADC value's
    draw, so every later draw moved: 98.6 % of the ADC and 80 % of the HBV voxels of such a
    case changed, against the docs ("do not change ... except for the lesions")."""
    cfg = SynthConfig.small(components=FOUR)
    found = 0
    for seed in range(40):
        three, four = synth_case([seed, 1], SynthConfig.small()), synth_case([seed, 1], cfg)
        moved = [b for a, b in zip(three.lesions, four.lesions, strict=True) if a != b]
        if not moved:
            continue
        found += 1
        assert all(b.visible_in == "dce" for b in moved)
        for name in ("t2w", "adc", "hbv"):
            image = four.images[name]
            differ = np.argwhere(
                sitk.GetArrayViewFromImage(three.images[name]) != sitk.GetArrayViewFromImage(image)
            )
            points = np.array(
                [image.TransformIndexToPhysicalPoint(i[::-1].tolist()) for i in differ]
            )
            near = np.zeros(len(points), bool)
            for lesion in moved:  # its box, turned in-plane any way, and a voxel around it
                (a, b, c), spacing = lesion.radii, np.asarray(image.GetSpacing())
                reach = np.array([max(a, b), max(a, b), c]) + spacing
                near |= (np.abs(points - np.asarray(lesion.center)) <= reach).all(axis=1)
            assert len(differ) and near.all(), (seed, name, len(differ), int((~near).sum()))
    assert found >= 2


def test_dce_enhancement_and_dce_only_visibility():
    cfg = SynthConfig.small(components=FOUR, coil_share=0.0)
    probe = synth_case(2, cfg, lesions=[])
    p = np.asarray(probe.prostate_center)
    pz, tz = _at(probe.images["dce"], p + [-14, 9, 0], 2), _at(probe.images["dce"], p + [0, -4, 0])
    assert 35 <= pz <= 70 and tz > 1.4 * pz  # normal PZ enhances little, TZ moderately
    spots = [(-14, 9, 0), (14, 9, 0), (-7, 13, 0), (7, 13, 0), (0, 15, 0)]  # posterior PZ
    lesions = [
        Lesion(tuple(p + s), (3.5, 3.5, 4.0), 0.0, cls, "both", "pz")
        for cls, s in zip(range(1, 6), spots, strict=True)
    ]
    sc = synth_case(2, cfg, lesions=lesions)
    ratio = [_at(sc.images["dce"], les.center, 1) / pz for les in lesions]
    assert all(r > 2.0 for r in ratio) and ratio[4] > 1.7 * ratio[0]  # early, more with class
    # A DCE-only lesion: bright in DCE, not painted in T2w, ADC or HBV. T2w is bit-identical to
    # the case without it; ADC and HBV (whose noise follows the lesion's ADC value's draw, made
    # for both) to the case with it visible everywhere, but where that one paints it.
    dce_only = Lesion(tuple(p + [-12, 9, 0]), (4.0, 4.0, 4.0), 0.0, 3, "dce", "pz")
    sc = synth_case(2, cfg, lesions=[dce_only])
    inside, around = _inside_around(sc.images["dce"], dce_only)
    assert inside > 2.5 * around
    both = replace(dce_only, visible_in="both")
    visible = synth_case(2, cfg, lesions=[both])
    np.testing.assert_array_equal(
        sitk.GetArrayViewFromImage(sc.images["t2w"]),
        sitk.GetArrayViewFromImage(probe.images["t2w"]),
    )
    for name in ("t2w", "adc", "hbv"):
        inside, around = _inside_around(sc.images[name], dce_only)
        assert inside == pytest.approx(around, rel=0.25)
    for name in ("adc", "hbv"):
        hidden, shown = (sitk.GetArrayViewFromImage(c.images[name]) for c in (sc, visible))
        assert (hidden != shown).any() and (hidden != shown).mean() < 0.02
    # Visible in all: darker in T2w and ADC, brighter in DCE.
    sc = visible
    contrast = {n: np.divide(*_inside_around(sc.images[n], both)) for n in ("t2w", "adc", "dce")}
    assert contrast["t2w"] < 0.8 and contrast["adc"] < 0.7 and contrast["dce"] > 2.5


def test_four_component_dataset_preprocesses(tmp_path):
    ids = write_dataset(tmp_path, 2, seed=3, cfg=SynthConfig.small(components=FOUR))
    specs = discover_picai(
        tmp_path / "images", tmp_path / "labels", tmp_path / "masks", components=FOUR
    )
    assert [s.case_id for s in specs] == sorted(ids)
    for spec in specs:
        assert spec.components["dce"].endswith(f"{spec.case_id}_dce.mha")
        linear = {"interpolator": "linear"}  # no overshoot: the range is exact
        case = preprocess_case(spec.components, spec.label, mask=spec.mask, config=linear)
        assert case.images.shape == (6, 128, 128, 4) and case.images.dtype == np.float32
        assert np.all(np.isfinite(case.images))
        assert 0.0 <= case.images[..., 1].min() and case.images[..., 1].max() <= 1.0  # ADC
        # DCE: per-case 1st/99th percentiles of the raw volume's non-zero voxels -> 0/1,
        # unclipped.
        raw = sitk.GetArrayFromImage(sitk.ReadImage(spec.components["dce"])).astype(np.float64)
        lo, hi = np.percentile(raw[raw != 0], [1, 99])
        dce = case.images[..., 3]
        assert dce.min() >= (raw.min() - lo) / (hi - lo) - 1e-6
        assert dce.max() <= (raw.max() - lo) / (hi - lo) + 1e-6
        assert 0.0 < np.median(dce) < 1.0
