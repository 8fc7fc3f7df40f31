"""`UserError`: bad input or settings that the user can fix, as opposed to a bug.

`focalnet` prints a user error as one line, `focalnet <command>: error: <message>`, and exits with
status 2 (`UserErrorExit`; `--verbose` adds the traceback); any other exception keeps its
traceback. Raise it (or another of the `user_errors()`) with a message naming the case, file or
setting and the reason. It is a `ValueError`, so callers that catch `ValueError` keep working.
"""

from __future__ import annotations


class UserError(ValueError):
    """Input, files or settings the user must fix; the message says which and why."""


class UserErrorExit(SystemExit):
    """Exit status 2 once a user error's line is on stderr; `str()` is that line."""

    def __init__(self, line: str):
        super().__init__(2)
        self.line = line

    def __str__(self) -> str:
        return self.line


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that are the user's to fix (imported only once one was raised)."""
    from focalnet_jax.data.io import CaseError
    from focalnet_jax.evaluation.predictions import PredictionsError

    # LayoutError and StaleStoreError are UserErrors.
    return (UserError, CaseError, PredictionsError, FileNotFoundError, FileExistsError)
