"""A one-node SLURM cluster in a temporary folder, for the study tests (Debian's slurm-wlm and
munge, run as root): a munge key and daemon of its own, a generated slurm.conf (this machine's
hostname and CPU count, free ports, state/spool/log folders inside the temporary folder,
`proctrack/linuxproc` and `task/none` so that no cgroup set-up is needed), then slurmctld and
slurmd. `stop()` ends every daemon it started, by its pid file. One cluster runs at a time on the
machine: `start()` waits for an exclusive lock on LOCK_FILE (held until `stop()`), so test files run
in parallel processes (`pytest -n`) take turns.

Usable on its own: `python tests/slurm_cluster.py DIR` starts a cluster, prints the `SLURM_CONF`
to export, and stops it on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from focalnet_jax.processes import pid_alive

LOCK_FILE = Path(tempfile.gettempdir()) / "focalnet-test-slurm-cluster.lock"
# Seconds from SLURM's SIGTERM to a task's processes to its SIGKILL (SLURM's default is 30): a
# training stopped by SIGTERM saves its step first, which on a loaded machine takes a while. A
# task that ends on SIGTERM ends at once, whatever this is.
KILL_WAIT_S = 60
# Seconds a client (sbatch, squeue, scontrol) waits for slurmctld before it fails with `Socket
# timed out` (SLURM's default is 10, which a loaded machine's slurmctld may miss).
MESSAGE_TIMEOUT_S = 60
# What the cluster and its tests run (.ci/install_slurm.sh installs them where one is absent)
BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scancel")


def missing_binaries() -> list[str]:
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [b for b in BINARIES if shutil.which(b, path=path) is None]


def _free_ports(count: int) -> list[int]:
    """`count` different free ports: each socket stays bound until all are chosen."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def _sbin(name: str) -> str:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


class OneNodeCluster:
    """Start with `start()`; `env` holds `SLURM_CONF` for the clients (sbatch, squeue)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.pid_files: list[Path] = []
        self.conf = self.root / "slurm.conf"
        self.env = {"SLURM_CONF": str(self.conf)}
        self._lock = None

    def _write_conf(self, munge_socket: Path) -> None:
        host = socket.gethostname().split(".")[0]
        for name in ("state", "spool", "log"):
            (self.root / name).mkdir(parents=True, exist_ok=True)
        controller_port, node_port = _free_ports(2)
        lines = [
            "ClusterName=focalnettest",
            f"SlurmctldHost={host}",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"SlurmctldPort={controller_port}",
            f"SlurmdPort={node_port}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={munge_socket}",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill",
            "MpiDefault=none",
            "ReturnToService=2",
            "SwitchType=switch/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
            "InactiveLimit=0",
            f"KillWait={KILL_WAIT_S}",
            f"MessageTimeout={MESSAGE_TIMEOUT_S}",
            f"NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} State=UNKNOWN",
            f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def _start_munge(self) -> Path:
        munge = self.root / "munge"
        munge.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = munge / "munge.key"
        subprocess.run([_sbin("mungekey"), "--create", f"--keyfile={key}"], check=True)
        key.chmod(0o600)
        sock = munge / "munge.socket"
        pid_file = munge / "munged.pid"
        subprocess.run(
            [
                _sbin("munged"),
                "--force",
                f"--key-file={key}",
                f"--socket={sock}",
                f"--pid-file={pid_file}",
                f"--log-file={munge / 'munged.log'}",
                f"--seed-file={munge / 'munged.seed'}",
            ],
            check=True,
        )
        self.pid_files.append(pid_file)
        return sock

    def start(self, timeout_s: float = 300.0) -> OneNodeCluster:
        self._lock = open(LOCK_FILE, "a")  # held until stop()
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        try:
            return self._start(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout_s: float) -> OneNodeCluster:
        sock = self._start_munge()
        self._write_conf(sock)
        env = {**os.environ, **self.env}
        subprocess.run([_sbin("slurmctld"), "-c", "-f", str(self.conf)], check=True, env=env)
        self.pid_files.append(self.root / "slurmctld.pid")
        subprocess.run([_sbin("slurmd"), "-f", str(self.conf)], check=True, env=env)
        self.pid_files.append(self.root / "slurmd.pid")
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            done = subprocess.run(
                ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=env, check=False
            )
            if done.returncode == 0 and done.stdout.strip() in ("idle", "mixed", "allocated"):
                return self
            time.sleep(0.5)
        raise RuntimeError(f"SLURM node not idle after {timeout_s} s; logs in {self.root / 'log'}")

    def stop(self, timeout_s: float = KILL_WAIT_S + MESSAGE_TIMEOUT_S) -> None:
        """Cancels every job left and waits (up to `timeout_s`: a task's processes have
        `KILL_WAIT_S` to end) until the queue is empty, so no job step outlives its daemons; then
        SIGTERM to every daemon by its pid file, all at once (each takes a second or two to shut
        down: one after another they took 5 s), SIGKILL to any still there after `timeout_s`."""
        if self.pid_files:
            self._drain(timeout_s)
        pids = []
        for pid_file in self.pid_files:
            if not pid_file.is_file():
                continue
            pid = int(pid_file.read_text().split()[0])
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
                pids.append(pid)
        deadline = time.time() + timeout_s
        while pids and time.time() < deadline:
            time.sleep(0.1)
            pids = [pid for pid in pids if pid_alive(pid)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.pid_files.clear()
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    def _drain(self, timeout_s: float) -> None:
        env = {**os.environ, **self.env}
        cancel = ["scancel", "--user", getpass.getuser()]
        subprocess.run(cancel, env=env, capture_output=True, timeout=timeout_s)
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            queue = subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True)
            if queue.returncode != 0 or not queue.stdout.strip():
                return
            time.sleep(0.2)


if __name__ == "__main__":
    cluster = OneNodeCluster(Path(sys.argv[1])).start()
    print(f"export SLURM_CONF={cluster.conf}", flush=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
