"""Load an ml_collections config file and apply command-line overrides.

`load_config("configs/picai.py:fold=2", ["--config.train.steps=10"])` imports the file, calls its
`get_config(arg)` (`get_config()` without `:arg`), locks the result so that a misspelled key is an
error instead of a silently ignored value, then applies each `--config.a.b=value` override,
converting the string to the type of the field it replaces.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

import ml_collections

from focalnet_jax.errors import UserError

_PREFIX = "--config."


def _one_line(error: Exception) -> str:
    """The error's message on one line: a KeyError's text (also one wrapped in another error, as
    ml_collections raises it) without the quotes of its repr, and a locked group's list of other
    fields left out (its "Did you mean" kept)."""
    text: object = error
    while isinstance(text, BaseException) and len(text.args) == 1:
        text = text.args[0]
    text = re.sub(r"\s*Other fields present: \"[^\n]*\"", "", str(text))
    return " ".join(text.split())


def _raised_in(error: Exception, folder: Path) -> str:
    """`NameError at FILE:LINE`: the exception's type and the deepest line of the config files in
    `folder` (the file and the siblings it imports) that it passed through."""
    folder = folder.resolve()
    frames = traceback.extract_tb(error.__traceback__)
    ours = [f for f in frames if Path(f.filename).resolve().parent == folder]
    where = f" at {ours[-1].filename}:{ours[-1].lineno}" if ours else ""
    return f"{type(error).__name__}{where}"


def _refused(error: Exception, folder: Path) -> bool:
    """Whether `error` is a config file's own refusal (a `raise` in the files of `folder`, e.g.
    of an unknown `:arg`) or of the call itself (a `get_config` of another signature), whose
    message says it all; not one met running the file (a value of the wrong type assigned to a
    field, `int('5k')`), which needs its line."""
    frames = traceback.extract_tb(error.__traceback__)
    last = frames[-1]
    ours = Path(last.filename).resolve().parent == folder.resolve()
    return len(frames) == 1 or (ours and (last.line or "").lstrip().startswith("raise"))


def _import_config_module(path: Path, kind: str):
    """The module of the Python file `path`; a `UserError` naming `kind` (`config file`, `spec`),
    the file and the reason (for a syntax error its line) when it cannot be imported."""
    if path.is_dir():
        raise UserError(f"{kind} {path}: a folder, not a Python file with get_config()")
    if not path.is_file():
        raise FileNotFoundError(f"{kind} {path} does not exist")
    if path.suffix != ".py":
        raise UserError(f"{kind} {path}: not a Python file (expected a .py file with get_config())")
    name = f"_focalnet_config_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UserError(f"{kind} {path}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    # Experiment configs import `configs/default.py` as a sibling module. Imported fresh from
    # this file's folder each time: a module of that name cached by an earlier load (another
    # folder's `default.py`, or this one before an edit) would stand in for it without a word.
    siblings = {p.stem for p in path.parent.glob("*.py")} - set(sys.stdlib_module_names)
    cached = {name: sys.modules.pop(name) for name in siblings if name in sys.modules}
    sys.path.insert(0, str(path.parent.resolve()))
    try:
        spec.loader.exec_module(module)
    except SyntaxError as error:
        raise UserError(
            f"{kind} {path}: syntax error at line {error.lineno}: {error.msg}"
        ) from error
    except ImportError as error:
        raise UserError(f"{kind} {path}: cannot import: {error}") from error
    except Exception as error:  # the file's own code raised: its error, not the package's
        where = _raised_in(error, path.parent)
        raise UserError(f"{kind} {path}: {where}: {_one_line(error)}") from error
    finally:
        sys.path.pop(0)
        for name in siblings:
            sys.modules.pop(name, None)
        sys.modules.update(cached)
    if not callable(getattr(module, "get_config", None)):
        raise UserError(f"{kind} {path}: defines no get_config() function")
    return module


def get_config_from_file(spec: str, *, kind: str = "config file") -> ml_collections.ConfigDict:
    """`spec` = `path/to/config.py` or `path/to/config.py:arg`; returns the ConfigDict as the file
    made it (locked when it starts from `configs/default.py`).

    A file that cannot be loaded, or whose `get_config` rejects `arg` (ValueError), raises
    another error (named with the config file's line) or returns no ConfigDict, is a `UserError`
    naming `kind`, the file and the reason.
    """
    path_text, sep, arg = spec.partition(":")
    module = _import_config_module(Path(path_text), kind)
    call = f"get_config({arg!r})" if sep else "get_config()"
    try:
        config = module.get_config(arg) if sep else module.get_config()
    except Exception as error:  # e.g. a misspelled field read: AttributeError
        folder = Path(path_text).parent
        if isinstance(error, ValueError | TypeError) and _refused(error, folder):
            raise UserError(f"{kind} {path_text}: {call}: {error}") from error
        where = _raised_in(error, folder)
        raise UserError(f"{kind} {path_text}: {call}: {where}: {_one_line(error)}") from error
    if not isinstance(config, ml_collections.ConfigDict):
        raise UserError(
            f"{kind} {path_text}: get_config() returned {type(config).__name__}, not a ConfigDict"
        )
    return config


def config_file_arg(spec: str, name: str) -> str | None:
    """The value the `:arg` of `FILE:arg` gives `name` (`configs/picai.py:fold=2`, 'fold': '2'),
    None where it gives none."""
    for item in spec.partition(":")[2].split(","):
        key, _, value = item.partition("=")
        if key.strip() == name:
            return value.strip()
    return None


def _parse_literal(key: str, text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def convert_value(key: str, text: str, current):
    """Convert the override string `text` for `key` to the type of its current value."""
    if isinstance(current, bool):
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ValueError(f"--config.{key}={text}: expected a boolean (true/false)")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"--config.{key}={text}: expected an integer") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"--config.{key}={text}: expected a number") from None
    if isinstance(current, str):
        return text
    if isinstance(current, tuple | list):
        value = _parse_literal(key, text)
        if value is None:  # e.g. `--config.loss.subsets=None`: back to the field's default meaning
            return None
        if isinstance(value, str):
            # `--config.data.components=t2w,adc` is accepted as a comma-separated list, also
            # in brackets (`(t2w,adc)`, `[t2w,adc]`: no Python literal without quotes).
            if value[:1] + value[-1:] in ("()", "[]"):
                value = value[1:-1]
            value = tuple(part.strip() for part in value.split(",") if part.strip())
        if not isinstance(value, tuple | list):
            value = (value,)
        return type(current)(value)
    # None or other placeholders: a Python literal when the text is one, else the string itself.
    return _parse_literal(key, text)


def split_overrides(overrides: Sequence[str], prefix: str = _PREFIX) -> list[tuple[str, str]]:
    """`(key, value)` of each `PREFIX.KEY=VALUE` or `PREFIX.KEY VALUE` in `overrides`;
    `ValueError` naming an item of another form."""
    pairs, items, i = [], list(overrides), 0
    while i < len(items):
        item = items[i]
        if not item.startswith(prefix):
            raise ValueError(
                f"unrecognized argument {item!r}: overrides look like {prefix}a.b=value"
            )
        body = item[len(prefix) :]
        if "=" in body:
            key, value = body.split("=", 1)
        elif i + 1 < len(items) and not items[i + 1].startswith("--"):
            key, value = body, items[i + 1]
            i += 1
        else:
            raise ValueError(f"override {item!r} has no value")
        pairs.append((key, value))
        i += 1
    return pairs


def override_keys(overrides: Sequence[str]) -> list[str]:
    """The dotted keys of `--config.a.b=value` overrides, in order: `['a.b']`."""
    return [key for key, _ in split_overrides(overrides)]


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: Sequence[str]
) -> ml_collections.ConfigDict:
    """Apply `--config.a.b=value` (or `--config.a.b value`) overrides in place; returns `config`."""
    for key, text in split_overrides(overrides):
        *parents, leaf = key.split(".")
        node = config
        for depth, part in enumerate(parents):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                prefix = ".".join(parents[: depth + 1])
                raise KeyError(f"--config.{key}: unknown config key {prefix!r}")
            node = node[part]
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            raise KeyError(f"--config.{key}: unknown config key {key!r}")
        current = node[leaf]
        if isinstance(current, ml_collections.ConfigDict):
            raise KeyError(f"--config.{key}: {key!r} is a group of fields, not a value")
        value = convert_value(key, text, current)
        with node.ignore_type():
            node[leaf] = value
    return config


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Load `spec` (`file.py[:arg]`), lock it, apply `overrides`; returns the locked ConfigDict.

    A training config is then checked for MFL inherited by a loss it does not belong to
    (`losses.check_mfl`): `configs/focalnet.py` with `--config.loss.name=ce_focal` is an error
    until `loss.mfl` is set; and for a loss option the loss does not take, set to other than
    its default (`losses.check_loss_options`).
    """
    config = get_config_from_file(spec)
    if "base" in config and "arms" in config:  # its overrides would be named unknown keys
        raise UserError(
            f"config file {spec.partition(':')[0]}: a study spec (it names a base config and "
            f"arms), not a training config: run it with `focalnet study run --spec {spec}`"
        )
    config.lock()
    config = apply_overrides(config, overrides)
    loss = config.get("loss")
    if loss is not None and "mfl" in loss:
        from focalnet_jax.losses import LOSS_NAMES, check_loss_options, check_mfl

        if loss.name in LOSS_NAMES:  # an unknown name: RunSpec's error names the choices
            check_mfl(loss.name, loss.mfl, loss.get("mfl_any_loss", False))
            check_loss_options(loss.name, loss)
    return config
