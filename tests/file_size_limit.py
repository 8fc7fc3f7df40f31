"""`file_size_limit`: a full disk in this process without mounting one."""

from __future__ import annotations

import contextlib
import resource


@contextlib.contextmanager
def file_size_limit(size: int):
    """This process's files may not grow past `size` bytes (`ulimit -f`; Python ignores
    SIGXFSZ, so a write past it fails with EFBIG), its threads' included."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
