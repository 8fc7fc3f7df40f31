"""How the training loop runs on the devices: over a run with logging, validation and checkpoints
on 2 devices, every function the loop jits compiles once, and no step makes an implicit transfer
(the run key and lambda are placed on the mesh once; the non-finite check reads the step count on
the device).

Run as a script (`python tests/test_train_loop_execution.py WORKDIR`) it trains the tiny config
on the fake store under `jax.transfer_guard("disallow")` and prints, as JSON, how many times each
function was compiled; the test starts it on 2 CPU devices.
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
RUN = [
    "--config.loss.mfl=false",  # the loop's behaviour does not depend on the loss
    "--config.train.steps=6",
    "--config.train.log_every=2",
    "--config.train.eval_every=2",
    "--config.train.checkpoint_every=3",
]


def _guarded(fn):
    """`fn` with every implicit transfer of its calls (an argument not already where the
    computation runs) an error."""
    import jax

    def call(*args, **kwargs):
        with jax.transfer_guard("disallow"):
            return fn(*args, **kwargs)

    return call


def _compiles_of_a_run(workdir: str) -> dict[str, int]:
    """{compiled function: times} over a 6-step run whose train steps, non-finite checks and
    validation steps may not transfer anything implicitly."""
    import jax
    from test_train_helpers import FakeStore, fast_compiles, tiny_config

    from focalnet_jax.training import loop, train_and_evaluate
    from focalnet_jax.training import step as step_lib

    compiles: collections.Counter = collections.Counter()

    def count(event: str, duration: float, **kwargs) -> None:
        if event == BACKEND_COMPILE_EVENT:
            compiles[kwargs["fun_name"]] += 1

    jax.monitoring.register_event_duration_secs_listener(count)
    make_train_step, make_eval_step = step_lib.make_train_step, step_lib.make_eval_step
    step_lib.make_train_step = lambda *args: _guarded(make_train_step(*args))
    step_lib.make_eval_step = lambda *args: (
        lambda made: made._replace(fn=_guarded(made.fn))  # an EvalStep: its loss spec kept
    )(make_eval_step(*args))
    loop._first_bad, loop._add = _guarded(loop._first_bad), _guarded(loop._add)
    with fast_compiles():
        train_and_evaluate(tiny_config(overrides=RUN), workdir, store=FakeStore())
    return dict(compiles)


def test_a_run_compiles_each_loop_function_once_and_transfers_nothing_implicitly(tmp_path):
    from test_train_helpers import script_json

    compiles = script_json(__file__, str(tmp_path / "run"))
    for name in ("jit(train_step)", "jit(eval_step)", "jit(_first_bad)", "jit(_add)"):
        assert compiles.get(name) == 1, (name, compiles)


def test_validation_fetches_its_sums_once_whatever_the_number_of_batches(monkeypatch):
    """The validation sums stay on the device until the last batch: 6 slices in 3 batches of 2
    make as many host fetches as in 1 batch of 6, and give the same metrics and panel."""
    import jax
    import numpy as np
    from test_train_helpers import FakeStore, fast_compiles, tiny_config

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
    with fast_compiles():
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
    print(json.dumps(_compiles_of_a_run(sys.argv[1])))
