"""Whether a process still exists: one answer for the run lease and the model cache's cleanup (torch-free)."""
from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (a process we may not signal exists)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:   # PermissionError and the like: it is there, just not ours
        return True
    return True
