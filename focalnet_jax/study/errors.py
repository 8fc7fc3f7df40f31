"""The study layer's user error."""

from __future__ import annotations

from focalnet_jax.errors import UserError


class StudyError(UserError):
    """A user error in a study spec or study folder (reported as one line)."""
