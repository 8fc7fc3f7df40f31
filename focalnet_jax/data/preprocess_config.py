"""`PreprocessConfig`: the settings of `preprocess_case`, checked when made (docs/data.md).

A setting out of its range is refused in one line naming the field: an inverted or empty ADC
range would store a constant or NaN channel, reversed percentiles would be blamed on the series.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, fields

import SimpleITK as sitk

from focalnet_jax.errors import UserError

LABEL_SCHEMES = ("picai", "isup")
INTERPOLATORS = {"bspline": sitk.sitkBSpline, "linear": sitk.sitkLinear}


@dataclass(frozen=True)
class PreprocessConfig:
    """Preprocessing settings; every field enters the store fingerprint."""

    crop_mm: float = 80.0  # side of the square axial crop (mm)
    crop_size: int = 128  # crop pixels per side (0.625 mm at 80 mm)
    interpolator: str = "bspline"  # images: 'bspline' | 'linear'; labels: nearest neighbour
    t2w_air_percentile: float = 1.0  # T2w intensity mapped to 0
    bladder_max_cv: float = 0.15  # urine is homogeneous: std / mean of the bladder candidate
    bladder_min_volume_ml: float = 10.0  # smaller bright components are not the bladder
    t2w_fallback_percentile: float = 99.5  # T2w upper reference where no bladder is found
    adc_range: tuple[float, float] = (0.0, 3000.0)  # fixed ADC clip, 1e-6 mm^2/s
    percentiles: tuple[float, float] = (1.0, 99.0)  # other components: per-case low/high -> 0/1
    label_values: str = "picai"  # 'picai': value 1 = csPCa of unknown grade; 'isup': 1 = GS 3+3

    @classmethod
    def from_any(cls, config) -> PreprocessConfig:
        """From None, a PreprocessConfig, or a mapping (e.g. a ConfigDict) of some of its fields."""
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        if not isinstance(config, Mapping) and hasattr(config, "to_dict"):
            config = config.to_dict()
        names = {f.name for f in fields(cls)}
        unknown = set(config) - names
        if unknown:
            raise UserError(
                f"preprocess config: unknown keys {sorted(unknown)}; expected {sorted(names)}"
            )
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
        return cls(**values)

    def __post_init__(self):
        if self.interpolator not in INTERPOLATORS:
            raise UserError(
                f"interpolator {self.interpolator!r}: expected one of {list(INTERPOLATORS)}"
            )
        if self.label_values not in LABEL_SCHEMES:
            raise UserError(f"label_values {self.label_values!r}: expected one of {LABEL_SCHEMES}")
        if isinstance(self.crop_size, bool) or not isinstance(self.crop_size, numbers.Integral):
            raise UserError(f"crop_size {self.crop_size!r}: expected a whole number of pixels")
        _check(self.crop_size >= 1, "crop_size", self.crop_size, "at least 1 pixel")
        _check(_finite(self.crop_mm) and self.crop_mm > 0, "crop_mm", self.crop_mm, "above 0 mm")
        _check(
            _finite(self.bladder_max_cv) and self.bladder_max_cv > 0,
            "bladder_max_cv",
            self.bladder_max_cv,
            "above 0",
        )
        _check(
            _finite(self.bladder_min_volume_ml) and self.bladder_min_volume_ml >= 0,
            "bladder_min_volume_ml",
            self.bladder_min_volume_ml,
            "0 ml or more",
        )
        _check(
            _percentile(self.t2w_air_percentile)
            and _percentile(self.t2w_fallback_percentile)
            and self.t2w_air_percentile < self.t2w_fallback_percentile,
            "t2w_air_percentile, t2w_fallback_percentile",
            (self.t2w_air_percentile, self.t2w_fallback_percentile),
            "percentiles in [0, 100], the first below the second",
        )
        _check_pair(self.adc_range, "adc_range", "finite (low, high), low below high", _finite)
        _check_pair(
            self.percentiles, "percentiles", "(low, high) in [0, 100], low below high", _percentile
        )

    def settings(self) -> dict:
        """The fields as JSON values; a float field's numbers as floats (`crop_mm=80` and the
        default 80.0 are one setting, with one store fingerprint)."""
        values = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if field.type == "float":
                value = float(value)
            elif field.type == "tuple[float, float]":
                value = [float(v) for v in value]
            values[field.name] = list(value) if isinstance(value, tuple) else value
        return values


def _finite(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _percentile(value) -> bool:
    return _finite(value) and 0 <= value <= 100


def _check(ok: bool, name: str, value, expected: str) -> None:
    if not ok:
        raise UserError(f"preprocess config: {name} {value!r}: expected {expected}")


def _check_pair(pair, name: str, expected: str, valid) -> None:
    ok = (
        isinstance(pair, tuple)
        and len(pair) == 2
        and all(valid(v) for v in pair)
        and pair[0] < pair[1]
    )
    _check(ok, name, pair, expected)
