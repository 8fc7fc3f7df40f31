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
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
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
    step_lib.make_eval_step = lambda *args: _guarded(make_eval_step(*args))
    loop._first_bad = _guarded(loop._first_bad)
    with fast_compiles():
        train_and_evaluate(tiny_config(overrides=RUN), workdir, store=FakeStore())
    return dict(compiles)


def test_a_run_compiles_each_loop_function_once_and_transfers_nothing_implicitly(tmp_path):
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        PYTHONPATH=str(REPO),
    )
    result = subprocess.run(
        [sys.executable, __file__, str(tmp_path / "run")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    compiles = json.loads(result.stdout.strip().splitlines()[-1])
    for name in ("jit(train_step)", "jit(eval_step)", "jit(_first_bad)"):
        assert compiles.get(name) == 1, (name, compiles)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    print(json.dumps(_compiles_of_a_run(sys.argv[1])))
