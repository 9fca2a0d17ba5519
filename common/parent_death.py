"""Ending a process when the process that started it dies (Linux), so nothing is left holding
ports, GPUs or RAM after its parent was SIGKILLed: workers under the supervisor or a test run,
and the engine processes vLLM spawns inside an AR worker.
"""

from __future__ import annotations

import signal
import sys

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def signal_on_parent_death(parent_pid: int, sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send `sig` to this process when its parent dies; False if `parent_pid`
    is no longer the parent (it died first), so the caller can exit. A no-op elsewhere than Linux.

    The kernel sends it when the *thread* that started this process ends: start processes that
    use this from a thread that lives as long as its process (the main thread)."""
    if not sys.platform.startswith("linux"):
        return True
    import ctypes
    import os

    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)
    return os.getppid() == parent_pid
