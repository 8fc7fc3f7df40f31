"""Whether a process recorded in a file (a store writer, a study cell) still runs.

A pid means something only where it was taken: on a shared file system another host, or a
container with the same host name but its own PID namespace (`docker --network=host`), may run
that pid number right now. `pid_space()` names where this process's pids mean something; a
recorded pid is checked with `pid_alive` only when its recorded space is this one.
"""

from __future__ import annotations

import functools
import hashlib
import os
import socket
from pathlib import Path


@functools.cache
def boot_id() -> str | None:
    """The Linux kernel's id of this boot (a new one at each boot); None elsewhere."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:  # not Linux
        return None


@functools.cache
def pid_space() -> str:
    """8 hex digits naming where this process's pids mean something: host name, boot id and PID
    namespace (what of the latter two this system shows)."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:  # not Linux
        namespace = ""
    parts = [socket.gethostname(), boot_id() or "", namespace]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:8]


def process_start(pid: int) -> int | None:
    """When process `pid` started, in clock ticks after boot (field 22 of Linux's /proc/<pid>/stat);
    None where unknown (no such process, not Linux). A pid is reused once its process ends; with
    its start time it names one process."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[19])


def _stat_fields(pid: int) -> list[str] | None:
    """Linux's /proc/<pid>/stat from its field 3 (the state) on; None where it cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()


def pid_alive(pid: int, started: int | None = None) -> bool:
    """Whether process `pid` of this pid space runs. A zombie does not: a killed process whose
    parent died too stays one until the system's init reaps it, which some containers' init never
    does (its state, from Linux's /proc/<pid>/stat, is Z). `started`: the recorded
    `process_start` of the process meant; a process of that pid that started at another time
    reuses the pid, and the one meant has ended."""
    others = False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: /proc still tells its state and start
        others = True
    fields = _stat_fields(pid)
    if fields is None:  # no /proc (not Linux), or hidden (another user's): os.kill's answer;
        return others or not Path("/proc").is_dir()  # else the process has just ended
    return fields[0] != "Z" and (started is None or int(fields[19]) == int(started))
