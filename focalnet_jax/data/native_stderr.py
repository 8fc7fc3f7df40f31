"""What is printed on the process's stderr while a block runs (by C and C++ libraries such as
GDCM, ITK, OpenJPEG among others), captured so that a refused input still ends in one line.

GDCM prints e.g. 'Invalid marker size' for each broken JPEG 2000 frame straight to file
descriptor 2, which `sys.stderr` and `contextlib.redirect_stderr` never see. `captured()` points
fd 2 at an unnamed temporary file for the block (a file, not a pipe: nothing has to drain it) and
back in `finally`. Fd 2 belongs to the whole process: a lock keeps threads from swapping it at
once, and what another thread writes to stderr meanwhile (a log line, a progress bar's refresh)
is captured too. Who wrote a byte to fd 2 cannot be told there, and no line shape sets GDCM's
apart, so callers pass the text on (in an error or a warning) as what was printed on stderr
during the block, never as the library's, and never drop it. (Capturing only while no other
thread runs would switch it off in `preprocess` and batch `predict`: tqdm's monitor thread runs
beside their progress bars, also disabled ones.) The data commands read images in the main
thread of each process (`--workers` runs spawn processes, each with its own fd 2).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
from collections import Counter
from dataclasses import dataclass

_LOCK = threading.RLock()  # re-entrant: an inner capture restores fd 2 to the outer one's file


@dataclass
class Captured:
    """The text written to fd 2 in a `captured()` block (set when the block ends)."""

    text: str = ""

    def summary(self, limit: int = 300) -> str:
        """The distinct non-empty lines in first-seen order, a repeated one with its count
        ('Invalid marker size (x12)'), joined by '; ' and cut to `limit` characters: one line."""
        lines = [line.strip() for line in self.text.splitlines() if line.strip()]
        counts = Counter(lines)
        parts = [f"{line} (x{counts[line]})" if counts[line] > 1 else line for line in counts]
        joined = "; ".join(parts)
        return joined if len(joined) <= limit else joined[: limit - 3] + "..."


def _flush_python_stderr() -> None:
    for stream in (sys.stderr, sys.__stderr__):
        with contextlib.suppress(AttributeError, OSError, ValueError):
            stream.flush()


@contextlib.contextmanager
def captured():
    """Yields a `Captured` whose `text` holds, once the block has ended (also by an exception),
    what was written to file descriptor 2 meanwhile. Without an fd 2 (closed) nothing is
    captured."""
    result = Captured()
    with _LOCK, tempfile.TemporaryFile() as sink:
        _flush_python_stderr()  # Python's pending output goes where it was meant to
        try:
            saved = os.dup(2)
        except OSError:
            yield result
            return
        os.dup2(sink.fileno(), 2)
        try:
            yield result
        finally:
            # A signal that came during the block (SIGTERM while a read blocked) runs its Python
            # handler at the first call here; its exception must not skip the restore, or fd 2
            # stays on the sink and what the program prints next (its last line) is lost. So the
            # restore is retried and the handler's exception raised once fd 2 is back.
            interrupted = None
            while True:
                try:
                    _flush_python_stderr()
                    os.dup2(saved, 2)
                    break
                except OSError:  # dup2 itself failed: nothing to retry
                    raise
                except BaseException as error:  # a signal handler's (KeyboardInterrupt, ...)
                    interrupted = interrupted or error
            os.close(saved)
            sink.seek(0)
            result.text = sink.read().decode("utf-8", "replace")
            if interrupted is not None:
                raise interrupted
