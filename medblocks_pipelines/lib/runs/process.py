"""Identify the process that runs a run, and tell later whether it is still alive.

A pid alone is not enough: pids are reused. On Linux the process start time (``/proc/<pid>/stat``
field 22, clock ticks since boot) pins the process; elsewhere only ``kill(pid, 0)`` is checked.
A zombie (killed, not yet reaped by its parent) counts as dead.
"""

import os
import socket
from dataclasses import dataclass
from pathlib import Path

_PROC = Path("/proc")


@dataclass(frozen=True)
class ProcessIdentity:
    """Host name, pid and start time (``""`` where the platform has no ``/proc``)."""

    host: str
    pid: int
    start: str


def _stat_fields(pid: int) -> list[str] | None:
    try:
        data = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is parenthesised and may hold spaces: split after it.
    return data.rsplit(")", 1)[1].split()


def this_process() -> ProcessIdentity:
    """The identity of the current process."""
    fields = _stat_fields(os.getpid())
    return ProcessIdentity(socket.gethostname(), os.getpid(), fields[19] if fields else "")


def this_host() -> str:
    """The host name runs record (``ProcessIdentity.host``)."""
    return socket.gethostname()


def is_alive(pid: int, start: str = "") -> bool:
    """Whether process ``pid`` (started at ``start``, when known) still runs on this host."""
    if pid <= 0:
        return False
    if _PROC.is_dir():
        fields = _stat_fields(pid)
        if fields is None or fields[0] == "Z":
            return False
        return not start or fields[19] == start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True
