"""Shallow health checks on their own port, served from their own thread and event loop.

Why a thread: the incident this gateway exists for began with health checks queued behind
saturated proxy work on the same port and loop. Here `/healthz` never touches upstreams, Redis or
the proxy loop's queues: it reads one timestamp the proxy loop refreshes (a heartbeat) and answers
503 only when that loop has not run for `stall_threshold` (a hang, not load).
`/readyz` is 200 once listeners are bound and 503 while draining.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from collections.abc import Callable


class Liveness:
    """Heartbeat written by the proxy loop, read by the health thread (a float store is atomic)."""

    def __init__(self, stall_threshold_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.stall_threshold_s = stall_threshold_s
        self.clock = clock
        self.last_beat = clock()
        self.ready = False
        self.draining = False
        self._handle: asyncio.TimerHandle | None = None

    def is_alive(self) -> bool:
        return self.clock() - self.last_beat <= self.stall_threshold_s

    def is_ready(self) -> bool:
        return self.ready and not self.draining

    def beat_on(self, loop: asyncio.AbstractEventLoop, interval_s: float = 0.25) -> None:
        """Schedule the heartbeat on the proxy loop: if that loop stalls, the beats stop."""

        def beat() -> None:
            self.last_beat = self.clock()
            self._handle = loop.call_later(interval_s, beat)

        beat()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()


_OK = b"ok\n"
_STALLED = b"event loop stalled\n"
_READY = b"ready\n"
_NOT_READY = b"not ready\n"
_DRAINING = b"draining\n"


def make_app(liveness: Liveness) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        if liveness.is_alive():
            return web.Response(body=_OK, content_type="text/plain")
        return web.Response(status=503, body=_STALLED, content_type="text/plain")

    async def readyz(_: web.Request) -> web.Response:
        if liveness.is_ready():
            return web.Response(body=_READY, content_type="text/plain")
        body = _DRAINING if liveness.draining else _NOT_READY
        return web.Response(status=503, body=body, content_type="text/plain")

    app = web.Application()
    # aiohttp answers HEAD for GET routes (allow_head defaults to True) with the same status, no body.
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/livez", healthz)
    app.router.add_get("/readyz", readyz)
    return app


class HealthServer:
    """Runs the health app on a daemon thread with its own event loop."""

    def __init__(self, liveness: Liveness, host: str, port: int, sock: object | None = None) -> None:
        self.liveness = liveness
        self.host = host
        self.port = port
        self._sock = sock
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="gateway-health", daemon=True)
        self._thread.start()
        self._started.wait(10)
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as e:
            self._error = e
            self._started.set()
            return
        self._started.set()
        loop.run_forever()
        if self._runner is not None:
            loop.run_until_complete(self._runner.cleanup())
        loop.close()

    async def _serve(self) -> None:
        runner = web.AppRunner(make_app(self.liveness), access_log=None, handle_signals=False)
        await runner.setup()
        site: web.BaseSite
        if self._sock is not None:
            site = web.SockSite(runner, self._sock)  # type: ignore[arg-type]
        else:
            site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        await site.start()
        self._runner = runner
        server = site._server
        sockets = getattr(server, "sockets", None)
        if sockets:
            self.port = sockets[0].getsockname()[1]

    def stop(self) -> None:
        loop = self._loop
        if loop is not None and loop.is_running():
            loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            with contextlib.suppress(RuntimeError):
                self._thread.join(5)
