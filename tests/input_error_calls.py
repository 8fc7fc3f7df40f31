"""What the data-input error tests share: a module-scoped synthetic dataset of 2 cases (`dataset`;
a test module takes it as `dataset = input_error_calls.dataset`), the arguments of `focalnet
preprocess --layout picai` (`picai_cmd`), and the one line of a refused command (`user_error`)."""

from __future__ import annotations

import re

import pytest

from focalnet_jax.cli import main


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    assert main(["synth", "--out", str(root), "--cases", "2", "--seed", "1", "--small"]) == 0
    return root


def picai_cmd(root, out, images=None):
    images = images or root / "images"
    return ["preprocess", "--layout", "picai", "--images", str(images), "--out", str(out)]


def user_error(capfd, argv) -> str:
    """Runs the CLI expecting a user error: exit status 2 and exactly one line on stderr (file
    descriptor 2, so SimpleITK's own output counts; the progress bar aside), which is returned."""
    capfd.readouterr()
    with pytest.raises(SystemExit) as raised:
        main(argv)
    err = re.sub(r"(\rpreprocess:[^\r\n]*)+\n", "", capfd.readouterr().err)  # progress bar
    assert raised.value.code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()
