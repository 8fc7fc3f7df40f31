"""Checkpoint saves that fail for the environment (a full disk, a quota, a read-only mount, no
permission, a file size limit) end the run in one line naming the checkpoint folder.

Orbax writes a checkpoint in background threads and asyncio tasks: a full disk fails each array's
write there, and each failure is logged with its traceback (hundreds of lines for one save, from
the `absl` and `asyncio` loggers) before the main thread meets the error again (TensorStore's
`ValueError: RESOURCE_EXHAUSTED: ... [os_error_code='28']`) at the next save or at the end.
`naming_the_checkpoint` turns that error into an `OSError` of its errno naming the folder (a user
error: `errors.is_user_error`), and `quiet_background_failures` keeps those log records of the
same failures off the console, and the tracebacks TensorStore prints for writes that complete
after the failed save closed its event loop. Other failures are neither renamed nor hidden.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import sys
from pathlib import Path

from focalnet_jax.errors import DISK_ERRNOS

# The errnos of an environment the user fixes: disk space, quota, read-only, size limit, permission,
# a file where a folder is needed.
ENVIRONMENT_ERRNOS = DISK_ERRNOS | {errno.EACCES, errno.ENOTDIR}
# TensorStore's status text of a failed file operation, e.g.
# `RESOURCE_EXHAUSTED: Error writing local file "...": ... [os_error_code='28']`
_TENSORSTORE_OS_ERROR = re.compile(
    r"\b[A-Z]+(?:_[A-Z]+)*: Error .*\[os_error_code='?(\d+)'?\]", re.S
)
_BACKGROUND_LOGGERS = ("absl", "asyncio")  # Orbax's save threads; its asyncio tasks


def _text_errno(text: str) -> int | None:
    match = _TENSORSTORE_OS_ERROR.search(text)
    return int(match.group(1)) if match else None


def environment_errno(error: BaseException | None) -> int | None:
    """The errno (`ENVIRONMENT_ERRNOS`) of an environment failure that is `error` or its explicit
    cause (`raise ... from`), at any depth: an `OSError`, or TensorStore's status text of a
    failed file operation with its `os_error_code`. Else None: an error raised while handling an
    environment failure (its `__context__`) is another failure, not renamed."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        code = error.errno if isinstance(error, OSError) else None
        if code is None:
            code = _text_errno(str(error))
        if code in ENVIRONMENT_ERRNOS:
            return code
        error = error.__cause__
    return None


@contextlib.contextmanager
def naming_the_checkpoint(directory: str | Path, what: str = "saving a checkpoint"):
    """An environment failure (`environment_errno`) raised in the block is raised again as
    `OSError(errno, "<strerror> (<what>)", directory)`; anything else passes unchanged."""
    try:
        yield
    except Exception as error:
        code = environment_errno(error)
        if code is None or (isinstance(error, OSError) and error.filename):
            raise
        raise OSError(code, f"{os.strerror(code)} ({what})", str(directory)) from error


class _EnvironmentFailureFilter(logging.Filter):
    """Drops the error records of an environment failure (`environment_errno` of the record's
    exception, or TensorStore's status text of one in its message); keeps all others."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        error = record.exc_info[1] if record.exc_info else None
        if environment_errno(error) is not None:
            return False
        return _text_errno(record.getMessage()) not in ENVIRONMENT_ERRNOS


_FILTER = _EnvironmentFailureFilter()


def _late_completion(unraisable) -> bool:
    """Whether an unraisable error is TensorStore telling a write's completion to the asyncio
    loop of a save that failed and closed it (`RuntimeError: Event loop is closed` raised in
    `call_soon_threadsafe`): one traceback per array still being written, nothing to act on."""
    error, tb = unraisable.exc_value, unraisable.exc_traceback
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
        return False
    names = []
    while tb is not None:
        names.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    return "call_soon_threadsafe" in names


def _quiet_unraisable_hook(previous):
    def hook(unraisable):
        if not _late_completion(unraisable):
            previous(unraisable)

    hook.quiets_late_completions = True
    return hook


def quiet_background_failures() -> None:
    """Keeps Orbax's background log records of environment failures, and TensorStore's late
    completions of a failed save (`_late_completion`), off the console; the main thread raises
    the failure itself (`naming_the_checkpoint`). Idempotent."""
    for name in _BACKGROUND_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    if not getattr(sys.unraisablehook, "quiets_late_completions", False):
        sys.unraisablehook = _quiet_unraisable_hook(sys.unraisablehook)
