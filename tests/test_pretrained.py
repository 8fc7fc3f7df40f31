"""Tests of focalnet_jax/models/pretrained.py: torchvision ResNet weights -> DeepLab variables.

``tests/data/torchvision_resnet50_keys.json`` lists every key of torchvision's ResNet-50
``state_dict`` with its shape (320 entries, 25,557,032 trainable parameters). Converted weights
are checked against torchvision's forward twice: in NumPy (`numpy_torchvision_resnet.py`, always
run) and in torch itself (marked `torch`, skipped where it is absent).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from focalnet_jax.errors import UserError, is_user_error
from focalnet_jax.models import build_model, default_model_config
from focalnet_jax.models.pretrained import (
    MARKER,
    adapt_first_conv,
    backbone_key_map,
    load_torchvision_resnet,
    read_state_dict,
    save_torchvision_resnet,
)

KEYS_FILE = Path(__file__).parent / "data" / "torchvision_resnet50_keys.json"
COMPONENTS = ("t2w", "adc", "hbv", "dce")


def config(**overrides):
    cfg = default_model_config()
    cfg.update(overrides)
    return cfg


def abstract_variables(cfg, num_components):
    model = build_model(cfg, num_outputs=5, num_components=num_components)
    x = jnp.zeros((1, 64, 64, num_components))
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x))


def random_variables(variables, rng):
    """Standard normal float32 leaves of `variables`' shapes; running variances their magnitude
    (a negative one is refused)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: _random_leaf(path[-1].key == "var", leaf.shape, rng), variables
    )


def _random_leaf(variance: bool, shape, rng):
    value = rng.standard_normal(shape, dtype=np.float32)
    return np.abs(value) if variance else value


@pytest.fixture(scope="module")
def resnet50_keys() -> dict[str, tuple[int, ...]]:
    entries = json.loads(KEYS_FILE.read_text())["keys"]
    return {key: tuple(shape) for key, shape in entries}


@pytest.fixture(scope="module")
def resnet50_state(resnet50_keys) -> dict[str, np.ndarray]:
    """A random state_dict with every torchvision ResNet-50 key and shape."""
    rng = np.random.default_rng(0)
    return {
        key: _random_leaf(key.endswith("running_var"), shape, rng)
        if shape
        else np.array(7.0, np.float32)
        for key, shape in resnet50_keys.items()
    }


@pytest.fixture(scope="module")
def tiny_state(tmp_path_factory):
    """(config, state_dict) of a tiny ResNet-18 DeepLab saved in torchvision's layout."""
    cfg = config(depth=18, width=0.125)
    rng = np.random.default_rng(1)
    variables = random_variables(abstract_variables(cfg, 3), rng)
    path = tmp_path_factory.mktemp("tiny") / "resnet18.npz"
    save_torchvision_resnet(variables, path, components=COMPONENTS[:3])
    return cfg, read_state_dict(path)


def test_committed_key_list_is_torchvision_resnet50(resnet50_keys):
    assert len(resnet50_keys) == 320
    assert sum(key.endswith("num_batches_tracked") for key in resnet50_keys) == 53
    trainable = [s for k, s in resnet50_keys.items() if k.endswith((".weight", ".bias"))]
    assert sum(int(np.prod(s)) for s in trainable) == 25_557_032


def test_key_map_covers_every_torchvision_resnet50_key(resnet50_keys):
    variables = abstract_variables(config(depth=50), 3)
    backbone = {c: variables[c]["backbone"] for c in ("params", "batch_stats")}
    mapping = backbone_key_map(backbone)
    expected = {
        k for k in resnet50_keys if not (k.startswith("fc.") or k.endswith("num_batches_tracked"))
    }
    assert set(mapping) == expected and len(mapping) == 320 - 53 - 2
    for key, (collection, path) in mapping.items():
        leaf = backbone[collection]
        for name in path:
            leaf = leaf[name]
        shape = resnet50_keys[key]  # OIHW convolutions become HWIO
        assert leaf.shape == (shape if len(shape) == 1 else (*shape[2:], shape[1], shape[0])), key


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_round_trip_lands_at_flax_paths(suffix, resnet50_state, tmp_path, caplog):
    path = tmp_path / f"resnet50{suffix}"
    if suffix == ".npz":
        np.savez(path, **resnet50_state)
    else:
        save_file(resnet50_state, str(path))
    cfg = config(depth=50)
    abstract = abstract_variables(cfg, 2)
    with caplog.at_level(logging.INFO, logger="focalnet_jax.models.pretrained"):
        loaded = load_torchvision_resnet(
            abstract, path, components=COMPONENTS[:2], model_config=cfg
        )
    assert "fc.weight" in caplog.text and "unexpected" not in caplog.text

    params, stats = loaded["params"]["backbone"], loaded["batch_stats"]["backbone"]
    torch_w = resnet50_state["layer3.5.conv2.weight"]  # [O, I, kh, kw]
    assert params["layer3_5"]["conv2"]["kernel"][2, 0, 17, 101] == torch_w[101, 17, 2, 0]
    torch_w = resnet50_state["layer4.0.downsample.0.weight"]
    assert params["layer4_0"]["downsample_conv"]["kernel"][0, 0, 1000, 7] == torch_w[7, 1000, 0, 0]
    np.testing.assert_array_equal(
        stats["layer4_0"]["downsample_bn"]["var"],
        resnet50_state["layer4.0.downsample.1.running_var"],
    )
    np.testing.assert_array_equal(params["bn1"]["scale"], resnet50_state["bn1.weight"])
    np.testing.assert_array_equal(
        stats["layer1_2"]["bn3"]["mean"], resnet50_state["layer1.2.bn3.running_mean"]
    )
    rgb = resnet50_state["conv1.weight"]  # [64, 3, 7, 7]
    expected_conv1 = rgb.sum(axis=1) / 2  # [64, 7, 7]
    for component in range(2):
        np.testing.assert_allclose(
            params["conv1"]["kernel"][:, :, component, :],
            expected_conv1.transpose(1, 2, 0),
            rtol=1e-6,
        )
    # The head is left as it was.
    assert loaded["params"]["aspp"] == abstract["params"]["aspp"]

    # Saving inverts loading for every backbone tensor except the adapted first convolution.
    saved = tmp_path / f"saved{suffix}"
    save_torchvision_resnet(loaded, saved, components=COMPONENTS[:2])
    again = read_state_dict(saved)
    assert set(again) == set(
        backbone_key_map({c: loaded[c]["backbone"] for c in ("params", "batch_stats")})
    )
    for key, value in again.items():
        if key != "conv1.weight":
            np.testing.assert_array_equal(value, resnet50_state[key], err_msg=key)


def test_first_conv_adaptation_preserves_grey_response():
    weight = np.random.default_rng(0).standard_normal((8, 3, 7, 7)).astype(np.float32)
    for components in (1, 2, 3, 4):
        adapted = adapt_first_conv(weight, components)
        assert adapted.shape == (8, components, 7, 7)
        # Equal components g respond as the RGB filters to (g, g, g).
        np.testing.assert_allclose(adapted.sum(axis=1), weight.sum(axis=1), rtol=1e-5)


def _load(cfg, state, tmp_path, num_components=3):
    path = tmp_path / "weights.npz"
    np.savez(path, **state)
    return load_torchvision_resnet(
        abstract_variables(cfg, num_components),
        path,
        components=COMPONENTS[:num_components],
        model_config=cfg,
    )


def test_tiny_file_loads_back(tiny_state, tmp_path):
    cfg, state = tiny_state
    loaded = _load(cfg, state, tmp_path)
    np.testing.assert_array_equal(
        loaded["batch_stats"]["backbone"]["layer2_0"]["downsample_bn"]["mean"],
        state["layer2.0.downsample.1.running_mean"],
    )


def test_missing_key_raises_naming_it(tiny_state, tmp_path):
    cfg, state = tiny_state
    state = {k: v for k, v in state.items() if k != "layer2.1.bn2.running_var"}
    with pytest.raises(
        ValueError,
        match=r"1 of the 100 backbone keys of ResNet-18 are missing "
        r"\(layer2\.1\.bn2\.running_var\)$",
    ):
        _load(cfg, state, tmp_path)


def test_wrong_depth_raises_listing_missing_keys(tiny_state, tmp_path):
    _, state = tiny_state
    with pytest.raises(
        ValueError,
        match=r"80 of the 180 backbone keys of ResNet-34 are missing \(layer1\.2\.bn1\.bias,",
    ):
        _load(config(depth=34, width=0.125), state, tmp_path)


def test_shape_mismatch_raises_naming_key_and_shapes(tiny_state, tmp_path):
    _, state = tiny_state
    with pytest.raises(
        ValueError,
        match=r"bn1\.bias has shape \(8,\) .* expects \(16,\) "
        r".*\(model\.width is 0\.25; a torchvision",
    ):
        _load(config(depth=18, width=0.25), state, tmp_path)


def test_unexpected_key_warns(tiny_state, tmp_path, caplog):
    cfg, state = tiny_state
    state = {**state, "layer5.0.conv1.weight": np.zeros((2, 2, 1, 1), np.float32)}
    with caplog.at_level(logging.WARNING, logger="focalnet_jax.models.pretrained"):
        _load(cfg, state, tmp_path)
    assert "1 unexpected keys" in caplog.text and "layer5.0.conv1.weight" in caplog.text


def test_bad_files_and_models_raise(tiny_state, tmp_path):
    cfg, state = tiny_state
    variables = abstract_variables(cfg, 3)
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        load_torchvision_resnet(
            variables, tmp_path / "absent.npz", components=COMPONENTS[:3], model_config=cfg
        )
    # `--config.model.pretrained=None` reaches here as the path 'None': the error says how to
    # train without pretrained weights (`focalnet study` checks an arm's file with the same words).
    with pytest.raises(
        FileNotFoundError,
        match=r"None: no such file \(without pretrained weights: model.pretrained=''\)",
    ):
        load_torchvision_resnet(
            variables, tmp_path / "None", components=COMPONENTS[:3], model_config=cfg
        )
    bad = tmp_path / "weights.h5"
    bad.write_bytes(b"")
    with pytest.raises(ValueError, match=r"weights\.h5: expected a suffix"):
        load_torchvision_resnet(variables, bad, components=COMPONENTS[:3], model_config=cfg)
    with pytest.raises(ValueError, match="components"):
        load_torchvision_resnet(variables, bad, components=(), model_config=cfg)
    with pytest.raises(ValueError, match="model.name"):
        load_torchvision_resnet(
            variables, bad, components=COMPONENTS[:3], model_config=config(name="unet")
        )


def test_pth_needs_torch(tmp_path):
    try:
        import torch  # noqa: F401
    except ImportError:
        path = tmp_path / "weights.pth"
        path.write_bytes(b"not a pickle")
        with pytest.raises(UserError, match="needs torch"):
            read_state_dict(path)
    else:
        pytest.skip("torch is installed; the .pth path is covered by the torch-marked test")


@pytest.mark.torch
@jax.default_matmul_precision("highest")  # full float32 convolutions also on GPUs (no TF32)
@pytest.mark.parametrize("output_stride", [32, 8])
@pytest.mark.parametrize("components", [2, 3])
def test_converted_weights_reproduce_torchvision_features(output_stride, components, tmp_path):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    from focalnet_jax.models.resnet import ResNet

    torch.manual_seed(0)
    dilate = {32: [False, False, False], 8: [False, True, True]}[output_stride]
    net = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=dilate)
    for module in net.modules():  # non-trivial running statistics
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    net.eval()
    path = tmp_path / "resnet50.pth"
    torch.save(net.state_dict(), path)

    grey = np.random.default_rng(0).standard_normal((1, 64, 64, 1)).astype(np.float32)
    with torch.no_grad():
        rgb = torch.from_numpy(np.repeat(grey, 3, axis=-1).transpose(0, 3, 1, 2))
        features = torch.nn.Sequential(*list(net.children())[:-2])(rgb).numpy()
    reference = features.transpose(0, 2, 3, 1)

    cfg = config(depth=50, output_stride=output_stride)
    variables = load_torchvision_resnet(
        abstract_variables(cfg, components),
        path,
        components=COMPONENTS[:components],
        model_config=cfg,
    )
    backbone = {c: variables[c]["backbone"] for c in ("params", "batch_stats")}
    x = np.repeat(grey, components, axis=-1)
    ours = np.asarray(ResNet(depth=50, output_stride=output_stride).apply(backbone, x))
    assert ours.shape == reference.shape
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())


def _torchvision_like_state(keys: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    """Random weights of torchvision's scale: He-normal convolutions, BatchNorm affine terms and
    running statistics near 1 and 0 (features stay O(1) through 16 blocks)."""
    rng = np.random.default_rng(seed)
    state = {}
    for key, shape in keys.items():
        if len(shape) == 4:
            value = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
        elif key.endswith(("running_var", ".weight")) and len(shape) == 1:
            value = rng.uniform(0.5, 1.5, shape)
        elif len(shape) == 1:
            value = rng.uniform(-0.2, 0.2, shape)
        else:  # num_batches_tracked; fc.weight is 2D and unused
            value = rng.standard_normal(shape)
        state[key] = np.asarray(value, np.float32)
    return state


@jax.default_matmul_precision("highest")  # full float32 convolutions also on GPUs (no TF32)
@pytest.mark.parametrize("output_stride", [32, 8])
def test_converted_resnet50_reproduces_the_numpy_torchvision_forward(
    output_stride, resnet50_keys, tmp_path
):
    """Without torch: ImageNet-layout RGB weights, converted for 2 components, give on (g, g) the
    layer4 features a NumPy float64 forward of torchvision's definition gives on (g, g, g)."""
    from numpy_torchvision_resnet import features

    from focalnet_jax.models.resnet import ResNet

    state = _torchvision_like_state(resnet50_keys, seed=3)
    path = tmp_path / "resnet50.safetensors"
    save_file(state, str(path))
    dilate = {32: (False, False, False), 8: (False, True, True)}[output_stride]
    grey = np.random.default_rng(4).standard_normal((1, 1, 64, 64)).astype(np.float32)
    reference = features(state, np.repeat(grey, 3, axis=1), 50, dilate).transpose(0, 2, 3, 1)

    cfg = config(depth=50, output_stride=output_stride)
    variables = load_torchvision_resnet(
        abstract_variables(cfg, 2), path, components=COMPONENTS[:2], model_config=cfg
    )
    backbone = {c: variables[c]["backbone"] for c in ("params", "batch_stats")}
    x = np.repeat(grey.transpose(0, 2, 3, 1), 2, axis=-1)
    ours = np.asarray(ResNet(depth=50, output_stride=output_stride).apply(backbone, x))
    assert ours.shape == reference.shape == (1, 64 // output_stride, 64 // output_stride, 2048)
    assert np.abs(reference).max() > 0.1 and (reference > 0).mean() > 0.1  # not a dead network
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())


@jax.default_matmul_precision("highest")
def test_resnet18_file_with_named_components_reproduces_the_numpy_torchvision_forward(tmp_path):
    """Basic blocks: a ResNet-18 file (width 0.125) whose conv1 names the 3 components is, once
    loaded, the network a NumPy forward of torchvision's ResNet-18 computes from that file."""
    from numpy_torchvision_resnet import features

    from focalnet_jax.models.resnet import ResNet

    cfg = config(depth=18, width=0.125)
    abstract = abstract_variables(cfg, 3)
    backbone = {c: abstract[c]["backbone"] for c in ("params", "batch_stats")}
    shapes = {}
    for key, (collection, names) in backbone_key_map(backbone).items():
        leaf = backbone[collection]
        for name in names:
            leaf = leaf[name]
        hwio = leaf.shape
        shapes[key] = hwio if len(hwio) == 1 else (hwio[3], hwio[2], hwio[0], hwio[1])
    state = _torchvision_like_state(shapes, seed=5)
    path = tmp_path / "resnet18.npz"
    np.savez(path, **state, **{MARKER: np.asarray(",".join(COMPONENTS[:3]))})

    x = np.random.default_rng(6).standard_normal((2, 3, 48, 40)).astype(np.float32)
    reference = features(state, x, 18).transpose(0, 2, 3, 1)
    variables = load_torchvision_resnet(abstract, path, components=COMPONENTS[:3], model_config=cfg)
    loaded = {c: variables[c]["backbone"] for c in ("params", "batch_stats")}
    model = ResNet(depth=18, output_stride=32, width=cfg.width)
    ours = np.asarray(model.apply(loaded, x.transpose(0, 2, 3, 1)))
    assert ours.shape == reference.shape == (2, 2, 2, 64)
    assert np.abs(reference).max() > 0.1 and (reference > 0).mean() > 0.1
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())


@pytest.mark.parametrize(
    "name, content",
    [
        ("truncated.safetensors", b"garbage"),
        ("empty.npz", b""),
        ("text.npz", b"not a zip archive"),
    ],
)
def test_unreadable_file_is_a_user_error_naming_it(tiny_state, tmp_path, name, content):
    cfg, _ = tiny_state
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError, match=rf"pretrained weights {re.escape(str(path))}: ") as info:
        load_torchvision_resnet(
            abstract_variables(cfg, 3), path, components=COMPONENTS[:3], model_config=cfg
        )
    assert is_user_error(info.value) and "\n" not in str(info.value)


def test_npz_with_pickled_objects_is_refused_naming_the_file(tiny_state, tmp_path):
    cfg, _ = tiny_state
    path = tmp_path / "objects.npz"
    np.savez(path, conv1=np.array([{"a": 1}], dtype=object))
    with pytest.raises(UserError, match=r"objects\.npz: "):
        read_state_dict(path)


def test_weights_that_do_not_fit_are_user_errors(tiny_state, tmp_path):
    # `focalnet train` prints user errors as one line; a mismatching file is the user's to fix.
    _, state = tiny_state
    with pytest.raises(UserError, match=r"weights\.npz: .*bn1\.bias has shape"):
        _load(config(depth=18, width=0.25), state, tmp_path)
    with pytest.raises(UserError, match=r"weights\.npz: .*keys of ResNet-34 are missing"):
        _load(config(depth=34, width=0.125), state, tmp_path)


@pytest.mark.parametrize("components,suffix", [(2, "safetensors"), (3, "npz"), (3, "safetensors")])
def test_first_conv_of_the_models_own_components_is_kept(components, suffix, tmp_path):
    # A backbone saved from the model (save_torchvision_resnet) keeps one filter per component
    # and names them in the file; loading it back must not average the T2w, ADC (and HBV)
    # filters into one, not even for 3 components, whose filters would otherwise read as RGB.
    cfg = config(depth=18, width=0.125)
    rng = np.random.default_rng(2)
    variables = random_variables(abstract_variables(cfg, components), rng)
    names = COMPONENTS[:components]
    path = tmp_path / f"mri.{suffix}"
    save_torchvision_resnet(variables, path, components=names)
    backbone = {c: variables[c]["backbone"] for c in ("params", "batch_stats")}
    assert sorted(read_state_dict(path)) == sorted(backbone_key_map(backbone))  # marker apart
    kernel = variables["params"]["backbone"]["conv1"]["kernel"]  # [7, 7, C, O]
    loaded = load_torchvision_resnet(
        abstract_variables(cfg, components), path, components=names, model_config=cfg
    )
    np.testing.assert_array_equal(loaded["params"]["backbone"]["conv1"]["kernel"], kernel)
    # A model listing the same components in another order gets each component's own filters.
    reordered = names[::-1]
    loaded = load_torchvision_resnet(
        abstract_variables(cfg, components), path, components=reordered, model_config=cfg
    )
    np.testing.assert_array_equal(
        loaded["params"]["backbone"]["conv1"]["kernel"], kernel[:, :, ::-1, :]
    )
    # Into other components it is refused, naming the file and both component lists.
    other = ("t2w", "adc", "hbv", "dce")
    expected = (
        f"mri.{suffix}: conv1.weight (shape (8, {components}, 7, 7)) holds the filters of "
        f"components {list(names)}, the model has {list(other)}"
    )
    with pytest.raises(UserError, match=re.escape(expected)):
        load_torchvision_resnet(
            abstract_variables(cfg, 4), path, components=other, model_config=cfg
        )
    swapped = ("dce", *names[1:])
    with pytest.raises(UserError, match="holds the filters of components"):
        load_torchvision_resnet(
            abstract_variables(cfg, components), path, components=swapped, model_config=cfg
        )
    with pytest.raises(ValueError, match=f"do not name the {components} input channels"):
        save_torchvision_resnet(variables, path, components=names[:1])
    # One string of as many letters as channels was written as a marker of single letters.
    letters = "".join(name[0] for name in names)
    with pytest.raises(ValueError, match=f"components: expected names, got '{letters}'"):
        save_torchvision_resnet(variables, path, components=letters)


def test_an_unknown_marker_is_refused(tiny_state, tmp_path):
    _, state = tiny_state
    path = tmp_path / "marked.npz"
    np.savez(path, **state, **{MARKER: np.asarray("t2w,,adc")})
    with pytest.raises(UserError, match=r"marked\.npz: focalnet_jax\.conv1_input is 't2w,,adc', "
                       r"expected distinct component names joined by ','"):  # fmt: skip
        read_state_dict(path)
    np.savez(path, **state, **{MARKER: np.asarray("t2w,t2w")})
    with pytest.raises(UserError, match="expected distinct component names"):
        read_state_dict(path)
