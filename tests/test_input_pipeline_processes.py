"""The input pipeline over 2 local processes x 2 CPU devices (focalnet_jax/training/
input_pipeline.py): each process reads only its own rows, and together they make exactly the
global batch (rows and order) that one process draws for the same seed; validation batches hold
every row once, padding weighted 0.

Run as a script (`python tests/test_input_pipeline_processes.py OUT.json PORT PROCESS_ID`) it
joins a group of 2 processes and writes, per training step, the store rows this process read and
the rows of the assembled global batch, and per validation batch the global rows and weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

SEED, GLOBAL_BATCH, STEPS = 5, 4, 7  # 7 steps: past the end of the first epoch (6 steps)
VAL_ROWS = [5, 1, 7, 2, 9, 11, 0]  # 7 rows: the second batch holds one padding row


def _tagged_store():
    """FakeStore whose ADC pixel (0, 0) of store row r holds r + 1 (padding reads 0)."""
    from test_train_helpers import FakeStore

    store = FakeStore(patients=9, slices=3)
    store.images[:, 0, 0, 1] = np.arange(len(store)) + 1
    return store


def _worker(out: str, port: int, process_id: int) -> None:
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P
    from test_train_helpers import process_flags

    from focalnet_jax.training import distributed, input_pipeline, sharding

    flags = process_flags(port, process_id)
    distributed.initialize(flags[1], int(flags[3]), int(flags[5]))
    store, mesh = _tagged_store(), sharding.make_mesh()
    reader = input_pipeline.SliceReader(store, ("t2w", "adc"))
    # The global view of a batch's row tags (-1: padding), on every process.
    to_rows = jax.jit(lambda x: x[:, 0, 0, 1] - 1, out_shardings=NamedSharding(mesh, P()))
    batches = input_pipeline.TrainBatches(
        reader, np.arange(len(store)), GLOBAL_BATCH, mesh, seed=SEED
    )
    result = {"local": [], "global": [], "val_rows": [], "val_weight": []}
    for step, batch in batches.iterate(0, STEPS):
        local = batches.local_batch(step)["images"][:, 0, 0, 1] - 1
        result["local"].append(local.astype(int).tolist())
        result["global"].append(np.asarray(to_rows(batch["images"])).astype(int).tolist())
    for batch in input_pipeline.eval_batches(reader, np.array(VAL_ROWS), GLOBAL_BATCH, mesh):
        result["val_rows"].append(np.asarray(to_rows(batch["images"])).astype(int).tolist())
        weight = jax.jit(lambda w: w, out_shardings=NamedSharding(mesh, P()))(batch["weight"])
        result["val_weight"].append(np.asarray(weight).tolist())
    Path(out).write_text(json.dumps(result))


def test_two_processes_read_their_own_rows_of_the_one_process_global_batch(tmp_path):
    import subprocess

    from test_train_helpers import cpu_devices_env, free_port

    port = free_port()
    outs = [tmp_path / f"process{i}.json" for i in range(2)]
    processes = [
        subprocess.Popen(
            [sys.executable, __file__, str(outs[i]), str(port), str(i)],
            env=cpu_devices_env(2),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    try:
        for process in processes:
            output, _ = process.communicate(timeout=120)
            assert process.returncode == 0, output.decode(errors="replace")[-2000:]
    finally:  # one failed: the other would wait for it at a collective
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    results = [json.loads(out.read_text()) for out in outs]
    # One process's global batches: the permutation of epoch `step // 6` drawn from (seed, epoch).
    rows, steps_per_epoch = np.arange(27), 27 // GLOBAL_BATCH
    expected = []
    for step in range(STEPS):
        epoch, position = divmod(step, steps_per_epoch)
        order = np.random.default_rng((SEED, epoch)).permutation(rows)
        expected.append(order[position * GLOBAL_BATCH : (position + 1) * GLOBAL_BATCH].tolist())
    for step in range(STEPS):
        for process_id, result in enumerate(results):
            assert result["global"][step] == expected[step], (process_id, step)
        # Process 0 holds the first half of the global batch (its 2 devices), process 1 the rest.
        assert results[0]["local"][step] == expected[step][:2], step
        assert results[1]["local"][step] == expected[step][2:], step
    for result in results:
        assert result["val_rows"] == [[5, 1, 7, 2], [9, 11, 0, -1]]
        assert result["val_weight"] == [[1, 1, 1, 1], [1, 1, 1, 0]]


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    _worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
