"""`native_stderr.captured()`: what is written to file descriptor 2 in the block (by C code, by a
child process sharing it, or by another thread) is captured, and fd 2 is back afterwards, also
after an error; a DICOM read passes it on as printed on stderr during the read, not as its own."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from focalnet_jax.data.native_stderr import Captured, captured


def test_fd2_writes_in_the_block_are_captured_and_fd2_restored(capfd):
    os.write(2, b"before\n")
    with captured() as printed:
        os.write(2, b"Invalid marker size\n")
        subprocess.run([sys.executable, "-c", "import os; os.write(2, b'from a child\\n')"])
    os.write(2, b"after\n")
    assert printed.text == "Invalid marker size\nfrom a child\n"
    assert capfd.readouterr().err == "before\nafter\n"


def test_text_is_captured_when_the_block_raises(capfd):
    with pytest.raises(RuntimeError, match="decode failed"), captured() as printed:
        os.write(2, b"A marker ID was expected\n")
        raise RuntimeError("decode failed")
    assert printed.text == "A marker ID was expected\n"
    os.write(2, b"restored\n")
    assert capfd.readouterr().err == "restored\n"


def test_nested_and_threaded_captures_each_get_their_own_text(capfd):
    with captured() as outer:
        os.write(2, b"outer 1\n")
        with captured() as inner:
            os.write(2, b"inner\n")
        os.write(2, b"outer 2\n")
    assert (outer.text, inner.text) == ("outer 1\nouter 2\n", "inner\n")
    texts = {}

    def write(name):
        with captured() as printed:
            for _ in range(50):
                os.write(2, f"{name}\n".encode())
        texts[name] = printed.text

    threads = [threading.Thread(target=write, args=(name,)) for name in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert texts == {"a": "a\n" * 50, "b": "b\n" * 50}
    assert capfd.readouterr().err == ""


def test_summary_is_one_line_of_distinct_lines_with_counts():
    printed = Captured("Invalid marker size\n\n  Invalid marker size\nStream too short\n" * 2)
    assert printed.summary() == "Invalid marker size (x4); Stream too short (x2)"
    assert Captured("x" * 400).summary(limit=10) == "xxxxxxx..."
    assert Captured("").summary() == ""


def test_read_series_passes_the_text_on_when_the_read_fails_otherwise(
    tmp_path, monkeypatch, caplog
):
    """An exception of the DICOM read other than a refusal (`SeriesError`, whose reason ends
    with the text) keeps the text too: it is logged as one warning naming the folder."""
    from focalnet_jax.data import dicom

    def failing_read(folder, series, component, notes):
        os.write(2, b"Invalid marker size\nInvalid marker size\n")
        raise MemoryError("no room for the volume")

    monkeypatch.setattr(dicom, "_read_series", failing_read)
    with pytest.raises(MemoryError), caplog.at_level("WARNING", logger=dicom.log.name):
        dicom.read_series(tmp_path)
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [f"{tmp_path}: printed on stderr during the read: Invalid marker size (x2)"]


@pytest.mark.real_data
def test_another_threads_stderr_during_a_real_read_is_not_called_the_readers(
    prostatex_case_dir, monkeypatch, caplog, capfd
):
    """A line another thread wrote to fd 2 while a DICOM series was read was reported as 'the
    DICOM reader printed: ...'. It is still captured (fd 2 is the process's), and passed on as
    what was printed on stderr during the read."""
    from focalnet_jax.data import dicom

    inside, written = threading.Event(), threading.Event()
    list_series = dicom.list_series

    def list_series_after_the_write(folder):  # runs inside the capture, then reads for real
        inside.set()
        assert written.wait(10)
        return list_series(folder)

    def other_thread():
        assert inside.wait(10)
        os.write(2, b"epoch 3: loss 0.41\n")
        written.set()

    monkeypatch.setattr(dicom, "list_series", list_series_after_the_write)
    writer = threading.Thread(target=other_thread)
    writer.start()
    folder = prostatex_case_dir / "adc"
    with caplog.at_level("WARNING", logger=dicom.log.name):
        image = dicom.read_series(folder)
    writer.join()
    assert image.GetSize() == (84, 128, 19)
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [f"{folder}: read; printed on stderr during the read: epoch 3: loss 0.41"]
    assert capfd.readouterr().err == ""  # not printed twice


def test_an_interrupt_while_the_block_ends_still_gives_fd_2_back(monkeypatch):
    """A SIGTERM that came while a read blocked runs its handler at the first call after it: in
    the restore. Its exception used to skip it, leaving fd 2 on the capture's file (the command's
    last line then lost)."""
    from focalnet_jax.data import native_stderr

    before = os.fstat(2)
    calls = []
    flush = native_stderr._flush_python_stderr

    def interrupted_once_at_the_end():
        calls.append(True)
        if len(calls) == 2:  # the first call is at the start of the block
            raise KeyboardInterrupt
        flush()

    monkeypatch.setattr(native_stderr, "_flush_python_stderr", interrupted_once_at_the_end)
    with pytest.raises(KeyboardInterrupt), captured() as printed:
        os.write(2, b"inside\n")
    after = os.fstat(2)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
    assert printed.text == "inside\n" and len(calls) == 3
