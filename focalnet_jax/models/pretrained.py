"""ImageNet-pretrained ResNet weights in torchvision's ``state_dict`` layout -> DeepLab variables.

The file is local (nothing is downloaded): ``.safetensors``, ``.npz`` or ``.pth``/``.pt`` (read with
``torch.load(..., weights_only=True)``; torch is only imported for that format). Every leaf of the
Flax backbone has one torchvision key:

===========================================  ==================================================
torchvision                                  Flax (``backbone`` subtree)
===========================================  ==================================================
``conv1.weight`` [O, I, kh, kw]              ``params/conv1/kernel`` [kh, kw, I, O]
``bn1.weight`` / ``bn1.bias``                ``params/bn1/scale`` / ``params/bn1/bias``
``bn1.running_mean`` / ``running_var``       ``batch_stats/bn1/mean`` / ``batch_stats/bn1/var``
``layer{s}.{i}.conv{k}`` / ``bn{k}``         ``layer{s}_{i}/conv{k}`` / ``bn{k}``
``layer{s}.{i}.downsample.0`` / ``.1``       ``layer{s}_{i}/downsample_conv`` / ``downsample_bn``
===========================================  ==================================================

``fc.*`` (the ImageNet classifier) and ``*.num_batches_tracked`` have no counterpart in the
segmentation network and are reported as ignored. A backbone key absent from the file is an
error naming them (the first ten, and a prefix they carry in the file); so is a ResNet block
the model lacks (a deeper ResNet's file: its other keys would all fit); any other key that is
neither mapped nor ignored is logged as a warning; a shape mismatch is an error naming the key
and both shapes; so is a backbone tensor holding NaN or infinity, or a negative running variance
(training would stop at its first step on a non-finite loss, or validate NaN), naming the key and
how many values. These errors, and a file its format's
reader cannot read, are ``PretrainedWeightsError`` (a ``UserError``: one line naming the file).

First convolution: the RGB filters ``w`` [O, 3, 7, 7] (or grey ones, [O, 1, 7, 7]) become
``sum_rgb(w) / C`` repeated for each of the model's ``C`` components (input channels). An input
whose C components all equal an image g then gives exactly the response of the RGB network to the
grey image (g, g, g), so the pretrained filters keep their scale whatever the number of MRI
components.
A backbone written by :func:`save_torchvision_resnet` names the MRI component of each of its
first-convolution input channels (``focalnet_jax.conv1_input = "t2w,adc,hbv"``: safetensors
metadata, or a string entry of the ``.npz``); it loads into a model with the same components, 3
included, in whatever order that model lists them (the filters follow their component), and is
refused for any other set of components. An unmarked file whose first convolution has C input
channels (C other than 3) is loaded as it is, in its own channel order; any other channel count is
an error.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from focalnet_jax.errors import UserError

log = logging.getLogger(__name__)

_SUFFIXES = (".safetensors", ".npz", ".pth", ".pt")
_BN_PARAMS = {"scale": "weight", "bias": "bias"}
_BN_STATS = {"mean": "running_mean", "var": "running_var"}
_IGNORED = re.compile(r"^fc\.(weight|bias)$|(^|\.)num_batches_tracked$")
_BLOCK = re.compile(r"^layer([1-4])\.(\d+)\.")  # a ResNet block's key: its stage, its index
_SHOWN = 10  # keys named in an error
MARKER = "focalnet_jax.conv1_input"  # "t2w,adc,...": the component of each conv1 input channel


class PretrainedWeightsError(UserError):
    """A weights file that cannot be read or does not fit the model (names the file and why)."""


def no_such_weights_file(path: str | Path) -> str:
    """'no such file', saying how to train without pretrained weights where `path` is the text
    'None' (what `--config.model.pretrained=None` gives: the field is a path or '')."""
    none = Path(path).name.lower() in ("none", "null", "false")
    return "no such file" + (" (without pretrained weights: model.pretrained='')" if none else "")


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Reads a torchvision-layout ``state_dict`` as float32 NumPy arrays keyed by name.

    ``.pth`` files may hold the ``state_dict`` itself or a dict with a ``'state_dict'`` or
    ``'model_state_dict'`` entry.
    """
    return _read_weights(path)[0]


def _read_weights(path: str | Path) -> tuple[dict[str, np.ndarray], tuple[str, ...] | None]:
    """(the ``state_dict`` as float32 arrays, the components its ``MARKER`` names or None)."""
    path = Path(path)
    if path.is_dir():
        raise PretrainedWeightsError(f"pretrained weights {path}: a folder, not a weights file")
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights {path}: {no_such_weights_file(path)}")
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise PretrainedWeightsError(f"pretrained weights {path}: expected a suffix in {_SUFFIXES}")
    try:
        tensors, marker = _read_tensors(path, suffix)
        state = {key: np.asarray(value, dtype=np.float32) for key, value in tensors.items()}
    except PretrainedWeightsError:
        raise
    except Exception as error:  # whatever the format's reader raises on a damaged file
        reason = str(error).replace("\n", " ") or "no details"
        raise PretrainedWeightsError(
            f"pretrained weights {path}: unreadable {suffix} file ({type(error).__name__}: "
            f"{reason})"
        ) from error
    if marker is None:
        return state, None
    named = tuple(marker.split(","))
    if not all(named) or len(set(named)) != len(named):
        raise PretrainedWeightsError(
            f"pretrained weights {path}: {MARKER} is {marker!r}, expected distinct component "
            "names joined by ',' (e.g. 't2w,adc')"
        )
    return state, named


def _read_tensors(path: Path, suffix: str) -> tuple[Mapping[str, Any], str | None]:
    """The file's tensors by name, as its format's reader gives them, and its ``MARKER`` value
    (None without one; torch files have none)."""
    if suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as archive:
            tensors = {key: archive.get_tensor(key) for key in archive.keys()}
            return tensors, (archive.metadata() or {}).get(MARKER)
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            tensors = {key: archive[key] for key in archive.files}
        marker = tensors.pop(MARKER, None)
        return tensors, None if marker is None else str(marker)
    try:
        import torch
    except ImportError as error:
        raise PretrainedWeightsError(
            f"pretrained weights {path}: reading .pth needs torch; install it or convert the "
            "file to .safetensors/.npz"
        ) from error
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    for nested in ("state_dict", "model_state_dict"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(nested), Mapping):
            loaded = loaded[nested]
    if not isinstance(loaded, Mapping):
        raise PretrainedWeightsError(
            f"pretrained weights {path}: expected a state_dict (a dict of tensors), got "
            f"{type(loaded).__name__}"
        )
    return {key: value.detach().cpu().float().numpy() for key, value in loaded.items()}, None


def torchvision_key(module_path: tuple[str, ...]) -> str:
    """torchvision module name of a Flax backbone module path, e.g.
    ``('layer3_0', 'downsample_conv') -> 'layer3.0.downsample.0'``."""
    parts = []
    for name in module_path:
        block = re.fullmatch(r"layer(\d)_(\d+)", name)
        if block:
            parts += [f"layer{block[1]}", block[2]]
        elif name in ("downsample_conv", "downsample_bn"):
            parts += ["downsample", "0" if name == "downsample_conv" else "1"]
        else:
            parts.append(name)
    return ".".join(parts)


def backbone_key_map(backbone: Mapping[str, Any]) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Maps each torchvision key to ``(collection, path)`` in a backbone ``{'params',
    'batch_stats'}`` tree (``path`` is the tuple of dict keys below the collection)."""
    mapping = {}
    for collection, names in (
        ("params", {"kernel": "weight", **_BN_PARAMS}),
        ("batch_stats", _BN_STATS),
    ):
        for path in _leaf_paths(backbone.get(collection, {})):
            module_path, leaf = path[:-1], path[-1]
            if leaf not in names:
                raise ValueError(f"backbone leaf {'/'.join(path)}: no torchvision counterpart")
            mapping[f"{torchvision_key(module_path)}.{names[leaf]}"] = (collection, path)
    return mapping


def adapt_first_conv(weight: np.ndarray, num_components: int) -> np.ndarray:
    """RGB filters [O, 3, kh, kw] -> [O, num_components, kh, kw]: ``sum_rgb / num_components``
    repeated per component (see the module docstring)."""
    summed = weight.sum(axis=1, keepdims=True) / num_components
    return np.repeat(summed, num_components, axis=1)


def _first_conv(
    weight: np.ndarray, components: Sequence[str], path, marked: tuple[str, ...] | None
) -> np.ndarray:
    """The file's first convolution [O, I, kh, kw] for the model's ``components``: a file that
    names its channels' components (``marked``) gives each model component its filters; an
    unmarked one is kept where I = len(components) (but RGB's 3) and adapted from RGB or grey
    filters; anything else is an error naming the file."""
    channels = weight.shape[1] if weight.ndim == 4 else None
    num_components = len(components)
    if marked is not None:
        if channels != len(marked) or sorted(marked) != sorted(components):
            raise PretrainedWeightsError(
                f"pretrained weights {path}: conv1.weight (shape {tuple(weight.shape)}) holds "
                f"the filters of components {list(marked)}, the model has {list(components)}"
            )
        return weight[:, [marked.index(c) for c in components]]
    if channels == num_components and channels != 3:
        return weight
    if channels in (1, 3):
        return adapt_first_conv(weight, num_components)
    raise PretrainedWeightsError(
        f"pretrained weights {path}: conv1.weight has {channels} input channels (shape "
        f"{tuple(weight.shape)}): expected RGB (3), grey (1) or the model's {num_components} "
        "components"
    )


def _leaf_paths(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = []
    for name, value in tree.items():
        if isinstance(value, Mapping):
            paths += _leaf_paths(value, (*prefix, name))
        else:
            paths.append((*prefix, name))
    return paths


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for name in path[:-1]:
        tree = tree[name]
    tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]) -> Any:
    for name in path:
        tree = tree[name]
    return tree


def _to_flax(value: np.ndarray) -> np.ndarray:
    """OIHW convolution -> HWIO; vectors unchanged."""
    return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value


def _to_torch(value: np.ndarray) -> np.ndarray:
    return value.transpose(3, 2, 0, 1) if value.ndim == 4 else value


def _copy_tree(tree: Any) -> Any:
    return {k: _copy_tree(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def _backbone(variables: Mapping[str, Any]) -> dict[str, Any]:
    if "backbone" not in variables.get("params", {}):
        raise ValueError("variables: expected a DeepLab tree with params['backbone']")
    return {c: variables[c]["backbone"] for c in ("params", "batch_stats") if c in variables}


def _check_request(model_config: ml_collections.ConfigDict, components: Sequence[str]) -> None:
    """Pretrained ResNet weights fit a DeepLab backbone and at least one named component."""
    if model_config.name != "deeplab":
        raise UserError(
            f"model.name: pretrained ResNet weights need 'deeplab', got {model_config.name!r}"
        )
    if isinstance(components, str) or not components or not all(components):
        raise ValueError(f"components: expected component names, got {components!r}")


def _check_keys(state: Mapping[str, np.ndarray], mapping: Mapping, path, depth: int) -> None:
    """Raises naming the backbone keys missing from the file (and a prefix they carry there, e.g.
    DataParallel's ``module.``) or the ResNet blocks the file has beyond the model's (a deeper
    ResNet's file, whose other keys would all fit); logs the other keys not loaded (a warning
    for unexpected ones, info for the ignored classifier and BN counters)."""
    missing = sorted(set(mapping) - set(state))
    if missing:
        raise PretrainedWeightsError(
            f"pretrained weights {path}: {len(missing)} of the {len(mapping)} backbone keys of "
            f"ResNet-{depth} are missing ({_first(missing)}){_prefix_hint(state, mapping, missing)}"
        )
    unexpected = sorted(key for key in state if key not in mapping and not _IGNORED.search(key))
    own = _blocks(mapping)
    extra = sorted(_blocks(unexpected) - own)
    if extra:
        raise PretrainedWeightsError(
            f"pretrained weights {path}: the file has ResNet blocks the model lacks "
            f"({_first([f'layer{stage}.{index}' for stage, index in extra])}): its stages have "
            f"{_stage_counts(_blocks(state))} blocks, ResNet-{depth}'s {_stage_counts(own)}; set "
            "model.depth to the file's ResNet"
        )
    ignored = sorted(key for key in state if key not in mapping and _IGNORED.search(key))
    if unexpected:
        log.warning(
            "pretrained weights %s: %d unexpected keys not loaded: %s",
            path,
            len(unexpected),
            unexpected,
        )
    if ignored:
        log.info(
            "pretrained weights %s: ignored %d keys (classifier, BN counters): %s",
            path,
            len(ignored),
            ignored,
        )


def _first(names: Sequence[str]) -> str:
    """The first `_SHOWN` of `names` joined by ', ', '...' after them where there are more."""
    return ", ".join(names[:_SHOWN]) + (", ..." if len(names) > _SHOWN else "")


def _prefix_hint(state: Mapping[str, np.ndarray], mapping: Mapping, missing: Sequence[str]) -> str:
    """'; the file holds them under the prefix ...' where the file holds every backbone key of
    `mapping` under one prefix (a ``state_dict`` saved from a wrapped model, e.g.
    ``module.conv1.weight``), else ''."""
    for key in state:
        if key.endswith(f".{missing[0]}"):
            prefix = key[: -len(missing[0])]
            if all(prefix + name in state for name in mapping):
                return (
                    f"; the file holds them under the prefix {prefix!r}: save it without that "
                    "prefix"
                )
    return ""


def _blocks(keys) -> set[tuple[int, int]]:
    """The (stage, index) of every ResNet block (`layer<stage>.<index>.`) that `keys` name."""
    return {(int(m[1]), int(m[2])) for key in keys if (m := _BLOCK.match(key))}


def _stage_counts(blocks: set[tuple[int, int]]) -> list[int]:
    """The number of blocks of each ResNet stage (layer1..layer4) among `blocks`."""
    return [sum(1 for stage, _ in blocks if stage == s) for s in range(1, 5)]


def _bad_values(key: str, value: np.ndarray) -> str | None:
    """Why the values of tensor `key` would break training (NaN or infinity; a negative running
    variance, whose square root is NaN), else None."""
    if bad := int(value.size - np.count_nonzero(np.isfinite(value))):
        return f"{bad} of {value.size} values are not finite"
    if key.endswith("running_var") and (bad := int(np.count_nonzero(value < 0))):
        return f"{bad} of {value.size} running variances are negative"
    return None


def _fill_backbone(
    target: dict,
    state: Mapping,
    mapping: Mapping,
    path,
    components: Sequence[str],
    marked: tuple[str, ...] | None,
    width: float,
) -> None:
    """Sets every mapped leaf of the backbone tree `target` (in place) to its torchvision tensor
    in Flax layout as float32 (the first convolution made to fit `components`, see
    `_first_conv`); a shape other than the model's is an error naming the key, both shapes and
    the leaf (and the model's `width` where it is not torchvision's 1.0), and so is a tensor of
    values no network can use (`_bad_values`)."""
    for key, (collection, leaf_path) in sorted(mapping.items()):
        value = state[key]
        if bad := _bad_values(key, value):
            raise PretrainedWeightsError(f"pretrained weights {path}: {key}: {bad}")
        if key == "conv1.weight":
            value = _first_conv(value, components, path, marked)
        value = _to_flax(value)
        expected = tuple(_get(target[collection], leaf_path).shape)
        if value.shape != expected:
            raise PretrainedWeightsError(
                f"pretrained weights {path}: {key} has shape {tuple(state[key].shape)} "
                f"(as Flax {value.shape}) but the model expects {expected} at "
                f"{collection}/backbone/{'/'.join(leaf_path)}"
                + (
                    f" (model.width is {width}; a torchvision ResNet has width 1.0)"
                    if width != 1
                    else ""
                )
            )
        _set(target[collection], leaf_path, np.ascontiguousarray(value, dtype=np.float32))


def load_torchvision_resnet(
    variables: Mapping[str, Any],
    path: str | Path,
    *,
    components: Sequence[str],
    model_config: ml_collections.ConfigDict,
) -> dict[str, Any]:
    """Returns ``variables`` with the DeepLab backbone replaced by the weights in ``path``.

    Args:
      variables: ``{'params', 'batch_stats'}`` of the model built from ``model_config``
        (leaves may be arrays or ``jax.ShapeDtypeStruct``; only their shapes are read).
      path: torchvision ResNet ``state_dict`` file (.safetensors, .npz, .pth).
      components: the model's MRI components, one input channel each, in input order (e.g.
        ``('t2w', 'adc')``); the first convolution is made to fit them.
      model_config: the model configuration (a DeepLab; a torchvision file fits ``width=1.0``).

    Returns:
      A new variables dict: backbone leaves are float32 NumPy arrays, the rest is unchanged.
    """
    _check_request(model_config, components)
    state, marked = _read_weights(path)
    mapping = backbone_key_map(_backbone(variables))
    _check_keys(state, mapping, path, model_config.depth)
    result = _copy_tree(variables)
    _fill_backbone(_backbone(result), state, mapping, path, components, marked, model_config.width)
    log.info("pretrained weights %s: loaded %d backbone tensors", path, len(mapping))
    return result


def save_torchvision_resnet(
    variables: Mapping[str, Any], path: str | Path, *, components: Sequence[str]
) -> None:
    """Writes the DeepLab backbone of ``variables`` (a model of ``components``, in input order)
    as a torchvision-layout ``state_dict`` (``.safetensors`` or ``.npz``) whose ``MARKER`` names
    the component of each first-convolution input channel: :func:`load_torchvision_resnet`
    inverts it for a model of the same components, in any order, and refuses any other."""
    backbone = _backbone(variables)
    state = {
        key: np.ascontiguousarray(_to_torch(np.asarray(_get(backbone[c], p), dtype=np.float32)))
        for key, (c, p) in backbone_key_map(backbone).items()
    }
    channels = state["conv1.weight"].shape[1]
    if isinstance(components, str):  # 'adc' would name three channels 'a', 'd', 'c'
        raise ValueError(f"save_torchvision_resnet: components: expected names, got {components!r}")
    if len(components) != channels or len(set(components)) != channels or not all(components):
        raise ValueError(
            f"save_torchvision_resnet: components {list(components)} do not name the "
            f"{channels} input channels of conv1 once each"
        )
    marker = ",".join(components)
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file(state, str(path), metadata={MARKER: marker})
    elif path.suffix == ".npz":
        np.savez(path, **state, **{MARKER: np.asarray(marker)})
    else:
        raise ValueError(f"save_torchvision_resnet: path {path} must end in .safetensors or .npz")
