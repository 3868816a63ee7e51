"""Process lifecycle: signals held until handled, and helper processes that die with their parent.

Held signals. Every signal the README documents (HUP, INT, TERM, USR1) is blocked from the very
start of each gateway process (before any socket is bound) and unblocked only once that process
has installed its handlers (`release_signals`). Why: the ports accept before the handlers exist,
and a reload right after a start (config management, logrotate) used to kill the process with
"Hangup". A blocked signal stays pending and runs its handler on release: a HUP during start is a
reload once started, a TERM or INT a clean drain once started; never death. The mask is per
thread and inherited by threads and across fork and exec, so threads and helper processes created
while it is held start held too; each helper releases after installing its own handlers. Spawn
them with `signals_held` (never through the event loop's subprocess API: libuv empties the child's
mask before exec), which also restores the caller's mask afterwards.

Orphans. A parent killed outright (OOM killer, SIGKILL) runs no cleanup, so each child watches for
itself: the health process would keep answering "alive" for a gateway that is gone, and a worker
would keep serving the shared port with a stale configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

_PR_SET_PDEATHSIG = 1

# The signals the README documents; each process handles all of them (or ignores some on purpose).
HANDLED = (signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def hold_signals() -> None:
    """Block HANDLED in the calling thread: call first thing in a process, before any thread."""
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)


def release_signals() -> None:
    """Unblock HANDLED once this process's handlers are installed; pending ones run them now."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold HANDLED while spawning a child (it starts held); restore the caller's mask after.

    Code run inside may unblock some of them anyway: multiprocessing's resource tracker, on its
    first start, unblocks INT and TERM in the calling thread whatever the mask was (bpo-33613).
    A signal the caller was holding and that gets through meanwhile would meet no handler yet
    (death, or KeyboardInterrupt): it is caught instead, and raised again once the caller's mask
    is back, so it stays pending until the caller releases it.
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
    caught: list[int] = []
    saved: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():  # where Python runs handlers
        for sig in HANDLED:
            if sig in old and signal.getsignal(sig) is not None:
                saved[sig] = signal.signal(sig, lambda n, _frame: caught.append(n))
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        for held, handler in saved.items():
            signal.signal(held, handler)  # runs a caught signal's handler first, if still due
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        for number in dict.fromkeys(caught):
            signal.raise_signal(number)  # held by `old`: pending on this thread again


def signal_on_parent_death(sig: int = signal.SIGTERM) -> None:
    """Linux: have the kernel send us `sig` the moment our parent dies (no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig)


async def until_orphaned(parent: int, interval_s: float) -> None:
    """Return once `parent` is no longer our parent (it died and we were re-parented)."""
    while os.getppid() == parent:
        await asyncio.sleep(interval_s)
