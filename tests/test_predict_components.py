"""`focalnet predict` for a model of more than T2w/ADC/HBV whose components come in another order
than the store's: a DCE model trained with `data.components=dce,adc,t2w` (MFL off: prediction
does not depend on the loss, and MFL's six subsets tripled each training's time) on a small
synthetic store of T2w, ADC, HBV and DCE. One exam gives DCE with `--component dce=PATH` (and
chooses its series with `--component-series dce=UID`, flags checked here); every
output lies on the T2w grid (the reference frame, whatever the model's first component is); the
model gets its channels in its own order; a folder of exams (`--layout picai`) gives the same maps.
One exam's --out is replaced whole: all old or all new outputs, never a mix or another's file lost.
Models of one set of components in different orders form an ensemble (a second run of
adc,t2w,dce; and tiny initialised models of t2w,adc,hbv and t2w,hbv,adc): the mean of each
model's own prediction; models of different sets are refused.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from cli_calls import cli_error, run_cli
from test_train_helpers import tiny_config

from focalnet_jax.cli import main
from focalnet_jax.evaluation.ensemble import EnsembleError, load_ensemble, make_ensemble
from focalnet_jax.evaluation.inference import Predictor

MODEL_COMPONENTS = ("dce", "adc", "t2w")
REORDERED = ("adc", "t2w", "dce")  # the same set in another order
MAPS = ("lesion_score", "cspca_score", "detection_map")


def train(store: Path, components: Sequence[str], workdir: Path) -> Path:
    """A 2-step run of a tiny model of `components` on `store` (seed of the config, no MFL)."""
    from focalnet_jax.training import train_and_evaluate

    overrides = [
        "--config.train.steps=2",
        "--config.data.slices=all",
        f"--config.data.store={store}",
        "--config.data.num_folds=2",
        "--config.data.components=" + ",".join(components),
        "--config.loss.mfl=False",
    ]
    with contextlib.redirect_stderr(io.StringIO()):
        train_and_evaluate(tiny_config(overrides=overrides), workdir)
    return workdir


@pytest.fixture(scope="module")
def dce_run(tmp_path_factory):
    """{'data': synthetic PI-CAI folder, 'store': its store, 'run': a 2-step run of a
    dce,adc,t2w model}."""
    root = tmp_path_factory.mktemp("dce")
    data, store = root / "data", root / "store"
    components = "--components=t2w,adc,hbv,dce"
    run_cli(["synth", f"--out={data}", "--cases=3", "--seed=5", "--small", components])
    run_cli(["preprocess", "--layout=picai", f"--images={data / 'images'}",
             f"--labels={data / 'labels'}", f"--masks={data / 'masks'}", f"--out={store}",
             components])  # fmt: skip
    return {"data": data, "store": store, "run": train(store, MODEL_COMPONENTS, root / "run")}


def exam(data: Path) -> dict[str, Path]:
    t2w = sorted((data / "images").glob("*/*_t2w.mha"))[0]
    case = t2w.name[: -len("_t2w.mha")]
    files = {c: t2w.with_name(f"{case}_{c}.mha") for c in ("t2w", "adc", "hbv", "dce")}
    return {"case": case, **files, "mask": data / "masks" / f"{case}.nii.gz"}


def test_one_exam_gives_dce_by_name_and_the_maps_lie_on_the_t2w_grid(dce_run, tmp_path):
    files = exam(dce_run["data"])
    run_cli(["predict", "--checkpoint", dce_run["run"], "--t2w", files["t2w"],
             "--adc", files["adc"], "--component", f"dce={files['dce']}",
             "--mask", files["mask"], "--out", tmp_path / "one"])  # fmt: skip
    run_cli(["predict", "--checkpoint", dce_run["run"], "--layout", "picai",
             "--images", dce_run["data"] / "images", "--masks", dce_run["data"] / "masks",
             "--out", tmp_path / "many"])  # fmt: skip
    t2w = sitk.ReadImage(str(files["t2w"]))
    dce = sitk.ReadImage(str(files["dce"]))
    assert dce.GetSize() != t2w.GetSize()  # a grid of its own: the maps must not take it
    for name in MAPS:
        one = sitk.ReadImage(str(tmp_path / "one" / f"{name}.nii.gz"))
        assert one.GetSize() == t2w.GetSize()
        np.testing.assert_allclose(one.GetOrigin(), t2w.GetOrigin(), atol=1e-3)
        np.testing.assert_allclose(one.GetSpacing(), t2w.GetSpacing(), atol=1e-4)
        many = sitk.ReadImage(str(tmp_path / "many" / files["case"] / f"{name}.nii.gz"))
        np.testing.assert_allclose(
            sitk.GetArrayFromImage(one), sitk.GetArrayFromImage(many), atol=1e-6
        )


def test_one_exams_out_holds_all_old_or_all_new_outputs_and_nothing_else(
    dce_run, tmp_path, monkeypatch
):
    """A second prediction into --out (flip TTA: another models.json) replaces the first whole;
    interrupted at either rename of the folder swap, it leaves the first whole; a folder holding
    a file predict does not write is refused, before the models load, and kept as it was."""
    from focalnet_jax.evaluation.predict import OUTPUT_FILES

    files = exam(dce_run["data"])
    out = tmp_path / "out"
    argv = ["predict", "--checkpoint", dce_run["run"], "--t2w", files["t2w"], "--adc",
            files["adc"], "--component", f"dce={files['dce']}", "--out", out]  # fmt: skip
    run_cli(argv)
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(first) == sorted(OUTPUT_FILES)
    replace = os.replace
    for k in (1, 2):
        renames = []

        def interrupted(src, dst, k=k, renames=renames):
            if out in (Path(src), Path(dst)):  # the k-th rename of the swap is interrupted
                renames.append(dst)
                if len(renames) == k:
                    raise KeyboardInterrupt
            replace(src, dst)

        monkeypatch.setattr(os, "replace", interrupted)
        stderr = io.StringIO()
        with pytest.raises(SystemExit) as stop, contextlib.redirect_stderr(stderr):
            main([str(a) for a in [*argv, "--tta", "flip"]])  # as Ctrl-C ends it
        assert stop.value.code == 130 and "interrupted by Ctrl-C" in stderr.getvalue()
        monkeypatch.undo()
        assert {p.name: p.read_bytes() for p in out.iterdir()} == first
        assert os.listdir(tmp_path) == ["out"] and len(renames) == k + (k == 2)
    run_cli([*argv, "--tta", "flip"])
    second = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(second) == sorted(first) and second["models.json"] != first["models.json"]
    assert os.listdir(tmp_path) == ["out"]
    (out / "notes.txt").write_text("mine")
    message = cli_error([*argv, "--checkpoint", tmp_path / "no_run"])
    assert message.endswith(
        f"--out {out} holds notes.txt, which focalnet predict does not write: one exam's outputs "
        "replace that folder whole; choose a folder of their own"
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {**second, "notes.txt": b"mine"}


def test_each_model_gets_its_channels_in_its_own_order(dce_run):
    from focalnet_jax.data import preprocess_case

    files = exam(dce_run["data"])
    models = load_ensemble(dce_run["run"])
    assert models.components == ("t2w", "dce", "adc")  # what an exam gives, T2w first
    case = preprocess_case({c: str(files[c]) for c in models.components}, mask=str(files["mask"]))
    model = Predictor.from_workdir(dce_run["run"])
    own_order = case.images[..., [models.components.index(c) for c in MODEL_COMPONENTS]]
    np.testing.assert_array_equal(models(case.images), model(own_order))
    with pytest.raises(ValueError, match=r"images: expected \[N, H, W, 3\]"):
        models(case.images[..., :2])


def test_a_missing_or_malformed_component_is_a_one_line_error_naming_its_flag(dce_run, tmp_path):
    files = exam(dce_run["data"])
    one = ["predict", "--checkpoint", dce_run["run"], "--out", tmp_path / "o"]
    message = cli_error([*one, "--t2w", files["t2w"], "--adc", files["adc"]])
    assert "give --component dce=PATH" in message and str(dce_run["run"]) in message
    message = cli_error([*one, "--t2w", files["t2w"], "--component", f"dce={files['dce']}"])
    assert message.endswith("give --adc PATH")
    # A misspelt name was not said to be unread: only the right one was asked for.
    typo = ["--t2w", files["t2w"], "--adc", files["adc"], "--component", f"dec={files['dce']}"]
    message = cli_error([*one, *typo])
    assert message.endswith("give --component dce=PATH (given dec, which they do not read)")
    cases = [
        (["--component", "dce"], "--component expects NAME=PATH"),
        (["--component", f"adc={files['adc']}"], "give adc with --adc"),
        (["--component", "dce=a.mha", "--component", "dce=b.mha"], "names 'dce' twice"),
        (["--component-series", "adc=1.2"], "give adc with --adc-series"),
        (["--component-series", "dce"], "--component-series expects NAME=UID"),
        (
            ["--component-series", "dce=1.2"],
            "--component-series dce=UID names a series of --component dce=PATH, which is not given",
        ),
    ]
    for flags, expected in cases:
        assert expected in cli_error([*one, "--t2w", files["t2w"], *flags])
    layout = ["--layout", "picai", "--images", dce_run["data"] / "images"]
    assert "--component is for one exam" in cli_error([*one, *layout, "--component", "dce=x"])
    message = cli_error([*one, *layout, "--component-series", "dce=1.2"])
    assert message.endswith("--component-series dce=UID is for one exam; a manifest chooses "
                            "series in its <component>_series columns")  # fmt: skip
    assert not (tmp_path / "o").exists()


# --- ensembles of one set of components in different orders -----------------------------------


def test_an_ensemble_of_one_set_of_components_in_two_orders_is_the_mean_of_its_models(
    dce_run, tmp_path
):
    """`predict` with a dce,adc,t2w run and an adc,t2w,dce run on one exam: the maps are the
    mean of each run's own maps; the ensemble takes T2w then the first run's others."""
    other = train(dce_run["store"], REORDERED, tmp_path / "reordered")
    runs = [dce_run["run"], other]
    files = exam(dce_run["data"])
    one = ["predict", "--t2w", files["t2w"], "--adc", files["adc"],
           "--component", f"dce={files['dce']}", "--mask", files["mask"]]  # fmt: skip
    assert load_ensemble(runs).components == ("t2w", "dce", "adc")
    assert load_ensemble(runs[::-1]).components == ("t2w", "adc", "dce")
    for name, checkpoints in (("first", runs[:1]), ("second", runs[1:]), ("both", runs)):
        run_cli([*one, *(f for run in checkpoints for f in ("--checkpoint", run)),
                 "--out", tmp_path / name])  # fmt: skip
    for score in ("lesion_score", "cspca_score"):
        first, second, both = (
            sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / name / f"{score}.nii.gz")))
            for name in ("first", "second", "both")
        )
        assert np.abs(first - second).max() > 1e-3  # two different models
        np.testing.assert_allclose(both, (first + second) / 2, atol=1e-5)


def initialised(components: Sequence[str], seed: int) -> Predictor:
    """A tiny model of `components` initialised with `seed`: 32 x 32 inputs, batches of 4."""
    import jax

    from focalnet_jax.run import RunSpec

    config = tiny_config(overrides=["--config.data.components=" + ",".join(components)])
    spec = RunSpec.from_config(config, num_devices=1, image_size=(32, 32))
    variables = spec.model.init(jax.random.key(seed), np.zeros(spec.input_shape, np.float32))
    return Predictor.from_variables(spec, variables, batch_size=4)


def test_models_of_t2w_adc_hbv_and_t2w_hbv_adc_give_the_mean_of_their_own_predictions():
    """Models A (t2w,adc,hbv) and B (t2w,hbv,adc): with or without flip TTA the ensemble's
    scores are the mean of A on (t2w, adc, hbv) slices and B on the same slices as (t2w, hbv,
    adc); A, B takes them stacked as (t2w, adc, hbv), B, A as (t2w, hbv, adc); both models run
    one compiled function."""
    a = initialised(("t2w", "adc", "hbv"), seed=0)
    b = initialised(("t2w", "hbv", "adc"), seed=1)
    images = np.random.default_rng(0).uniform(0, 1.2, (6, 32, 32, 3)).astype(np.float32)
    swapped = images[..., [0, 2, 1]]  # t2w, hbv, adc
    flipped = np.flip(images, 2)
    own = (a(images), b(swapped))
    assert np.abs(b(images) - own[1]).max() > 1e-3  # B's order matters
    mean = (own[0] + own[1]) / 2
    ab = make_ensemble([a, b], [Path("a"), Path("b")], [None, None])
    assert ab.components == ("t2w", "adc", "hbv")
    assert ab.predictors[1].apply is ab.predictors[0].apply
    np.testing.assert_allclose(ab(images), mean, rtol=0, atol=1e-6)
    ba = make_ensemble([b, a], [Path("b"), Path("a")], [None, None])
    assert ba.components == ("t2w", "hbv", "adc")
    np.testing.assert_allclose(ba(swapped), mean, rtol=0, atol=1e-6)
    tta = make_ensemble([a, b], [Path("a"), Path("b")], [None, None], "flip")
    each = [
        0.5 * (a(images) + np.flip(a(flipped), 2)),
        0.5 * (b(swapped) + np.flip(b(flipped[..., [0, 2, 1]]), 2)),
    ]
    np.testing.assert_allclose(tta(images), np.mean(each, axis=0), rtol=0, atol=1e-6)


def test_models_of_different_sets_of_components_are_refused_naming_the_runs():
    a = initialised(("t2w", "adc", "hbv"), seed=0)
    c = initialised(("t2w", "adc", "dce"), seed=0)
    with pytest.raises(EnsembleError) as error:
        make_ensemble([a, c], [Path("runs/a"), Path("runs/c")], [None, None])
    assert str(error.value) == (
        "models disagree on the set of components: runs/a: ['t2w', 'adc', 'hbv']; "
        "runs/c: ['t2w', 'adc', 'dce']"
    )
