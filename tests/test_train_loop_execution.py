"""How the training loop runs on the devices: over two epochs of a run with logging, validation
and checkpoints on 2 devices, stopped and resumed in a new process, each process compiles every
function the loop jits once, from the second step on nothing transfers implicitly between host
and devices (the run key and lambda are placed on the mesh once; the non-finite check reads the
step count on the device; validation finishes its fetched sums on the host), and a step that
neither logs, checkpoints nor validates reads nothing back from the devices.

Run as a script (`python tests/test_train_loop_execution.py WORKDIR STEPS`) it trains (or resumes)
the tiny config on a 16-patient fake store up to STEPS, the steady state under
`jax.transfer_guard("disallow")`, and prints, as JSON, how many times each function was compiled,
the step the process started from and the device values read in quiet steps; the test starts it
on 2 CPU devices.
"""

from __future__ import annotations

import collections
import json
import sys
import types
import warnings
from pathlib import Path

import pytest

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
# A fake store of 16 patients: fold 0 trains on 31 slices, 5 steps of 6 per epoch (the slice
# left over is dropped), so 12 steps span two epochs and part of a third; its 9 validation slices
# are 2 batches, the second padded. ce_dice with batch Dice: its validation loss is finished from
# sums on the host, the only loss with such a step (the loop does not otherwise depend on it).
RUN = [
    "--config.loss.name=ce_dice",
    "--config.loss.batch_dice=true",
    "--config.loss.eps=1e-5",
    "--config.loss.mfl=false",
    "--config.train.batch_size=6",
]
PATIENTS = 16
LOG_EVERY, EVAL_EVERY, CHECKPOINT_EVERY = 2, 2, 3


def _guarded(fn):
    """`fn` with every implicit transfer of its calls (an argument not already where the
    computation runs) an error."""
    import jax

    def call(*args, **kwargs):
        with jax.transfer_guard("disallow"):
            return fn(*args, **kwargs)

    return call


def _donating(train_step, kept: list):
    """`train_step` that appends to `kept`, at each call, [the leaves of its input state still
    alive after the call (0 when the donation took effect), the state's leaves]."""
    import jax

    def call(state, *args):
        out = train_step(state, *args)
        leaves = jax.tree.leaves(state)
        kept.append([sum(not leaf.is_deleted() for leaf in leaves), len(leaves)])
        return out

    return call


def _count_device_reads(quiet):
    """Counts in `quiet.reads` the device values the main thread reads (`float(x)`,
    `np.asarray(x)`, `jax.device_get`: all go through `ArrayImpl._value`) while `quiet.now` is
    true. The transfer guard cannot see these on CPU devices, whose host reads are no transfers."""
    import threading

    from jax._src import array

    read = array.ArrayImpl.__dict__["_value"]
    assert isinstance(read, property)  # a JAX upgrade that moves it fails here, loudly

    def counted(self):
        if quiet.now and threading.current_thread() is threading.main_thread():
            quiet.reads += 1
        return read.fget(self)

    array.ArrayImpl._value = property(counted)


def _guarded_after_the_first(iterate, starts: list, quiet):
    """`TrainBatches.iterate` whose caller runs every step after the first (train steps, logs,
    checkpoints, validation) with implicit transfers an error; the first step's set-up (the
    state, key and lambda placed on the mesh) is left out. A step that neither logs, checkpoints
    nor validates runs with `quiet.now` true (`_count_device_reads`) and is listed in
    `quiet.steps`. Each call's start step, steps per epoch and training slices go to `starts`."""
    import contextlib

    import jax

    def guarded(self, start_step, stop_step):
        starts.append([start_step, self.steps_per_epoch, len(self.rows)])
        with contextlib.closing(iterate(self, start_step, stop_step)) as steps:
            for step, batch in steps:
                done = step + 1
                periodic = done % LOG_EVERY == 0 or done % CHECKPOINT_EVERY == 0
                quiet.now = not (periodic or done % EVAL_EVERY == 0 or done == stop_step)
                quiet.steps += [done] if quiet.now else []
                guard = "allow" if step == start_step else "disallow"
                with jax.transfer_guard(guard):
                    yield step, batch
                quiet.now = False

    return guarded


def _compiles_of_a_run(workdir: str, steps: int) -> dict:
    """Of a run trained (or resumed) in `workdir` up to `steps`, whose train steps, non-finite
    checks and validation steps, and whose whole loop from its second step on, may not transfer
    anything implicitly: {"compiles": {compiled function: times}, "start": [[step the process
    started from, steps per epoch, training slices]], "quiet": [quiet steps, device values they
    read], "donation": [[[input state leaves not donated, leaves]] per step, donation
    warnings]}."""
    import jax
    from test_train_helpers import FakeStore, tiny_config

    from focalnet_jax.training import input_pipeline, loop, train_and_evaluate
    from focalnet_jax.training import step as step_lib

    compiles: collections.Counter = collections.Counter()

    def count(event: str, duration: float, **kwargs) -> None:
        if event == BACKEND_COMPILE_EVENT:
            compiles[kwargs["fun_name"]] += 1

    jax.monitoring.register_event_duration_secs_listener(count)
    make_train_step, make_eval_step = step_lib.make_train_step, step_lib.make_eval_step
    kept: list[list[int]] = []
    step_lib.make_train_step = lambda *args: _donating(_guarded(make_train_step(*args)), kept)
    step_lib.make_eval_step = lambda *args: (
        lambda made: made._replace(fn=_guarded(made.fn))  # an EvalStep: its loss spec kept
    )(make_eval_step(*args))
    loop._first_bad, loop._add = _guarded(loop._first_bad), _guarded(loop._add)
    starts: list[list[int]] = []
    quiet = types.SimpleNamespace(now=False, reads=0, steps=[])
    _count_device_reads(quiet)
    batches = input_pipeline.TrainBatches
    batches.iterate = _guarded_after_the_first(batches.iterate, starts, quiet)
    periodic = [
        f"--config.train.log_every={LOG_EVERY}",
        f"--config.train.eval_every={EVAL_EVERY}",
        f"--config.train.checkpoint_every={CHECKPOINT_EVERY}",
    ]
    config = tiny_config(overrides=[*RUN, *periodic, f"--config.train.steps={steps}"])
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        state = train_and_evaluate(config, workdir, store=FakeStore(patients=PATIENTS))
    assert int(jax.device_get(state.step)) == steps
    donation = [str(w.message) for w in warned if "donat" in str(w.message).lower()]
    return {
        "compiles": dict(compiles),
        "start": starts,
        "quiet": [quiet.steps, quiet.reads],
        "donation": [kept, donation],
    }


@pytest.mark.usefixtures("without_compilation_cache")
def test_each_process_compiles_once_transfers_nothing_implicitly_and_reads_back_only_to_log(
    tmp_path,
):
    """Steps 0-5 in one process, then 6-11 resumed from the step-6 checkpoint in another: every
    process compiles the train step, the validation step and the loop's two helpers once (two
    epochs, each leaving a partial batch out, 3 validations and 2 checkpoints in each process add
    no compilation), `_guarded_after_the_first` lets no step after the first transfer, and a step
    that neither logs, checkpoints nor validates reads no value back from the devices (it only
    dispatches: the host runs ahead of the devices). Every step donates the state it is given
    (but for a few small buffers in the step after a checkpoint, see below)."""
    from test_train_helpers import script_json

    workdir = str(tmp_path / "run")
    first = script_json(__file__, workdir, "6")
    resumed = script_json(__file__, workdir, "12")
    assert (first["start"], resumed["start"]) == ([[0, 5, 31]], [[6, 5, 31]])
    # Every step's input state was donated (the resumed process's first: the restored one),
    # without a "donated buffers were not usable" warning; but for the step after a checkpoint:
    # while Orbax writes in the background it holds host views of a few small CPU-device buffers
    # (10 of 178 leaves here), which XLA then copies instead (all are donated once the write has
    # finished; a GPU's host copies are no views).
    for run in (first, resumed):
        (start, _, _), (kept, warned) = run["start"][0], run["donation"]
        assert len(kept) == 6 and warned == []
        for step, (alive, leaves) in enumerate(kept, start + 1):
            after_a_save = (step - 1) % CHECKPOINT_EVERY == 0 and step - 1 > start
            assert alive < leaves / 10 if after_a_save else alive == 0, (step, alive, leaves)
    # Steps that neither log, checkpoint nor validate read nothing back from the devices.
    assert (first["quiet"], resumed["quiet"]) == ([[1, 5], 0], [[7, 11], 0])
    for run in (first, resumed):
        for name in ("jit(train_step)", "jit(eval_step)", "jit(_first_bad)", "jit(_add)"):
            assert run["compiles"].get(name) == 1, (name, run["compiles"])
    # The run's CE + Dice logs each of its terms beside their sum, at every logged step.
    import numpy as np

    from focalnet_jax.training.tb_logging import read_scalars

    steps, total = read_scalars(tmp_path / "run" / "tb", "train/ce_dice")
    parts = [read_scalars(tmp_path / "run" / "tb", f"train/ce_dice/{t}") for t in ("ce", "dice")]
    assert list(steps) == list(range(LOG_EVERY, 13, LOG_EVERY))
    assert all(list(part_steps) == list(steps) for part_steps, _ in parts)
    np.testing.assert_allclose(np.add(parts[0][1], parts[1][1]), total, rtol=1e-5)


def test_a_batch_dice_validation_loss_is_finished_on_the_host():
    """The fetched validation sums of a batch-Dice arm give its loss without a transfer to a
    device or a compiled op (`jnp.mean` on them moved them to a device at every validation).
    By hand: CE 3 / 4 slices = 0.75; Dice per channel (2 o + eps) / (t + eps) with eps = 1e-5 on
    overlap (1, 0, 0, 0, 0.5), total (4, 0, 0, 0, 2): 0.5000012, 1, 1, 1, 0.5000025, so the Dice
    loss is 1 - 4.0000037 / 5 = 0.1999993 and val/loss 0.9499993."""
    import jax
    import numpy as np

    from focalnet_jax import losses
    from focalnet_jax.training import step as step_lib

    totals = {
        "loss": np.float32(3.0),
        "count": np.float32(4.0),
        "dice_overlap": np.array([1.0, 0.0, 0.0, 0.0, 0.5], np.float32),
        "dice_total": np.array([4.0, 0.0, 0.0, 0.0, 2.0], np.float32),
    }
    loss = losses.get_loss("ce_dice", batch_dice=True, eps=1e-5)
    compiles = []

    def count(event: str, duration: float, **kwargs) -> None:
        if event == BACKEND_COMPILE_EVENT:
            compiles.append(kwargs.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        with jax.transfer_guard("disallow"):
            value = step_lib.validation_loss(totals, loss)
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    assert compiles == []
    np.testing.assert_allclose(value, 0.9499993, rtol=1e-6)


def test_validation_fetches_its_sums_once_whatever_the_number_of_batches(monkeypatch):
    """The validation sums stay on the device until the last batch: 6 slices in 3 batches of 2
    make as many host fetches as in 1 batch of 6, and give the same metrics and panel."""
    import jax
    import numpy as np
    from test_train_helpers import FakeStore, tiny_config

    from focalnet_jax.run import RunSpec
    from focalnet_jax.training import input_pipeline, loop, sharding, train_state
    from focalnet_jax.training import step as step_lib

    store = FakeStore()
    spec = RunSpec.from_config(tiny_config(overrides=["--config.loss.mfl=false"])).for_store(store)
    mesh = sharding.make_mesh()
    reader = input_pipeline.SliceReader(store, spec.components)
    state = train_state.create_train_state(spec, jax.random.key(0), mesh)
    rows = np.arange(6)
    device_get, fetches = jax.device_get, []
    monkeypatch.setattr(jax, "device_get", lambda x: fetches.append(1) or device_get(x))
    results = {}
    for batch in (2, 6):
        fetches.clear()
        eval_step = step_lib.make_eval_step(spec, mesh)
        results[batch] = (
            *loop.evaluate(eval_step, state, reader, rows, batch, mesh),
            len(fetches),
        )
    (metrics_2, shown_2, fetches_2), (metrics_6, shown_6, fetches_6) = results[2], results[6]
    assert fetches_2 == fetches_6
    assert metrics_2.keys() == metrics_6.keys()
    for name in metrics_6:
        np.testing.assert_allclose(metrics_2[name], metrics_6[name], rtol=1e-5, err_msg=name)
    np.testing.assert_array_equal(shown_2["predicted"], shown_6["predicted"])
    np.testing.assert_array_equal(shown_2["rows"], rows[:4])


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    print(json.dumps(_compiles_of_a_run(sys.argv[1], int(sys.argv[2]))))
