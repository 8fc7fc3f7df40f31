"""`focalnet` called in-process by tests: its printed output, or the one line of a refusal."""

from __future__ import annotations

import contextlib
import io

import pytest

from focalnet_jax.cli import main


def run_cli(argv) -> str:
    """What a successful command prints on stdout (stderr is dropped)."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        assert main([str(a) for a in argv]) == 0
    return stdout.getvalue()


def cli_error(argv) -> str:
    """The one-line message of a refused command."""
    with contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit) as caught:
        main([str(a) for a in argv])
    message = str(caught.value)
    assert "\n" not in message, message
    return message
