"""Weights files that do not fit the model are refused in one line naming the cause
(focalnet_jax/models/pretrained.py): a deeper ResNet's file, keys under a prefix, a folder, NaN
weights, negative running variances."""

from __future__ import annotations

import numpy as np
import pytest
from test_pretrained import COMPONENTS, _load, abstract_variables, config, random_variables

from focalnet_jax.errors import UserError
from focalnet_jax.models.pretrained import (
    load_torchvision_resnet,
    read_state_dict,
    save_torchvision_resnet,
)


def _random_file(tmp_path, depth: int):
    """A tiny ResNet-`depth` backbone (width 0.125) of random weights saved as a file; its path."""
    rng = np.random.default_rng(depth)
    variables = random_variables(abstract_variables(config(depth=depth, width=0.125), 3), rng)
    path = tmp_path / f"resnet{depth}.npz"
    save_torchvision_resnet(variables, path, components=COMPONENTS[:3])
    return path


@pytest.fixture(scope="module")
def tiny_state(tmp_path_factory):
    """(config, state_dict) of a tiny ResNet-18 DeepLab saved in torchvision's layout."""
    path = _random_file(tmp_path_factory.mktemp("tiny"), 18)
    return config(depth=18, width=0.125), read_state_dict(path)


def test_a_deeper_resnets_file_is_refused_naming_its_extra_blocks(tmp_path):
    """Every key of a ResNet-18 is in a ResNet-34 file with the same shape: before, such a file
    loaded into a ResNet-18 with only a warning, a network of the file's first blocks of each
    stage followed by its last stage's first blocks, which expect another input."""
    path = _random_file(tmp_path, 34)
    with pytest.raises(UserError) as error:
        _load(config(depth=18, width=0.125), read_state_dict(path), tmp_path)
    assert str(error.value) == (
        f"pretrained weights {tmp_path / 'weights.npz'}: the file has ResNet blocks the model "
        "lacks (layer1.2, layer2.2, layer2.3, layer3.2, layer3.3, layer3.4, layer3.5, layer4.2): "
        "its stages have [3, 4, 6, 3] blocks, ResNet-18's [2, 2, 2, 2]; set model.depth to the "
        "file's ResNet"
    )


def test_keys_under_a_prefix_are_named_with_it_in_a_short_line(tiny_state, tmp_path):
    """A state_dict saved from a wrapped model (DataParallel's `module.`): the error names the
    prefix and ten of the 100 keys, not all of them."""
    cfg, state = tiny_state
    wrapped = {f"module.{key}": value for key, value in state.items()}
    with pytest.raises(UserError) as error:
        _load(cfg, wrapped, tmp_path)
    message = str(error.value)
    assert "100 of the 100 backbone keys of ResNet-18 are missing (bn1.bias, " in message
    assert message.endswith(
        ", ...); the file holds them under the prefix 'module.': save it without that prefix"
    )
    assert message.count(".weight") + message.count(".bias") + message.count("running_") == 10


def test_a_folder_is_not_a_weights_file(tiny_state, tmp_path):
    cfg, _ = tiny_state
    folder = tmp_path / "weights.safetensors"
    folder.mkdir()
    with pytest.raises(UserError, match=r"weights\.safetensors: a folder, not a weights file$"):
        load_torchvision_resnet(
            abstract_variables(cfg, 3), folder, components=COMPONENTS[:3], model_config=cfg
        )


def test_a_file_of_other_blocks_of_the_same_counts_is_a_shape_error(tmp_path):
    """A ResNet-50 file (bottleneck blocks, with conv3) has ResNet-34's block counts: its blocks
    are the model's, so the shape of its first differing tensor is named, not extra blocks."""
    path = _random_file(tmp_path, 50)
    with pytest.raises(UserError, match=r"layer1\.0\.conv1\.weight has shape \(8, 8, 1, 1\)"):
        _load(config(depth=34, width=0.125), read_state_dict(path), tmp_path)


def test_keys_missing_without_a_prefix_name_no_prefix(tiny_state, tmp_path):
    """The stem's `bn1.*` missing: `layer1.0.bn1.bias` ends with `.bn1.bias`, but 'layer1.0.' is
    no prefix the file holds the stem under."""
    cfg, state = tiny_state
    stem = {key: value for key, value in state.items() if not key.startswith("bn1.")}
    with pytest.raises(UserError) as error:
        _load(cfg, stem, tmp_path)
    assert str(error.value).endswith(
        "4 of the 100 backbone keys of ResNet-18 are missing (bn1.bias, bn1.running_mean, "
        "bn1.running_var, bn1.weight)"
    )


@pytest.mark.parametrize(
    "key,value,reason",
    [
        ("layer1.0.conv1.weight", np.nan, "576 of 576 values are not finite"),
        ("bn1.running_mean", np.inf, "8 of 8 values are not finite"),
        ("bn1.running_var", -1.0, "8 of 8 running variances are negative"),
    ],
)
def test_values_no_network_can_use_are_refused_naming_the_key(
    tiny_state, tmp_path, key, value, reason
):
    """NaN weights loaded ("loaded 100 backbone tensors") and the run stopped at step 1 on a
    non-finite loss, blaming nothing; negative running variances trained to val/loss nan."""
    cfg, state = tiny_state
    with pytest.raises(UserError) as error:
        _load(cfg, {**state, key: np.full_like(state[key], value)}, tmp_path)
    assert str(error.value) == f"pretrained weights {tmp_path / 'weights.npz'}: {key}: {reason}"
