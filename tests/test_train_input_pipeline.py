"""Host input pipeline (focalnet_jax/training/input_pipeline.py), sharding errors and
multi-process start-up (focalnet_jax/training/distributed.py)."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from test_train_helpers import REPO, FakeStore, cpu_devices_env

from focalnet_jax.data.folds import case_rows
from focalnet_jax.training import distributed, input_pipeline, sharding


@pytest.fixture(scope="module")
def store():
    return FakeStore(patients=6, slices=3)


def test_case_rows_keeps_annotated_slices_of_the_given_cases(store):
    rows = case_rows(store, ["case001", "case000"], "annotated")
    # case000 (even patient): all 3 slices annotated; case001 (odd): its last slice is not.
    np.testing.assert_array_equal(rows, [0, 1, 2, 3, 4])
    all_rows = case_rows(store, ["case001"], "all")
    np.testing.assert_array_equal(all_rows, [3, 4, 5])
    with pytest.raises(ValueError, match="data.slices"):
        case_rows(store, ["case001"], "some")


def test_reader_selects_components_and_case_intensity_ratio(store):
    reader = input_pipeline.SliceReader(store, ("adc",))
    batch = reader.read(np.array([4, -1, 0]))
    np.testing.assert_array_equal(batch["images"][0, ..., 0], store.images[4, ..., 1])
    np.testing.assert_array_equal(batch["images"][1], 0)  # padding
    np.testing.assert_allclose(batch["t2w_lower_ratio"], [10 / 400, 0, 10 / 400])
    np.testing.assert_array_equal(batch["classes"][2], store.classes[0])
    with pytest.raises(ValueError, match=r"\['hbv'\] not in store"):
        input_pipeline.SliceReader(store, ("t2w", "hbv"))


def test_data_order_depends_only_on_seed_and_step(store):
    mesh = sharding.make_mesh()
    reader = input_pipeline.SliceReader(store, ("t2w", "adc"))
    rows = case_rows(store, store.case_ids, "annotated")
    a = input_pipeline.TrainBatches(reader, rows, 4, mesh, seed=3)
    b = input_pipeline.TrainBatches(reader, rows, 4, mesh, seed=3)
    assert a.steps_per_epoch == len(rows) // 4 == 3
    epoch0 = np.concatenate([a.global_rows(s) for s in range(3)])
    assert len(set(epoch0)) == 12 and set(epoch0) <= set(rows)  # no slice twice in an epoch
    for step in (0, 4, 7):
        np.testing.assert_array_equal(a.global_rows(step), b.global_rows(step))
    assert not np.array_equal(a.global_rows(0), a.global_rows(3))  # epoch 1 reshuffles
    c = input_pipeline.TrainBatches(reader, rows, 4, mesh, seed=4)
    assert not np.array_equal(a.global_rows(0), c.global_rows(0))
    # The prefetching iterator yields the same batches, in order, from any start step.
    got = [(s, np.asarray(batch["classes"])) for s, batch in a.iterate(2, 5)]
    assert [s for s, _ in got] == [2, 3, 4]
    for s, classes in got:
        np.testing.assert_array_equal(classes, store.classes[a.global_rows(s)])
    with pytest.raises(ValueError, match="fewer than one global batch"):
        input_pipeline.TrainBatches(reader, rows[:3], 4, mesh, seed=0)


def test_eval_batches_cover_every_row_once_with_padding(store):
    mesh = sharding.make_mesh()
    reader = input_pipeline.SliceReader(store, ("t2w", "adc"))
    rows = np.array([5, 1, 7, 2, 9])
    batches = list(input_pipeline.eval_batches(reader, rows, 4, mesh))
    assert len(batches) == 2
    weights = np.concatenate([np.asarray(b["weight"]) for b in batches])
    np.testing.assert_array_equal(weights, [1, 1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(np.asarray(batches[1]["classes"][0]), store.classes[9])


def test_a_case_whose_bladder_is_nearly_air_is_refused_for_intensity_variation(tmp_path):
    """air / bladder 0.9 and the upper threshold moved by -15 %: divisor s = (0.85 - 0.9) / 0.1
    < 0, and the slice's T2w came out black (0 everywhere) without a word."""
    import jax.numpy as jnp
    import ml_collections
    from test_train_helpers import tiny_config

    from focalnet_jax.errors import UserError
    from focalnet_jax.training import augment, train_and_evaluate

    config = ml_collections.ConfigDict(
        dict(shift=False, max_shift=0.1, scale=False, scale_range=(0.9, 1.1), flip=False,
             intensity=True, intensity_range=(-0.15, -0.15))
    )  # fmt: skip
    image = jnp.full((8, 8, 2), 0.5, jnp.float32)
    labels = jnp.zeros((8, 8), jnp.int32), jnp.ones((8, 8), jnp.uint8)
    out, _, _ = augment.augment_example(jax.random.key(0), image, *labels, config, lower_ratio=0.9)
    assert np.all(np.asarray(out)[..., 0] == 0)  # what training would have seen
    store = FakeStore(patients=6, slices=3)
    store.cases[2]["t2w_reference"] = {"air": 360.0, "bladder": 400.0, "source": "mask"}
    rows = case_rows(store, store.case_ids, "all")
    message = (
        "store memory:/fake-store: 1 training case(s) (first: case002, T2w air 360, bladder "
        "400) have air within 15% of the bladder, so augment.intensity_range (-0.15, 0.2) moves "
        "the upper threshold to or below air (T2w black or NaN); check their T2w reference or "
        "narrow the range"
    )
    with pytest.raises(UserError) as raised:
        input_pipeline.check_t2w_ratios(store, rows, (-0.15, 0.2))
    assert str(raised.value) == message
    input_pipeline.check_t2w_ratios(store, rows, (-0.05, 0.2))  # 0.9 < 1 - 0.05: s > 0
    others = rows[(rows < 6) | (rows >= 9)]  # case002 validates: its rows are not trained
    input_pipeline.check_t2w_ratios(store, others, (-0.15, 0.2))
    # The trainer refuses such a store before anything is compiled.
    for case in store.cases:
        case["t2w_reference"] = {"air": 360.0, "bladder": 400.0, "source": "mask"}
    with pytest.raises(UserError, match=r"training case\(s\) \(first: case0"):
        train_and_evaluate(tiny_config(), tmp_path / "w", store=store)
    assert not (tmp_path / "w" / "config.json").exists()


def test_t2w_ratios_are_the_cases_air_over_bladder_unclipped():
    """Clipped to [0, 0.9] before: a negative air value moved the threshold as if air were 0
    (divisor off by 1.5 % at u = -0.15, air/bladder -0.1), and air/bladder 0.95 under a range down
    to -3 % was augmented as 0.9 (divisor 0.7 instead of 0.4 at u = -0.03)."""
    import jax.numpy as jnp

    from focalnet_jax.data.store import t2w_lower_ratios
    from focalnet_jax.training import augment

    store = FakeStore(patients=4, slices=3)
    references = [(-40.0, 400.0), (380.0, 400.0), (0.0, 400.0), None]
    for case, reference in zip(store.cases, references, strict=True):
        air_bladder = dict(zip(("air", "bladder"), reference, strict=True)) if reference else {}
        case["t2w_reference"] = {**air_bladder, "source": "mask"} if reference else None
    np.testing.assert_allclose(t2w_lower_ratios(store), np.repeat([-0.1, 0.95, 0.0, 0.0], 3))
    divisor = float(augment.t2w_divisor(jnp.float32(-0.03), 0.95))
    assert divisor == pytest.approx((0.97 * 400 - 380) / (400 - 380), rel=1e-5)  # = 0.4
    input_pipeline.check_t2w_ratios(store, np.arange(12), (-0.03, 0.2))  # 0.95 < 0.97: s > 0


def test_global_batch_not_divisible_by_device_count_is_an_error():
    code = (
        "import jax; from focalnet_jax.training import sharding; mesh = sharding.make_mesh(); "
        "print(sharding.per_device_batch(8, mesh)); sharding.per_device_batch(6, mesh)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=cpu_devices_env(4),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and result.stdout.strip() == "2"
    assert "train.batch_size=6 is not divisible by the 4 devices" in result.stderr


def test_distributed_flags_go_together_and_single_process_is_a_no_op(monkeypatch):
    with pytest.raises(ValueError, match="go together"):
        distributed.initialize("localhost:1234", None, 0)
    with pytest.raises(ValueError, match="--process_id=2 not in"):
        distributed.initialize("localhost:1234", 2, 2)
    assert distributed.initialize("localhost:1234", 1, 0) == "single"
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert distributed.initialize() == "single"
    assert jax.process_count() == 1
    env = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4"}
    assert distributed.slurm_num_tasks(env) == 4  # an `srun -n4` step
    assert distributed.slurm_num_tasks({"SLURM_STEP_NUM_TASKS": "4"}) == 1  # not inside a job
    # The batch script of `sbatch -n4` (no srun) is one process: JAX would wait for 4.
    assert distributed.slurm_num_tasks({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) == 1


def test_a_slurm_task_alone_on_its_node_drives_every_gpu():
    """One task per node (launch/slurm_multinode.sh): no device restriction ([]); several tasks
    on a node: None, JAX's rule (the GPU numbered SLURM_LOCALID), which alone would also have
    left a lone task with GPU 0 of its node's eight."""
    ids = distributed.slurm_local_device_ids
    assert ids({"SLURM_STEP_TASKS_PER_NODE": "1(x2)", "SLURM_NODEID": "1"}) == []
    assert ids({"SLURM_STEP_TASKS_PER_NODE": "8(x2)", "SLURM_NODEID": "0"}) is None
    assert ids({"SLURM_STEP_TASKS_PER_NODE": "2,1", "SLURM_NODEID": "1"}) == []
    assert ids({"SLURM_STEP_TASKS_PER_NODE": "2,1", "SLURM_NODEID": "0"}) is None
    assert ids({"SLURM_TASKS_PER_NODE": "1(x4)"}) == []  # the job's, outside a step
    # The user's own choice of devices stands (JAX reads it when given None).
    alone = {"SLURM_STEP_TASKS_PER_NODE": "1(x2)", "JAX_LOCAL_DEVICE_IDS": "2,3"}
    assert ids(alone) is None


def test_a_slurm_task_given_its_own_gpus_drives_the_gpus_it_sees():
    """`--gpus-per-task=1` (or `--gpu-bind`): each of a node's 8 tasks sees one GPU, numbered 0;
    JAX's rule would ask task 3 for GPU 3, which it cannot see (CUDA: invalid device ordinal).
    JAX's own auto-detection is what decides when we give None."""
    from jax._src import clusters

    ids = distributed.slurm_local_device_ids
    node = {"SLURM_STEP_TASKS_PER_NODE": "8(x2)", "SLURM_NODEID": "1"}
    assert ids({**node, "CUDA_VISIBLE_DEVICES": "0"}) == []
    assert ids({**node, "ROCR_VISIBLE_DEVICES": "0,1"}) == []  # --gpus-per-task=2
    assert ids({**node, "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}) is None  # JAX's rule fits
    # 2 tasks of 2 GPUs each on a 4-GPU node: each sees 2 = its node's tasks, yet both are its own.
    two = {"SLURM_STEP_TASKS_PER_NODE": "2", "CUDA_VISIBLE_DEVICES": "0,1"}
    assert ids(two) is None
    assert ids({**two, "SLURM_GPUS_ON_NODE": "4"}) == []  # 2 of the job's 4 on the node
    assert ids({**two, "SLURM_GPUS_PER_TASK": "2"}) == []
    assert ids({**node, "CUDA_VISIBLE_DEVICES": "0", "JAX_LOCAL_DEVICE_IDS": "0"}) is None
    task = {
        **node, "CUDA_VISIBLE_DEVICES": "0", "SLURM_JOB_ID": "77",
        "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_NTASKS": "16", "SLURM_PROCID": "11",
        "SLURM_LOCALID": "3",
    }  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        for name, value in task.items():
            patch.setenv(name, value)
        detected = clusters.ClusterEnv.auto_detect_unset_distributed_params(
            None, None, None, ids(), None, 300
        )
    assert detected == ("gpu01:61517", 16, 11, [])  # port: 61440 + job id 77 % 4096


def test_a_slurm_step_that_would_leave_gpus_idle_is_refused(monkeypatch):
    """2 tasks on each node, each seeing the node's 8 GPUs (`--ntasks-per-node=2
    --gpus-per-node=8`): JAX's rule gives task k GPU k alone, 6 GPUs would train nothing. Refused
    in one line before any process group is joined; given GPUs per task, or the user's device ids,
    it stands."""
    from focalnet_jax.errors import UserError

    ids = distributed.slurm_local_device_ids
    step = {
        "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_NODEID": "1",
        "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7",
    }  # fmt: skip
    want = (
        "SLURM step: 2 tasks on node 1 see the same 8 GPUs and each drives only the GPU numbered "
        "by its SLURM_LOCALID, so 6 would sit idle; give --ntasks-per-node=8 (one task per GPU) "
        "or 1 (one task drives them all), --gpus-per-task, or JAX_LOCAL_DEVICE_IDS"
    )
    with pytest.raises(UserError) as refused:
        ids(step)
    assert str(refused.value) == want
    assert ids({**step, "SLURM_GPUS_PER_TASK": "4"}) == []
    assert ids({**step, "JAX_LOCAL_DEVICE_IDS": "0,1,2,3"}) is None
    # `--gpus-per-node=8 --gpu-bind=per_task:4`: task 1 sees GPUs 4-7 of the node's 8 (as
    # 4 devices), its own; it was refused as seeing "the same 4 GPUs" as task 0.
    bound = {**step, "CUDA_VISIBLE_DEVICES": "4,5,6,7", "SLURM_GPUS_ON_NODE": "8"}
    assert ids(bound) == []
    with pytest.raises(UserError, match="see the same 8 GPUs"):  # not bound: all 8 seen
        ids({**step, "SLURM_GPUS_ON_NODE": "8"})
    assert ids({**step, "SLURM_STEP_TASKS_PER_NODE": "1(x2)"}) == []
    # `focalnet train` in such a task: the one line, before jax.distributed.initialize.
    task = {**step, "SLURM_JOB_ID": "7", "SLURM_STEP_NUM_TASKS": "4", "SLURM_NTASKS": "4"}
    for name, value in task.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("JAX_LOCAL_DEVICE_IDS", raising=False)
    joined = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: joined.append(k))
    with pytest.raises(UserError, match="^SLURM step: 2 tasks on node 1 "):
        distributed.initialize()
    assert joined == []


@pytest.mark.slow
def test_slurm_steps_give_the_task_layout_read_for_the_devices(tmp_path):
    """`srun` of one task and of two tasks on the one-node test cluster: what each task decides
    from the environment SLURM really sets."""
    from slurm_cluster import OneNodeCluster, missing_binaries

    if missing_binaries() or os.geteuid() != 0:
        pytest.skip("needs the SLURM binaries and root (tests/slurm_cluster.py)")
    if (os.cpu_count() or 1) < 2:
        pytest.skip("two tasks need two CPUs")
    cluster = OneNodeCluster(tmp_path / "cluster")
    env = {**os.environ, **cluster.env, "PYTHONPATH": os.getcwd()}
    code = (
        "from focalnet_jax.training import distributed as d; "
        "print(d.slurm_num_tasks(), d.slurm_local_device_ids())"
    )
    script, batch_out = tmp_path / "batch.sh", tmp_path / "batch.out"
    script.write_text(f"#!/bin/bash\n{shlex.quote(sys.executable)} -c {shlex.quote(code)}\n")
    try:
        cluster.start()
        outputs = {}
        for tasks in (1, 2):
            done = subprocess.run(
                ["srun", "-N1", f"-n{tasks}", sys.executable, "-c", code],
                env=env, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr[-2000:]
            outputs[tasks] = sorted(done.stdout.split("\n"))[1:]
        # The batch script of a 2-task job, outside any srun step: one process.
        batch = ["sbatch", "-n2", "--wait", f"--output={batch_out}", str(script)]
        done = subprocess.run(batch, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        outputs["batch"] = batch_out.read_text().split()[:1]
    finally:
        cluster.stop()
    assert outputs == {1: ["1 []"], 2: ["2 None", "2 None"], "batch": ["1"]}


def _local_processes(tmp_path, port: str | None) -> subprocess.CompletedProcess:
    """launch/local_cpu_processes.sh with 2 processes on a store that does not exist; it must end
    within 200 s, before JAX's 5-minute start-up timeout would end a process left waiting."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env["PATH"] = f"{os.path.dirname(sys.executable)}:{env['PATH']}"
    env.pop("PORT", None)
    if port is not None:
        env["PORT"] = port
    script = [str(REPO / "launch" / "local_cpu_processes.sh"), "2", "1", "configs/demo.py"]
    script += [str(tmp_path / "run"), f"--config.data.store={tmp_path / 'absent'}"]
    return subprocess.run(script, env=env, cwd=REPO, capture_output=True, text=True, timeout=200)


def test_local_cpu_processes_meet_on_a_free_port_and_stop_at_the_first_failure(tmp_path):
    """Both processes join (each logs its rank) on a port of their own, then stop at the user
    error; with the port taken, process 0 cannot serve and the script ends process 1 at once,
    which would otherwise wait JAX's 5-minute start-up timeout for it (the run's 200 s timeout
    fails the test then)."""
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("", 0))
        taken.listen()
        done = _local_processes(tmp_path, None)  # the default port is not the taken one
        assert done.returncode == 2, done.stderr[-2000:]
        assert "process 0/2" in done.stderr and "process 1/2" in done.stderr
        assert done.stderr.count("store") >= 2 and "does not exist" in done.stderr
        done = _local_processes(tmp_path, str(taken.getsockname()[1]))
    assert done.returncode != 0, done.stderr[-2000:]
