"""What the store tests share: `case`, a small preprocessed case of random images (a lesion of
class `lesion_class` on its first slice), and the store settings `SETTINGS` of the default
preprocessing of T2w and ADC."""

from __future__ import annotations

import numpy as np

from focalnet_jax.data.geometry import CropGeometry
from focalnet_jax.data.preprocess import PreprocessedCase
from focalnet_jax.data.preprocess_config import PreprocessConfig
from focalnet_jax.data.store_settings import store_settings


def case(case_id, num_slices, size=8, lesion_class=0, seed=0):
    rng = np.random.default_rng(seed)
    shape = (num_slices, size, size)
    classes = np.zeros(shape, np.int32)
    lesions = np.zeros(shape, np.int32)
    if lesion_class:
        classes[0, 2:4, 2:4] = lesion_class
        lesions[0, 2:4, 2:4] = 1
    geometry = CropGeometry(
        t2w_origin=(-10.0, 5.0, 2.0),
        t2w_spacing=(0.5, 0.5, 3.0),
        t2w_direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0),
        corner_index=(100.0 + seed, 90.0),
        spacing=0.625,
        size=size,
        slice_index=tuple(range(2, 2 + num_slices)),
    )
    return PreprocessedCase(
        case_id=case_id,
        components=("t2w", "adc"),
        images=rng.random((*shape, 2), dtype=np.float32),
        classes=classes,
        grade_known=np.ones(shape, np.uint8),
        lesions=lesions,
        lesion_classes=np.array([lesion_class] if lesion_class else [], np.int32),
        lesion_grade_known=np.array([True] if lesion_class else [], bool),
        index_lesion=1 if lesion_class else 0,
        slice_index=np.arange(2, 2 + num_slices, dtype=np.int32),
        annotated=(lesions > 0).any((1, 2)),
        spacing=(0.625, 0.625),
        geometry=geometry,
        center=(0.0, 0.0, 0.0),
        center_source="mask",
    )


SETTINGS = store_settings(PreprocessConfig(), ("t2w", "adc"), "all")
