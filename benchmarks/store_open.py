"""Opening a PI-CAI-size preprocessed store: seconds for `open_store` and every case's world origin.

    python benchmarks/store_open.py [--cases 1500] [--slices 20]

Prints one JSON line. Writing the store is not timed. The timing covers what a run does before
its first step: reading and checking `store.json`, the case table and the memory-mapped arrays
(`open_store` with the expected settings), then `pixel_to_world` of each case. Each case has
`--slices` slices of 4 x 4 pixels: the arrays are memory-mapped, so what costs time is the
number of cases, not their pixels. Target: 1500 cases (PI-CAI) in under 3 s.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import result_line  # benchmarks/result_line.py (the script directory)
from benchmark_flags import count

from focalnet_jax.data.geometry import CropGeometry
from focalnet_jax.data.preprocess import PreprocessedCase
from focalnet_jax.data.preprocess_config import PreprocessConfig
from focalnet_jax.data.store import StoreWriter, open_store
from focalnet_jax.data.store_settings import store_settings
from focalnet_jax.demo import cpu_name

COMPONENTS = ("t2w", "adc")
SIZE = 4  # pixels a side


def _case(index: int, num_slices: int) -> PreprocessedCase:
    """Case `index`: images of the value `index` (every case's data its own: a store refuses one
    exam's data under two ids), zero labels but one lesion on slice 0 for every other case."""
    shape = (num_slices, SIZE, SIZE)
    lesions = np.zeros(shape, np.int32)
    has_lesion = index % 2 == 1
    lesions[0, 1:3, 1:3] = has_lesion
    geometry = CropGeometry(
        t2w_origin=(-10.0, 5.0, 2.0),
        t2w_spacing=(0.5, 0.5, 3.0),
        t2w_direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0),
        corner_index=(100.0 + index, 90.0),
        spacing=0.625,
        size=SIZE,
        slice_index=tuple(range(num_slices)),
    )
    return PreprocessedCase(
        case_id=f"case{index:04d}",
        components=COMPONENTS,
        images=np.full((*shape, len(COMPONENTS)), index, np.float32),
        classes=lesions * 2,
        grade_known=np.ones(shape, np.uint8),
        lesions=lesions,
        lesion_classes=np.array([2] * has_lesion, np.int32),
        lesion_grade_known=np.array([True] * has_lesion, bool),
        index_lesion=int(has_lesion),
        slice_index=np.arange(num_slices, dtype=np.int32),
        annotated=(lesions > 0).any((1, 2)),
        spacing=(0.625, 0.625),
        geometry=geometry,
        center=(0.0, 0.0, 0.0),
        center_source="mask",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=count(1), default=1500)
    parser.add_argument("--slices", type=count(1), default=20, help="crop slices per case")
    args = parser.parse_args()
    settings = store_settings(PreprocessConfig(), COMPONENTS, "all")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store"
        with StoreWriter(path, COMPONENTS, settings) as writer:
            for index in range(args.cases):
                writer.add(_case(index, args.slices), patient_id=f"patient{index:04d}")
            writer.commit()
        start = time.perf_counter()
        store = open_store(path, expected_settings=settings)
        origins = [store.pixel_to_world(case_id, 0, 0, 0) for case_id in store.case_ids]
        seconds = time.perf_counter() - start
        slices = len(store)
    if len(origins) != args.cases or slices != args.cases * args.slices:
        raise SystemExit(f"the store holds {slices} slices of {len(origins)} cases")
    print(
        json.dumps(
            {
                "benchmark": "store_open",
                "cases": args.cases,
                "slices": slices,
                "open_seconds": round(seconds, 4),
                "target_seconds": 3.0,
                "cpu": cpu_name(),
                "cpu_count": os.cpu_count(),
                **result_line.provenance(),
            }
        )
    )


if __name__ == "__main__":
    main()
