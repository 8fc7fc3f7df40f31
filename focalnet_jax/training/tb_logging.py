"""TensorBoard scalars and images without TensorFlow: the `tensorboard` package's event writer,
and `read_scalars` to read a scalar's curve back.

Only process 0 writes (multi-host runs produce one event file); on other processes every method
is a no-op, so the loop calls the writer unconditionally. A full disk (or quota, read-only mount,
file size limit) is an `OSError` naming the events folder, raised by the writer's next call; the
writing thread's own traceback of it is not printed.
"""

from __future__ import annotations

import io
import math
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer import event_file_writer
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from focalnet_jax.errors import DISK_ERRNOS, naming_the_disk


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Float image in [0, 1] (`[H, W]` or `[H, W, 3]`) -> uint8, values outside clipped, NaN
    black (a non-finite input shown, not cast to an undefined value)."""
    image = np.nan_to_num(np.asarray(image, np.float32), nan=0.0)
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _writer_thread_disk_failure(args) -> bool:
    """Whether an uncaught thread exception is an event writer's thread failing on the disk: the
    writer raises it again at its next call (named there), the thread's traceback says no more."""
    writer_thread = getattr(event_file_writer, "_AsyncWriterThread", ())
    return (
        isinstance(args.thread, writer_thread)
        and isinstance(args.exc_value, OSError)
        and args.exc_value.errno in DISK_ERRNOS
    )


def _quiet_writer_threads() -> None:
    """Keeps `_writer_thread_disk_failure` tracebacks off the console (idempotent)."""
    previous = threading.excepthook
    if getattr(previous, "quiets_event_writers", False):
        return

    def hook(args):
        if not _writer_thread_disk_failure(args):
            previous(args)

    hook.quiets_event_writers = True
    threading.excepthook = hook


class SummaryWriter:
    """Event-file writer under `logdir` for process 0; a no-op elsewhere."""

    def __init__(self, logdir: str | Path, *, enabled: bool | None = None):
        if enabled is None:
            import jax  # here, so `read_scalars` alone needs no JAX

            enabled = jax.process_index() == 0
        self.enabled = enabled
        self.logdir = Path(logdir)
        self._writer = None
        self._closed = False
        if self.enabled:
            _quiet_writer_threads()
            with naming_the_disk(self.logdir):
                self.logdir.mkdir(parents=True, exist_ok=True)
                self._writer = EventFileWriter(str(logdir), flush_secs=30)

    def _add_event(self, event: event_pb2.Event) -> None:
        with naming_the_disk(self.logdir):
            self._writer.add_event(event)

    def _add(self, summary: summary_pb2.Summary, step: int) -> None:
        self._add_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

    def session_start(self, step: int) -> None:
        """Mark a (re)start that continues at `step`: TensorBoard drops the events of earlier
        sessions at `step` and after (those logged past the checkpoint a run resumed from), so a
        resumed run shows each step once. Every session writes one; TensorBoard's reader ignores
        the first of a run."""
        if self.enabled:
            start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
            self._add_event(
                event_pb2.Event(wall_time=time.time(), step=int(step), session_log=start)
            )

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """One scalar per tag (`train/loss`, ...) at `step`."""
        if not self.enabled:
            return
        summary = summary_pb2.Summary(
            value=[
                summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()
            ]
        )
        self._add(summary, step)

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        """A grey `[H, W]` or RGB `[H, W, 3]` image, float in [0, 1] or uint8."""
        if not self.enabled:
            return
        image = np.asarray(image)
        if image.dtype != np.uint8:
            image = to_uint8(image)
        if image.ndim not in (2, 3):
            raise ValueError(f"image {tag!r}: expected [H, W] or [H, W, 3], got {image.shape}")
        channels = 1 if image.ndim == 2 else image.shape[2]
        encoded = summary_pb2.Summary.Image(
            height=image.shape[0],
            width=image.shape[1],
            colorspace=channels,
            encoded_image_string=_png(image),
        )
        self._add(
            summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, image=encoded)]), step
        )

    def flush(self) -> None:
        """Writes the events queued so far; raises a failure of the writing thread."""
        if self.enabled:
            with naming_the_disk(self.logdir):
                self._writer.flush()

    def close(self) -> None:
        """Flushes (raising a failure of the writing thread, which closing alone would not
        report) and closes the event file; a closed writer is left as it is."""
        if self.enabled and not self._closed:
            self._closed = True
            with naming_the_disk(self.logdir):
                try:
                    self._writer.flush()
                finally:
                    self._writer.close()


def _first_wall_time(path: Path) -> float:
    """Wall time (s since the epoch) of the first event of an event file: its writer's start
    (the file-version event); inf for a file with no complete event."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    first = next(iter(LegacyEventFileLoader(str(path)).Load()), None)
    return math.inf if first is None else first.wall_time


def read_scalars(logdir: str | Path, tag: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps `[N]` int, values `[N]` float) of scalar `tag` in the event files under `logdir`, in
    step order. Files are read in the order their writers started (first event's wall time, then
    name, which sorts by the whole second, then as text by host, pid and a per-process count);
    with TensorBoard's rule, a session start at step s drops the steps >= s logged before it, and
    a step written twice keeps its last value. Empty arrays where there are no events or no such
    tag."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    files = [p for p in Path(logdir).glob("*tfevents*") if p.is_file()]
    by_step: dict[int, float] = {}
    for path in sorted(files, key=lambda p: (_first_wall_time(p), p.name)):
        for event in LegacyEventFileLoader(str(path)).Load():
            if event.session_log.status == event_pb2.SessionLog.START:
                by_step = {s: v for s, v in by_step.items() if s < event.step}
            for value in event.summary.value:
                if value.tag == tag and value.HasField("simple_value"):
                    by_step[event.step] = value.simple_value
    steps = np.array(sorted(by_step), np.int64)
    return steps, np.array([by_step[s] for s in steps], np.float64)
