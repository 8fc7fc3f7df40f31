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

from focalnet_jax.errors import Terminated, ctrl_c_never_dropped, sigterm_as_interrupt
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


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_an_error_after_a_sigterm_python_dropped_is_that_error():
    """A SIGTERM in a finalizer run as a reference count reaches 0 is dropped by Python and the
    command goes on; a later full disk was then reported as SIGTERM, status 143."""

    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler raises `Terminated` here; Python drops it

    with pytest.raises(OSError, match="No space left"), sigterm_as_interrupt():
        Finalized()  # no reference kept: finalized at once
        raise OSError(errno.ENOSPC, "No space left on device", "/out/case7/prediction.nii.gz")


def test_a_sigterm_in_a_garbage_collection_ends_the_command_once_it_is_over():
    """JAX registers a garbage-collector callback: a SIGTERM raised in it was dropped, and `kill`
    or a SLURM time limit went unheeded (status 0). As the CLI nests them, it is raised after."""
    fired, after = [], []

    def callback(phase, info):
        if phase == "start" and not fired:
            fired.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)

    with pytest.raises(Terminated), sigterm_as_interrupt(), ctrl_c_never_dropped():
        gc.callbacks.append(callback)
        try:
            gc.collect()
        finally:
            gc.callbacks.remove(callback)
        after.append(True)
        time.sleep(5)  # raised here, once the collection is over
    assert fired and after
