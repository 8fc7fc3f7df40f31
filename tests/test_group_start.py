"""Processes of one group started otherwise than process 0 (another config, workdir, device
count, store or pretrained weights; a folder only process 0 could make) end before training,
each with one line, nothing written (focalnet_jax/training/group_checks.py). Real groups of two
local processes on CPU devices; tests/test_group_checks.py checks the workdir comparison as one
process of a group spread over hosts."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_a_run_whose_tensorboard_folder_process_0_cannot_make_ends_in_every_process(tmp_path):
    """A file `tb` in a new run's workdir: only process 0 makes the TensorBoard folder. The other
    process stops with the same reason instead of waiting for process 0 in the first step."""
    from test_train_helpers import finish, free_port, process_flags, start_worker

    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "tb").write_text("not a folder")
    port = free_port()
    processes = [
        start_worker(tmp_path / f"unused{i}.npz", workdir, 1, process_flags(port, i))
        for i in range(2)
    ]
    outputs = finish(processes, timeout=240, returncode=1)  # the workers' uncaught errors
    exists = f"[Errno 17] File exists: '{workdir / 'tb'}'"
    assert f"FileExistsError: {exists}" in outputs[0]
    assert f"UserError: process 0 could not start the run: {exists}" in outputs[1]


@pytest.mark.slow
def test_processes_started_with_other_configs_end_before_training(tmp_path):
    """Another `seed` in one process trained the checkpoint with mixed seeds while config.json
    recorded process 0's; other `train.steps` ended in an Orbax traceback at the first save.
    Every process now ends before anything is written, naming the keys that differ."""
    from test_train_helpers import finish, free_port, process_flags, start_worker

    workdir, port = tmp_path / "run", free_port()
    processes = [
        start_worker(
            tmp_path / f"unused{i}.npz",
            workdir,
            1,
            [*process_flags(port, i), f"--config.seed={7 * i}"],
        )  # fmt: skip
        for i in range(2)
    ]
    outputs = finish(processes, timeout=240, returncode=1)  # the workers' uncaught errors
    reason = (
        "process 1 was started with another config than process 0: seed 0 -> 7; start every "
        "process with the same command"
    )
    assert (
        f"UserError: process 1 could not start with the config of process 0: {reason}"
        in (outputs[0])
    )
    assert f"UserError: {reason}" in outputs[1]
    assert not (workdir / "config.json").exists() and not (workdir / "checkpoints").exists()


@pytest.mark.slow
def test_processes_given_other_workdirs_or_device_counts_end_before_training(tmp_path):
    """Two processes given two workdirs each wrote its share of the checkpoints into its own;
    they hung at the checkpoint's commit (20 minutes, then killed) and the run was lost. Two
    processes of 2 and 1 devices ended in a traceback of the first collective. Both are refused
    in every process before anything is written; a link to process 0's workdir is the same."""
    from test_train_helpers import finish, free_port, process_flags, start_worker

    cases = [  # (workdir of process 1, devices of process 1, process 1's reason)
        (
            tmp_path / "other",
            1,
            f"process 1's workdir {tmp_path / 'other'} holds no training lock of process 0, "
            f"which trains in {tmp_path / 'run'}: another folder, or one on a disk process 0 does "
            "not see; give every process the same --workdir, on a file system every process sees",
        ),
        (
            tmp_path / "run",
            2,
            "process 1 drives 2 devices, process 0 1 device: every process of a group drives as "
            "many (give each the same GPUs: CUDA_VISIBLE_DEVICES, --gpus-per-task, XLA_FLAGS)",
        ),
    ]
    for workdir, devices, reason in cases:
        port = free_port()
        processes = [
            start_worker(tmp_path / "unused0.npz", tmp_path / "run", 1, process_flags(port, 0)),
            start_worker(tmp_path / "unused1.npz", workdir, devices, process_flags(port, 1),
                         workdir_wait_s=2),
        ]  # fmt: skip
        outputs = finish(processes, timeout=240, returncode=1)  # the workers' uncaught errors
        assert f"UserError: {reason}" in outputs[1], outputs[1][-2000:]
        assert f": {reason}" in outputs[0] and "UserError: process 1 could not " in outputs[0]
        for folder in {tmp_path / "run", workdir}:
            assert not (folder / "checkpoints").exists() and not (folder / "config.json").exists()
    (tmp_path / "link").symlink_to(tmp_path / "run")
    port = free_port()
    flags = ["--config.train.steps=2"]
    processes = [
        start_worker(tmp_path / f"linked{i}.npz", tmp_path / name, 1, [*process_flags(port, i),
                     *flags])
        for i, name in enumerate(("run", "link"))
    ]  # fmt: skip
    finish(processes, timeout=240)


@pytest.mark.slow
def test_processes_reach_one_store_by_any_path_but_not_another_store(tmp_path):
    """`data.store` by another path in one process (a link, another mount) is the same store;
    a store of other data in one process is refused in every process before training."""
    from test_train_helpers import finish, free_port, process_flags, start_worker

    (tmp_path / "stlink").symlink_to(tmp_path / "st")
    for name, seeds, status in (("same", (0, 0), 0), ("other", (0, 1), 1)):
        port = free_port()
        processes = [
            start_worker(
                tmp_path / f"{name}{i}.npz",
                tmp_path / name,
                1,
                [
                    *process_flags(port, i),
                    "--config.train.steps=2",
                    f"--config.data.store={tmp_path / ('st', 'stlink')[i]}",
                ],
                store_seed=seeds[i],
            )  # fmt: skip
            for i in range(2)
        ]
        outputs = finish(processes, timeout=240, returncode=status)
    reason = (
        "process 1's store memory:/fake-store holds other settings, cases or data than process "
        "0's; give every process the same store"
    )
    assert f"UserError: process 1 could not open the store of process 0: {reason}" in outputs[0]
    assert f"UserError: {reason}" in outputs[1]
    assert (tmp_path / "same" / "checkpoints").is_dir()


def _save_weights(tmp_path, seeds) -> None:
    """Random backbone weights of the workers' tiny model as `tmp_path / "w<seed>.safetensors"`."""
    import jax
    import numpy as np
    from test_pretrained import random_variables
    from test_train_helpers import tiny_config

    from focalnet_jax.models.pretrained import save_torchvision_resnet
    from focalnet_jax.run.spec import RunSpec
    from focalnet_jax.training import train_state

    spec = RunSpec.from_config(tiny_config(), image_size=(32, 32))
    init = train_state.init_variables(spec.model, jax.random.key(1), spec.input_shape)
    for seed in seeds:
        saved = random_variables(init, np.random.default_rng(seed))
        path = tmp_path / f"w{seed}.safetensors"
        save_torchvision_resnet(saved, path, components=spec.components)


def _start_with_weights(tmp_path, weights: list[str]) -> list[str]:
    """The outputs of two processes training 2 steps in `tmp_path / "run"`, process i from the
    pretrained weights file `weights[i]` ('' for none), which end with status 1."""
    from test_train_helpers import finish, free_port, process_flags, start_worker

    port = free_port()
    processes = [
        start_worker(
            tmp_path / f"unused{i}.npz",
            tmp_path / "run",
            1,
            [
                *process_flags(port, i),
                "--config.train.steps=2",
                f"--config.model.pretrained={weights[i]}",
            ],
        )  # fmt: skip
        for i in range(2)
    ]
    return finish(processes, timeout=240, returncode=1)


@pytest.mark.slow
@pytest.mark.parametrize("process0", ["other", "none"])
def test_processes_started_from_other_pretrained_weights_end_before_training(tmp_path, process0):
    """`model.pretrained` naming other weights in one process (its path is left out of the config
    comparison: a node-local copy is the same file): each process replicated its own weights, and
    the group trained replicas that never agreed, without a word. Every process now compares the
    weights it loaded with process 0's. Process 0 without weights: only process 1 ran the
    comparison's blocks, and every later block of the group was paired with another."""
    _save_weights(tmp_path, (0, 1))
    first = "" if process0 == "none" else str(tmp_path / "w0.safetensors")
    outputs = _start_with_weights(tmp_path, [first, str(tmp_path / "w1.safetensors")])
    reason = (
        f"process 1's pretrained weights {tmp_path / 'w1.safetensors'} hold other values than "
        "process 0's; give every process the same weights"
    )
    if process0 == "none":
        reason = (
            f"process 1 was started with pretrained weights {tmp_path / 'w1.safetensors'}, "
            "process 0 without them; start every process with the same command"
        )
    assert f"UserError: process 1 could not load the weights of process 0: {reason}" in outputs[0]
    assert f"UserError: {reason}" in outputs[1]
    assert not list((tmp_path / "run" / "checkpoints").glob("*/"))


@pytest.mark.slow
def test_a_process_that_cannot_load_its_pretrained_weights_ends_the_group(tmp_path):
    """Process 0's copy of the weights damaged (each host its own copy): the other process went
    on into the first collective and waited there for it; now every process ends, each with one
    line."""
    _save_weights(tmp_path, (1,))
    (tmp_path / "w0.safetensors").write_bytes(b"not safetensors")
    weights = [str(tmp_path / f"w{i}.safetensors") for i in range(2)]
    outputs = _start_with_weights(tmp_path, weights)
    assert f"PretrainedWeightsError: pretrained weights {weights[0]}" in outputs[0]
    assert (
        "UserError: process 0 could not load its pretrained weights: pretrained weights"
        in (outputs[1])
    )
