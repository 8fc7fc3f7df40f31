"""What a preprocessed store was made with (`cases.json`'s settings, see `store`): its format
version, preprocessing config, components and slice selection; their fingerprint (a sha256), and
the settings that differ between two stores, named."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from focalnet_jax.data.preprocess_config import PreprocessConfig
from focalnet_jax.errors import UserError

# Bumped when stored values change (`open_store` refuses other versions): 2 = crop pixels within
# one voxel outside a component take its nearest voxel (they were 0); 3 = the T2w's bladder
# reference does not depend on how the exam is stored, and percentile-scaled components (HBV,
# DCE) leave zero fill out of their percentiles; 4 = `VERSION_CHANGE`.
STORE_VERSION = 4
VERSION_CHANGE = (
    "4: the T2w's bladder reference does not depend on the shape of its pixels (a T2w of unequal "
    "in-plane pixel sizes is searched ~1 mm along both axes, its 3 mm opening round in mm)"
)


class StaleStoreError(UserError):
    """The store was made with other preprocessing settings than the caller expects."""


def store_settings(config, components, slices: str = "all") -> dict:
    """What a store's fingerprint covers: preprocessing config, components, slice selection."""
    return {
        "version": STORE_VERSION,
        "preprocess": PreprocessConfig.from_any(config).settings(),
        "components": list(components),
        "slices": slices,
    }


def fingerprint(settings: dict) -> str:
    """sha256 of the canonical JSON of the settings."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def flat_settings(settings: dict, prefix: str = "") -> dict:
    """Nested settings as one level, keys joined by '.': {'a': {'b': 1}} -> {'a.b': 1}."""
    out = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            out.update(flat_settings(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def settings_diff(have: dict, want: dict, names: tuple[str, str]) -> list[str]:
    """'key: <names[0]> a, <names[1]> b' for every setting that differs; nested keys joined by
    '.' (e.g. 'preprocess.adc_range')."""
    a, b = flat_settings(have), flat_settings(want)
    return [
        f"{key}: {names[0]} {a.get(key)!r}, {names[1]} {b.get(key)!r}"
        for key in sorted(set(a) | set(b))
        if a.get(key) != b.get(key)
    ]


def read_settings(path: str | os.PathLike) -> dict:
    """The settings recorded in a store's `cases.json`; a `UserError` naming it where they
    cannot be read (not JSON, no object of settings)."""
    table = Path(path) / "cases.json"
    try:
        settings = json.loads(table.read_text())["settings"]
    except (OSError, ValueError, KeyError, TypeError) as error:  # TypeError: a list, null
        raise UserError(f"{table}: not a readable store table ({error!r})") from error
    if not isinstance(settings, dict):
        raise UserError(f"{table}: not a readable store table (settings {settings!r})")
    return settings
