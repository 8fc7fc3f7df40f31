"""Shared pieces of the training tests: a small in-memory store and tiny-model configs.

Run as a script (`python tests/test_train_helpers.py OUT.npz WORKDIR [...]`) it trains the
tiny config on the fake store in the current process (used by the multi-device tests, which start
it with several CPU devices or as several processes) and saves the final parameters.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
COMPONENTS = ("t2w", "adc")
# Parameters trained over several devices vs one: float32 reductions in another order.
MULTI_DEVICE_RTOL, MULTI_DEVICE_ATOL = 1e-4, 1e-6


class FakeStore:
    """The attributes of `focalnet_jax.data.store.Store` the trainer reads, on random slices:
    `patients` patients with `slices` slices of `size` x `size`, one square lesion per slice
    (class 1..5 cycling), visible in T2w (dark) or ADC (dark) or both."""

    def __init__(
        self, patients: int = 10, slices: int = 3, size: int = 32, seed: int = 0, components=None
    ):
        rng = np.random.default_rng(seed)
        n = patients * slices
        self.path = Path("memory://fake-store")
        self.components = tuple(components or COMPONENTS)
        # What a run records of its store (`data.run_store`): these arguments stand for settings.
        self.settings = {
            "fake": [patients, slices, size, seed],
            "components": list(self.components),
        }
        self.fingerprint = f"fake-{patients}-{slices}-{size}-{seed}-{'-'.join(self.components)}"
        channels = len(self.components)
        self.images = rng.uniform(0.4, 0.9, (n, size, size, channels)).astype(np.float32)
        self.images[..., 0] *= 1.15  # T2w is stored unclipped
        self.classes = np.zeros((n, size, size), np.uint8)
        self.grade_known = np.ones((n, size, size), np.uint8)
        self.lesions = np.zeros((n, size, size), np.int32)
        self.annotated = np.zeros(n, bool)
        self.cases = []
        for p in range(patients):
            start = p * slices
            cls = 1 + p % 5
            for s in range(start, start + slices):
                if s % slices == slices - 1 and p % 2:
                    continue  # some unannotated slices
                r, c = rng.integers(4, size - 12, 2)
                visible = list(range(channels)) if s % 3 == 0 else [s % 3 - 1]
                for ch in visible:
                    self.images[s, r : r + 8, c : c + 8, ch] *= 0.3
                self.classes[s, r : r + 8, c : c + 8] = cls
                self.lesions[s, r : r + 8, c : c + 8] = 1
                self.annotated[s] = True
            self.cases.append(
                {
                    "case_id": f"case{p:03d}",
                    "patient_id": f"patient{p:03d}",
                    "start": start,
                    "stop": start + slices,
                    "lesion_classes": [cls],
                    "lesion_grade_known": [True],
                    "max_class": cls,
                    "spacing": [0.625, 0.625],
                    "t2w_reference": {"air": 10.0, "bladder": 400.0, "source": "bladder"},
                }
            )
        self._by_id = {r["case_id"]: r for r in self.cases}

    def __len__(self):
        return len(self.images)

    @property
    def case_ids(self):
        return [r["case_id"] for r in self.cases]

    def case(self, case_id):
        return self._by_id[case_id]

    def case_slices(self, case_id):
        record = self.case(case_id)
        return slice(record["start"], record["stop"])

    def patient_max_class(self):
        return {r["patient_id"]: r["max_class"] for r in self.cases}


TINY_DEEPLAB = [
    "--config.model.depth=18",
    "--config.model.width=0.125",
    "--config.model.output_stride=16",
]
TINY_UNET = ["--config.model.unet_features=4", "--config.model.unet_levels=3"]
TINY_TRAIN = [
    "--config.train.batch_size=4",
    "--config.train.log_every=1",
    "--config.train.checkpoint_every=1000",
    "--config.train.eval_every=0",
    "--config.train.prefetch=2",
]
TINY = [*TINY_DEEPLAB, *TINY_TRAIN]


def small_synthetic_store(root: Path, *, cases: int, seed: int) -> Path:
    """`focalnet synth --small` + `focalnet preprocess` (PI-CAI layout) under `root`; the store."""
    from focalnet_jax import cli

    data, store = root / "data", root / "store"
    assert (
        cli.main(["synth", f"--out={data}", f"--cases={cases}", f"--seed={seed}", "--small"]) == 0
    )
    preprocess = ["preprocess", "--layout=picai", f"--images={data / 'images'}"]
    preprocess += [f"--labels={data / 'labels'}", f"--masks={data / 'masks'}", f"--out={store}"]
    assert cli.main(preprocess) == 0
    return store


def tiny_config(config_file: str = "configs/focalnet.py", overrides=()):
    """`config_file` with `overrides`, its model made tiny (a ResNet-18 DeepLab at width 0.125
    or a 3-level U-Net, whichever it names) and its training short."""
    from focalnet_jax.config_loading import load_config

    path = str(REPO / config_file)
    unet = load_config(path, list(overrides)).model.name == "unet"
    tiny = [*TINY_UNET, *TINY_TRAIN] if unet else TINY
    return load_config(path, [*tiny, *overrides])


def free_port() -> int:
    """A TCP port free on localhost now (for a local coordinator)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def process_flags(port: int, process_id: int, num_processes: int = 2) -> list[str]:
    """The script's flags for process `process_id` of a local group coordinated on `port`."""
    return [
        "--coordinator",
        f"localhost:{port}",
        "--num_processes",
        str(num_processes),
        "--process_id",
        str(process_id),
    ]


def xla_flags(devices: int) -> str:
    """`XLA_FLAGS` for a child process on `devices` CPU devices: this process's flags (the test
    session's, see conftest) and the device count, which wins over one given before."""
    flags = os.environ.get("XLA_FLAGS", "")
    return f"{flags} --xla_force_host_platform_device_count={devices}".strip()


def cpu_devices_env(devices: int, **extra) -> dict[str, str]:
    """This environment for a child process of this checkout on `devices` CPU devices."""
    return dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=xla_flags(devices),
        PYTHONPATH=str(REPO),
        **extra,
    )


def script_json(script: str, *args: str, devices: int = 2, timeout: float = 300):
    """Runs `script` (a test file's `__main__` part) with `args` on `devices` CPU devices and
    returns the JSON value of its last stdout line; its exit status must be 0."""
    result = subprocess.run(
        [sys.executable, script, *args],
        env=cpu_devices_env(devices),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def start_worker(
    out, workdir, devices: int, args=(), store_seed: int = 0, workdir_wait_s: float | None = None
) -> subprocess.Popen:
    """This file run as a script on `devices` CPU devices, its stdout and stderr going to
    `process.log` (a temporary file): `args` = `process_flags(...)` (if any), then `--config.k=v`
    overrides; it trains on `FakeStore(seed=store_seed)`; `workdir_wait_s`: the process group's
    `group_checks.WORKDIR_WAIT_S` (default: the module's)."""
    env = cpu_devices_env(devices, FAKE_STORE_SEED=str(store_seed))
    if workdir_wait_s is not None:
        env["WORKDIR_WAIT_S"] = str(workdir_wait_s)
    command = [sys.executable, str(Path(__file__).resolve()), str(out), str(workdir), *args]
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    process.log = log
    return process


def finish(
    processes: list[subprocess.Popen], timeout: float = 240, returncode: int = 0
) -> list[str]:
    """Wait for `start_worker` processes; the output of each. Fails unless all exit with
    `returncode`; at `timeout` seconds the others are killed (they would wait at a barrier), and
    so they are as soon as one fails where all should succeed."""
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
            if returncode == 0 and any(p.returncode not in (None, 0) for p in processes):
                break
            time.sleep(0.2)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()  # SIGKILL: at once (SIGTERM would save a checkpoint first)
                process.wait()
    outputs = []
    for process in processes:
        process.log.seek(0)
        outputs.append(process.log.read().decode(errors="replace"))
        process.log.close()
    failures = [
        f"process {i}: exit {p.returncode}: {output[-2000:]}"
        for i, (p, output) in enumerate(zip(processes, outputs, strict=True))
        if p.returncode != returncode
    ]
    assert not failures, "\n".join(failures)
    return outputs


def batch_stats_file(out) -> Path:
    """Where the script saves the final BatchNorm running averages beside OUT.npz."""
    return Path(out).with_suffix(".batch_stats.npz")


def _main(argv):
    """`OUT.npz WORKDIR [--process_id I --num_processes N --coordinator HOST:PORT]
    [--config.k=v ...]`; process 0 writes the final parameters to OUT.npz and the running
    averages to `batch_stats_file(OUT)`."""
    import jax

    out, workdir, rest = argv[0], argv[1], argv[2:]
    flags = {}
    while rest and not rest[0].startswith("--config."):
        flags[rest[0].lstrip("-")] = rest[1]
        rest = rest[2:]
    if flags:
        from focalnet_jax.training import distributed, group_checks

        # A test of a refused workdir need not wait as long as a network file system may take.
        wait_s = os.environ.get("WORKDIR_WAIT_S", group_checks.WORKDIR_WAIT_S)
        group_checks.WORKDIR_WAIT_S = float(wait_s)

        distributed.initialize(
            flags["coordinator"], int(flags["num_processes"]), int(flags["process_id"])
        )
    from focalnet_jax.training import train_and_evaluate

    config = tiny_config(overrides=rest)
    store = FakeStore(seed=int(os.environ.get("FAKE_STORE_SEED", "0")))
    state = train_and_evaluate(config, workdir, store=store)
    if jax.process_index() == 0:
        for path, tree in ((out, state.params), (batch_stats_file(out), state.batch_stats)):
            flat = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
            np.savez(path, **{jax.tree_util.keystr(k): np.asarray(v) for k, v in flat})


if __name__ == "__main__":
    _main(sys.argv[1:])
