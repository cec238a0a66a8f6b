"""Whether a process on this machine still runs (standard library only, so cluster scripts can use it too)."""
from __future__ import annotations

import os
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
