"""Shared fixtures. The real ProstateX exam lives in ../shared/data beside the checkout; tests that
need it skip where it is absent, and fail instead under FOCALNET_REQUIRE_REAL_DATA=1 (CI)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FOCALNET_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def _require_real_data() -> bool:
    return os.environ.get("FOCALNET_REQUIRE_REAL_DATA", "") not in ("", "0")


@pytest.fixture(scope="session")
def prostatex_case_dir() -> Path:
    """Folder of the ProstateX-0000 exam: `t2w/`, `adc/`, `hbv/` DICOM series."""
    path = SHARED_DATA / "prostatex" / "ProstateX-0000"
    if not (path / "t2w").is_dir():
        message = f"real ProstateX exam not found at {path}"
        if _require_real_data():
            pytest.fail(message + " (FOCALNET_REQUIRE_REAL_DATA=1)")
        pytest.skip(message)
    return path
