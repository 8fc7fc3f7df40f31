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
error listing all of them; a key that is neither mapped nor ignored is logged as a warning; a
shape mismatch is an error naming the key and both shapes. These errors, and a file its format's
reader cannot read, are ``PretrainedWeightsError`` (a ``UserError``: one line naming the file).

First convolution: the RGB filters ``w`` [O, 3, 7, 7] (or grey ones, [O, 1, 7, 7]) become
``sum_rgb(w) / C`` repeated for each of the ``C = num_components`` input channels. An input whose C
components all equal an image g then gives exactly the response of the RGB network to the grey
image (g, g, g), so the pretrained filters keep their scale whatever the number of MRI components.
A backbone written by :func:`save_torchvision_resnet` is marked as holding one filter per MRI
component (``focalnet_jax.conv1_input = components``: safetensors metadata, or a string entry of
the ``.npz``) and is loaded as it is for the same number of components, 3 included; an unmarked
file whose first convolution has C input channels (C other than 3) is loaded as it is too; any
other channel count is an error. The marker does not name the components: a model loading such a
file must list them in the order the saving model had.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
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
MARKER = "focalnet_jax.conv1_input"  # = "components": conv1 holds one filter per MRI component


class PretrainedWeightsError(UserError):
    """A weights file that cannot be read or does not fit the model (names the file and why)."""


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Reads a torchvision-layout ``state_dict`` as float32 NumPy arrays keyed by name.

    ``.pth`` files may hold the ``state_dict`` itself or a dict with a ``'state_dict'`` or
    ``'model_state_dict'`` entry.
    """
    return _read_weights(path)[0]


def _read_weights(path: str | Path) -> tuple[dict[str, np.ndarray], bool]:
    """(the ``state_dict`` as float32 arrays, whether the file carries ``MARKER``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights {path}: no such file")
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
    if marker not in (None, "components"):
        raise PretrainedWeightsError(
            f"pretrained weights {path}: {MARKER} is {marker!r}, expected 'components'"
        )
    return state, marker is not None


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


def _first_conv(weight: np.ndarray, num_components: int, path, marked: bool) -> np.ndarray:
    """The file's first convolution [O, I, kh, kw] for ``num_components`` input channels: kept
    where I = num_components and the file is marked as per-component (or I is not RGB's 3),
    adapted from unmarked RGB or grey filters, else an error naming the file."""
    channels = weight.shape[1] if weight.ndim == 4 else None
    if channels == num_components and (marked or channels != 3):
        return weight
    if marked:
        raise PretrainedWeightsError(
            f"pretrained weights {path}: conv1.weight holds the filters of {channels} MRI "
            f"components (shape {tuple(weight.shape)}), the model has {num_components}"
        )
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


def _check_request(model_config: ml_collections.ConfigDict, num_components: int) -> None:
    """Pretrained ResNet weights fit a DeepLab backbone and a positive number of components."""
    if model_config.name != "deeplab":
        raise UserError(
            f"model.name: pretrained ResNet weights need 'deeplab', got {model_config.name!r}"
        )
    if not isinstance(num_components, int) or num_components < 1:
        raise ValueError(f"num_components: expected a positive int, got {num_components!r}")


def _check_keys(state: Mapping[str, np.ndarray], mapping: Mapping, path, depth: int) -> None:
    """Raises naming every backbone key missing from the file; logs the keys that are not
    loaded (a warning for unexpected ones, info for the ignored classifier and BN counters)."""
    missing = sorted(set(mapping) - set(state))
    if missing:
        raise PretrainedWeightsError(
            f"pretrained weights {path}: {len(missing)} backbone keys missing for ResNet-"
            f"{depth}: {missing}"
        )
    ignored = sorted(key for key in state if key not in mapping and _IGNORED.search(key))
    unexpected = sorted(key for key in state if key not in mapping and not _IGNORED.search(key))
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


def _fill_backbone(
    target: dict, state: Mapping, mapping: Mapping, path, num_components: int, marked: bool
) -> None:
    """Sets every mapped leaf of the backbone tree `target` (in place) to its torchvision tensor
    in Flax layout as float32 (the first convolution adapted to `num_components`, see
    `_first_conv`); a shape other than the model's is an error naming the key, both shapes and
    the leaf."""
    for key, (collection, leaf_path) in sorted(mapping.items()):
        value = state[key]
        if key == "conv1.weight":
            value = _first_conv(value, num_components, path, marked)
        value = _to_flax(value)
        expected = tuple(_get(target[collection], leaf_path).shape)
        if value.shape != expected:
            raise PretrainedWeightsError(
                f"pretrained weights {path}: {key} has shape {tuple(state[key].shape)} "
                f"(as Flax {value.shape}) but the model expects {expected} at "
                f"{collection}/backbone/{'/'.join(leaf_path)}"
            )
        _set(target[collection], leaf_path, np.ascontiguousarray(value, dtype=np.float32))


def load_torchvision_resnet(
    variables: Mapping[str, Any],
    path: str | Path,
    *,
    num_components: int,
    model_config: ml_collections.ConfigDict,
) -> dict[str, Any]:
    """Returns ``variables`` with the DeepLab backbone replaced by the weights in ``path``.

    Args:
      variables: ``{'params', 'batch_stats'}`` of the model built from ``model_config``
        (leaves may be arrays or ``jax.ShapeDtypeStruct``; only their shapes are read).
      path: torchvision ResNet ``state_dict`` file (.safetensors, .npz, .pth).
      num_components: input channels; the first convolution is adapted to it.
      model_config: the model configuration (must be a DeepLab with ``width=1.0``).

    Returns:
      A new variables dict: backbone leaves are float32 NumPy arrays, the rest is unchanged.
    """
    _check_request(model_config, num_components)
    state, marked = _read_weights(path)
    mapping = backbone_key_map(_backbone(variables))
    _check_keys(state, mapping, path, model_config.depth)
    result = _copy_tree(variables)
    _fill_backbone(_backbone(result), state, mapping, path, num_components, marked)
    log.info("pretrained weights %s: loaded %d backbone tensors", path, len(mapping))
    return result


def save_torchvision_resnet(variables: Mapping[str, Any], path: str | Path) -> None:
    """Writes the DeepLab backbone of ``variables`` as a torchvision-layout ``state_dict``
    (``.safetensors`` or ``.npz``), marked (``MARKER``) as keeping the first convolution's
    ``num_components`` input channels: :func:`load_torchvision_resnet` inverts it for the same
    number of components and refuses any other."""
    backbone = _backbone(variables)
    state = {
        key: np.ascontiguousarray(_to_torch(np.asarray(_get(backbone[c], p), dtype=np.float32)))
        for key, (c, p) in backbone_key_map(backbone).items()
    }
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file(state, str(path), metadata={MARKER: "components"})
    elif path.suffix == ".npz":
        np.savez(path, **state, **{MARKER: np.asarray("components")})
    else:
        raise ValueError(f"save_torchvision_resnet: path {path} must end in .safetensors or .npz")
