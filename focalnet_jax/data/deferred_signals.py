"""Ctrl-C and SIGTERM held back over a block that must not be cut short (a store swapped into
place and its predecessor removed; a process pool being built or stopped)."""

from __future__ import annotations

import contextlib
import signal
import threading

# SIGALRM: a Ctrl-C kept pending by `errors.ctrl_c_never_dropped` comes back as one.
DEFERRED = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGALRM})


@contextlib.contextmanager
def signals_deferred():
    """Ctrl-C and SIGTERM arriving in the block are recorded, and the first is raised again when
    the block ends (its handler, e.g. KeyboardInterrupt, runs then). Processes started in the
    block inherit them blocked."""
    caught = []
    # A handler runs in the main thread, whichever thread the signal reached: replace it there
    # (the mask of the main thread alone would not hold a signal that another thread receives).
    in_main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, lambda n, _: caught.append(n)) for s in DEFERRED if in_main}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, DEFERRED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a signal pending here is recorded
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if caught:
            signal.raise_signal(caught[0])
