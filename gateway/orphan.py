"""Helper processes that must not outlive the gateway process that started them.

Why: a parent killed outright (OOM killer, SIGKILL) runs no cleanup, so each child watches for
itself: the health process would keep answering "alive" for a gateway that is gone, and a worker
would keep serving the shared port with a stale configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1


def signal_on_parent_death(sig: int = signal.SIGTERM) -> None:
    """Linux: have the kernel send us `sig` the moment our parent dies (no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig)


async def until_orphaned(parent: int, interval_s: float) -> None:
    """Return once `parent` is no longer our parent (it died and we were re-parented)."""
    while os.getppid() == parent:
        await asyncio.sleep(interval_s)
