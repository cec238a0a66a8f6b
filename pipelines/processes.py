"""Processes and ports on this machine: whether a process still runs, and a free port on the loopback interface
(standard library only, so cluster scripts and tests use it too)."""
from __future__ import annotations

import os
import socket
from pathlib import Path


def process_alive(pid: int) -> bool:
    """True while process `pid` exists and has not exited; a zombie (exited, not yet reaped) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: it exists
    if not Path("/proc").is_dir():
        return True  # no /proc (macOS): kill(0) is all there is
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False  # it ended between the two looks


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now at `host` (the OS picks it; another process may take it later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
