"""`UserError`: bad input or settings that the user can fix, as opposed to a bug.

`focalnet` prints a user error as one line, `focalnet <command>: error: <message>`, and exits with
status 2 (`UserErrorExit`; `--verbose` adds the traceback); any other exception keeps its
traceback. Raise it (or another error `is_user_error` accepts) with a message naming the case,
file or setting and the reason. It is a `ValueError`, so callers that catch `ValueError` keep
working.
"""

from __future__ import annotations

import contextlib
import sys
import traceback


class UserError(ValueError):
    """Input, files or settings the user must fix; the message says which and why."""


class UserErrorExit(SystemExit):
    """Exit status 2 once a user error's line is on stderr; `str()` is that line."""

    def __init__(self, line: str):
        super().__init__(2)
        self.line = line

    def __str__(self) -> str:
        return self.line


# User errors of modules with their own class (LayoutError, StaleStoreError: UserErrors).
_OTHER_USER_ERRORS = (
    ("focalnet_jax.data.io", "CaseError"),
    ("focalnet_jax.data.dicom", "SeriesError"),
    ("focalnet_jax.evaluation.predictions", "PredictionsError"),
    ("focalnet_jax.run.workdir", "UnreadableCheckpointError"),
)


def is_user_error(error: BaseException) -> bool:
    """Whether `error` is the user's to fix: a `UserError`, a missing or clashing file, or one of
    `_OTHER_USER_ERRORS` (looked up only in modules already imported: others cannot have raised)."""
    classes = [UserError, FileNotFoundError, FileExistsError]
    for module, name in _OTHER_USER_ERRORS:
        if module in sys.modules:
            classes.append(getattr(sys.modules[module], name))
    return isinstance(error, tuple(classes))


@contextlib.contextmanager
def one_line_user_errors(prog: str, *, verbose: bool = False):
    """A user error (`is_user_error`) raised in the block is printed as `<prog>: error: <message>`
    on one line of stderr (after its traceback when `verbose`) and ends the program with exit
    status 2 (`UserErrorExit`); any other exception passes unchanged."""
    try:
        yield
    except Exception as error:
        if not is_user_error(error):
            raise
        if verbose:
            traceback.print_exc()
        line = f"{prog}: error: " + str(error).replace("\n", " ")
        print(line, file=sys.stderr)
        raise UserErrorExit(line) from None
