"""A SIGTERM raised as `Terminated` inside code that turns an exception into one of its own
(matplotlib's drawing: 'Invalid affine transformation matrix' when a signal handler raises in
it) ended `focalnet predict` in that ValueError's traceback, status 1, without the line saying
how to resume its kept cases (a batch predict stopped while drawing a case's overlay)."""

from __future__ import annotations

import argparse
import errno
import gc
import os
import signal
import time

import pytest

from focalnet_jax.errors import Terminated, sigterm_as_interrupt
from focalnet_jax.evaluation import predict_command
from focalnet_jax.evaluation.partial_output import partial_folder


def _draw_while_terminated():
    """Stands in for matplotlib's C++ drawing: whatever is raised in it comes out a ValueError."""
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises `Terminated` here
    except BaseException:
        raise ValueError("Invalid affine transformation matrix") from None


def test_an_error_after_a_sigterm_leaves_the_block_as_terminated():
    with pytest.raises(Terminated) as raised, sigterm_as_interrupt():
        _draw_while_terminated()
    assert isinstance(raised.value.__cause__, ValueError)
    with pytest.raises(ValueError), sigterm_as_interrupt():  # no SIGTERM: the error itself
        raise ValueError("a bug")


def test_a_batch_predict_terminated_while_drawing_says_how_to_resume(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"

    def predict_layout(*args, **kwargs):
        (partial_folder(out) / "case0").mkdir(parents=True)
        _draw_while_terminated()

    monkeypatch.setattr(predict_command, "predict_layout", predict_layout)
    args = argparse.Namespace(
        layout="picai", out=out, images=[], masks=None, manifest=None, skip_bad_cases=False,
        overwrite=False, resume=False, dicom=False,
    )  # fmt: skip
    with pytest.raises(Terminated), sigterm_as_interrupt():
        predict_command._predict_many(None, args, {})
    assert "run the same command with --resume to predict the others" in capsys.readouterr().err


def test_an_error_after_a_sigterm_python_dropped_is_that_error():
    """A SIGTERM in a garbage-collector callback (JAX registers one) is dropped by Python and the
    command goes on; a later full disk was then reported as SIGTERM, status 143."""
    fired = []

    def callback(phase, info):
        if phase == "start" and not fired:
            fired.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler raises `Terminated` here; Python drops it

    with pytest.raises(OSError, match="No space left"), sigterm_as_interrupt():
        gc.callbacks.append(callback)
        try:
            gc.collect()
        finally:
            gc.callbacks.remove(callback)
        assert fired
        raise OSError(errno.ENOSPC, "No space left on device", "/out/case7/prediction.nii.gz")
