"""Facts about the processes of this machine, for code of every layer (no torch import)."""

from __future__ import annotations

import os


def process_alive(pid: int) -> bool:
    """Whether a process of this pid exists on this machine (another user's counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # NOTE: alive, and someone else's
        return True
    return True
