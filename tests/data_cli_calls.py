"""What the data-command tests share: a module-scoped synthetic dataset of 4 cases (`dataset`; a
test module takes it as `dataset = data_cli_calls.dataset`) and the arguments of `focalnet
preprocess --layout picai` of such a dataset (`picai_args`)."""

from __future__ import annotations

import pytest

from focalnet_jax.cli import main


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    assert main(["synth", "--out", str(root), "--cases", "4", "--seed", "3", "--small"]) == 0
    return root


def picai_args(root, out, *extra):
    return [
        "preprocess", "--layout", "picai", "--images", str(root / "images"),
        "--labels", str(root / "labels"), "--masks", str(root / "masks"), "--out", str(out), *extra,
    ]  # fmt: skip
