"""The coordinator port of a SLURM step (focalnet_jax/training/distributed.py): the same in every
task of a step, different in each step of a job; two 2-task steps of one job running at once on the
one-node test cluster (tests/slurm_cluster.py) both join their own process group and sum across it.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest
from slurm_cluster import OneNodeCluster, missing_binaries

from focalnet_jax.training import distributed


def _task(job: str, step: str, rank: str, **extra) -> dict:
    return {"SLURM_JOB_ID": job, "SLURM_STEP_ID": step, "SLURM_PROCID": rank, **extra}


def test_each_step_of_a_job_gets_its_own_port_and_each_task_the_same():
    port = distributed.slurm_coordinator_port
    # 61440 + (77 + 2531 * step) % 4096, by hand: step 0 is JAX's own pick (61440 + 77).
    assert port(_task("77", "0", "0")) == 61517
    assert port(_task("77", "1", "0")) == 61440 + 2608
    assert port(_task("77", "2", "0")) == 61440 + 5139 - 4096
    assert port(_task("77", "1", "3", SLURM_LOCALID="1")) == port(_task("77", "1", "0"))
    assert port({"SLURM_JOB_ID": "77", "SLURM_STEPID": "1"}) == 61440 + 2608  # older name
    ports = [port(_task("123456", str(step), "0")) for step in range(4096)]
    assert len(set(ports)) == 4096 and min(ports) == 61440 and max(ports) == 65535
    # Jobs at most 32 ids apart (e.g. sharing a node) never meet in their steps 0..88.
    near = {port(_task(str(job), str(step), "0")) for job in range(100, 133) for step in range(89)}
    assert len(near) == 33 * 89
    # The user's port wins; outside a job there is none to pick.
    assert port(_task("77", "1", "0", JAX_COORDINATOR_PORT="12345")) is None
    assert port({"SLURM_STEP_ID": "1"}) is None


def test_jax_reads_the_step_port_in_a_slurm_task_and_children_do_not_inherit_it(monkeypatch):
    from jax._src import clusters

    task = _task("77", "2", "1", SLURM_STEP_NODELIST="gpu[01-02]", SLURM_NTASKS="2")
    for name, value in {**task, "SLURM_LOCALID": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("JAX_COORDINATOR_PORT", raising=False)
    with distributed._coordinator_port(distributed.slurm_coordinator_port()):
        detected = clusters.ClusterEnv.auto_detect_unset_distributed_params(
            None, None, None, None, None, 300
        )
    assert detected == ("gpu01:62483", 2, 1, [1])
    assert "JAX_COORDINATOR_PORT" not in os.environ
    monkeypatch.setenv("JAX_COORDINATOR_PORT", "12345")
    with distributed._coordinator_port(distributed.slurm_coordinator_port()):
        detected = clusters.ClusterEnv.auto_detect_unset_distributed_params(
            None, None, None, None, None, 300
        )
    assert detected[0] == "gpu01:12345" and os.environ["JAX_COORDINATOR_PORT"] == "12345"


# Each task: join the step's process group, sum the process ranks + 1 across it, then wait (at
# most 60 s) until the other step's tasks got that far, so that both coordinators were up at once.
TASK = """
import os, sys, time
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from focalnet_jax.training import distributed
how = distributed.initialize()
mesh = jax.make_mesh((jax.device_count(),), ("p",))
local = np.full((jax.local_device_count(),), jax.process_index() + 1.0, np.float32)
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("p")), local)
total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
step, rank = os.environ["SLURM_STEP_ID"], os.environ["SLURM_PROCID"]
folder = sys.argv[1]
open(os.path.join(folder, f"ready-{step}-{rank}"), "w").close()
deadline = time.time() + 60
while len([f for f in os.listdir(folder) if f.startswith("ready-")]) < 4:
    assert time.time() < deadline, "the other step never joined"
    time.sleep(0.1)
result = f"{how} {jax.process_index()} {jax.process_count()} {float(total)}"
open(os.path.join(folder, f"result-{step}-{rank}"), "w").write(result)
"""


@pytest.mark.slow
def test_two_steps_of_one_job_run_at_once_on_one_node(tmp_path):
    if missing_binaries() or os.geteuid() != 0:
        reason = "needs the SLURM binaries and root (tests/slurm_cluster.py)"
        if os.environ.get("FOCALNET_REQUIRE_SLURM", "") not in ("", "0"):
            pytest.fail(reason + " (FOCALNET_REQUIRE_SLURM=1)")
        pytest.skip(reason)
    cluster = OneNodeCluster(tmp_path / "cluster")
    env = {**os.environ, **cluster.env, "PYTHONPATH": os.getcwd(), "JAX_PLATFORMS": "cpu"}
    env.pop("JAX_COORDINATOR_PORT", None)
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    (tmp_path / "task.py").write_text(TASK)
    task = f"{shlex.quote(sys.executable)} {tmp_path / 'task.py'} {tmp_path}"
    # Two 2-task steps of one 2-CPU job at once (--overlap: they share its CPUs).
    step = f"srun --overlap -N1 -n2 timeout 90 {task}"
    script = tmp_path / "job.sh"
    script.write_text(f"#!/bin/bash\n{step} &\n{step} &\nwait %1 && wait %2\n")
    batch = ["sbatch", "-N1", "-n2", "--wait", f"--output={tmp_path}/job.out", str(script)]
    try:
        cluster.start()
        done = subprocess.run(batch, env=env, capture_output=True, text=True, timeout=150)
    finally:
        cluster.stop()
    log = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert done.returncode == 0, done.stderr[-2000:] + log[-3000:]
    results = {f.name: f.read_text() for f in tmp_path.glob("result-*")}
    steps = sorted({name.split("-")[1] for name in results})
    assert len(steps) == 2, results
    # Each step is its own group of 2 processes (SLURM rank = JAX rank): 1 + 2 = 3 in each.
    assert results == {f"result-{s}-{r}": f"slurm {r} 2 3.0" for s in steps for r in (0, 1)}
