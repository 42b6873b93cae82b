"""Process plumbing shared by the supervisor and its children (Linux)."""

from __future__ import annotations

import ctypes
import gc
import os
import signal

_PR_SET_PDEATHSIG = 1

#: exit status of a child that cannot start: the supervisor stops instead of restarting
STARTUP_FAILURE = 3


def die_with_parent(parent_pid: int, signum: int = signal.SIGTERM) -> None:
    """Ask the kernel to send us ``signum`` when our parent dies, so that killing the
    supervisor (even with SIGKILL) never leaves an orphaned broker or worker."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    # The parent may have died before prctl took effect.
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signum)

_PR_SET_NAME = 15


def set_process_name(name: str) -> None:
    """Name this process in ``ps``/``top`` and ``/proc/PID/comm`` (at most 15 bytes)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def freeze_startup_objects() -> None:
    """Move everything alive after startup (modules, classes, functions, settings) out
    of the cyclic garbage collector's reach.

    A process that holds thousands of connections runs full collections now and then,
    and each walks every tracked object: the tens of thousands made at import time, which
    live as long as the process, would be walked every time for nothing. Frozen, they are
    not (nor are their pages of the forked parent's memory written to by the walk).
    """
    gc.collect()
    gc.freeze()
