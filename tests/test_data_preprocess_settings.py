"""PreprocessConfig: settings out of range are refused in one line naming the field. Before, an
inverted ADC range stored the ADC channel as a constant 1, equal bounds stored NaN, reversed
percentiles were blamed on the series ("a blank series?") and a negative crop size reached ITK."""

from __future__ import annotations

import numpy as np
import pytest

from focalnet_jax.data import PreprocessConfig, preprocess_case
from focalnet_jax.errors import UserError

ADC = "expected finite (low, high), low below high"
PERCENTILES = "expected (low, high) in [0, 100], low below high"


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"adc_range": (3000.0, 0.0)}, f"adc_range (3000.0, 0.0): {ADC}"),
        ({"adc_range": (1000.0, 1000.0)}, f"adc_range (1000.0, 1000.0): {ADC}"),
        ({"adc_range": (0.0, float("inf"))}, f"adc_range (0.0, inf): {ADC}"),
        ({"adc_range": (0.0,)}, f"adc_range (0.0,): {ADC}"),
        ({"percentiles": (99.0, 1.0)}, f"percentiles (99.0, 1.0): {PERCENTILES}"),
        ({"percentiles": (1.0, 100.5)}, f"percentiles (1.0, 100.5): {PERCENTILES}"),
        (
            {"t2w_air_percentile": 99.9},
            "t2w_air_percentile, t2w_fallback_percentile (99.9, 99.5): expected percentiles in "
            "[0, 100], the first below the second",
        ),
        ({"crop_mm": -80.0}, "crop_mm -80.0: expected above 0 mm"),
        ({"crop_mm": float("nan")}, "crop_mm nan: expected above 0 mm"),
        ({"crop_size": 0}, "crop_size 0: expected at least 1 pixel"),
        ({"bladder_max_cv": 0.0}, "bladder_max_cv 0.0: expected above 0"),
        ({"bladder_min_volume_ml": -1.0}, "bladder_min_volume_ml -1.0: expected 0 ml or more"),
    ],
)
def test_settings_out_of_range_are_refused_naming_the_field(settings, message):
    with pytest.raises(UserError) as info:
        PreprocessConfig(**settings)
    assert str(info.value) == f"preprocess config: {message}"
    as_lists = {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}
    with pytest.raises(UserError) as info:  # from a mapping (JSON, a ConfigDict) too
        PreprocessConfig.from_any(as_lists)
    assert str(info.value) == f"preprocess config: {message}"


def test_crop_size_must_be_a_whole_number():
    with pytest.raises(UserError, match=r"^crop_size 128\.0: expected a whole number of pixels$"):
        PreprocessConfig(crop_size=128.0)
    with pytest.raises(UserError, match="crop_size True: expected a whole number"):
        PreprocessConfig(crop_size=True)


def test_settings_in_range_are_kept_as_given():
    # Lists (JSON, ConfigDict) become tuples; NumPy numbers count as numbers.
    config = PreprocessConfig.from_any(
        {"adc_range": [100, 2500], "percentiles": [0, 100], "crop_size": np.int64(64)}
    )
    assert config.adc_range == (100, 2500) and config.percentiles == (0, 100)
    assert config.crop_size == 64
    assert PreprocessConfig(bladder_min_volume_ml=0.0).bladder_min_volume_ml == 0.0
    assert PreprocessConfig().settings()["adc_range"] == [0.0, 3000.0]


def test_preprocess_case_refuses_bad_settings_before_reading_a_file(tmp_path):
    missing = {"t2w": tmp_path / "absent_t2w.mha", "adc": tmp_path / "absent_adc.mha"}
    with pytest.raises(UserError, match=r"^preprocess config: adc_range \(3000, 0\)"):
        preprocess_case(missing, config={"adc_range": [3000, 0]}, case_id="c1")
