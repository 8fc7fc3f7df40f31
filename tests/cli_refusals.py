"""What the tests of `focalnet`'s one-line errors share: a command run in this process for its
exit status and stderr (`_run`), and the demo training config (`DEMO`)."""

from __future__ import annotations

import pytest
from test_train_helpers import REPO

from focalnet_jax import cli


def _run(argv, capsys):
    """(exit status, stderr) of the CLI in this process."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as raised:
        cli.main(argv)
    return raised.value.code, capsys.readouterr().err


DEMO = str(REPO / "configs" / "demo.py")
