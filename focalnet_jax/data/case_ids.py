"""Case ids become file names (`<case_id>.npz`, per-case folders), so they are checked where they
enter (manifest, PI-CAI file names, stores): letters, digits, `.`, `_`, `-`, not starting with
`.`."""

from __future__ import annotations

import re

from focalnet_jax.errors import UserError

_SAFE = re.compile(r"[A-Za-z0-9._-]+")
_UNSAFE_CHAR = re.compile(r"[^A-Za-z0-9._-]")


def check_case_id(value: str, source: str, *, what: str = "case id") -> str:
    """Returns `value` when it is a safe id; else raises `UserError` naming the id, `source`
    (where it came from, e.g. "manifest cases.csv, line 4") and the reason."""
    if _SAFE.fullmatch(value) and not value.startswith("."):
        return value
    if not value:
        reason = "is empty"
    elif value.startswith("."):
        reason = "starts with '.'"
    else:
        reason = f"contains {_UNSAFE_CHAR.search(value).group()!r}"
    raise UserError(
        f"{source}: {what} {value!r} {reason}; ids may hold only letters, digits, '.', '_', '-' "
        "and must not start with '.'"
    )


def spreadsheet_id(value: str) -> str:
    """An id as a spreadsheet's number column may have rewritten it, back as written: `10000.0`
    (a float column's text) -> `10000`; any other text as it is."""
    return value[: value.index(".")] if re.fullmatch(r"\d+\.0+", value) else value
