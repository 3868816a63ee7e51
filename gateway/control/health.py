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
import sys
import threading
import time
from typing import TYPE_CHECKING

import uvloop

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
_MAX_HEAD = 8192


def _response(status: bytes, body: bytes, head_only: bool, close: bool) -> bytes:
    return b"".join(
        (
            b"HTTP/1.1 ",
            status,
            b"\r\nContent-Type: text/plain\r\nCache-Control: no-store\r\nContent-Length: %d\r\n" % len(body),
            b"Connection: close\r\n\r\n" if close else b"\r\n",
            b"" if head_only else body,
        )
    )


def answer(liveness: Liveness, method: bytes, path: bytes) -> tuple[bytes, bytes]:
    """(status line tail, body) for one probe; shallow: reads two flags and one timestamp."""
    if method not in (b"GET", b"HEAD"):
        return b"405 Method Not Allowed", b"GET or HEAD\n"
    if path in (b"/healthz", b"/livez"):
        return (b"200 OK", _OK) if liveness.is_alive() else (b"503 Service Unavailable", _STALLED)
    if path == b"/readyz":
        if liveness.is_ready():
            return b"200 OK", _READY
        return b"503 Service Unavailable", _DRAINING if liveness.draining else _NOT_READY
    return b"404 Not Found", b"try /healthz or /readyz\n"


class HealthProtocol(asyncio.Protocol):
    """A minimal HTTP/1.1 responder: a probe costs a few bytes operations, so it holds the GIL
    for microseconds and never waits behind the proxy loop (which runs in another thread)."""

    def __init__(self, liveness: Liveness) -> None:
        self.liveness = liveness
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        buf = self.buf + data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > _MAX_HEAD:
                    transport.write(_response(b"431 Request Header Fields Too Large", b"", True, True))
                    transport.close()
                self.buf = buf
                return
            head, buf = buf[:end], buf[end + 4 :]
            line, _, fields = head.partition(b"\r\n")
            parts = line.split(b" ")
            if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
                transport.write(_response(b"400 Bad Request", b"bad request\n", False, True))
                transport.close()
                return
            method, target, version = parts
            low = fields.lower()
            # A probe never has a body; one that announces a body is answered, then closed.
            close = (
                version == b"HTTP/1.0"
                or b"connection: close" in low
                or b"content-length:" in low
                or b"transfer-encoding:" in low
            )
            status, body = answer(self.liveness, method, target.split(b"?", 1)[0])
            transport.write(_response(status, body, method == b"HEAD", close))
            if close:
                transport.close()
                return


class HealthServer:
    """Runs the health app on a daemon thread with its own event loop."""

    def __init__(self, liveness: Liveness, host: str, port: int, sock: object | None = None) -> None:
        self.liveness = liveness
        self.host = host
        self.port = port
        self._sock = sock
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> None:
        # While a probe is being answered the proxy thread must hand over the GIL quickly: 0.5 ms
        # instead of CPython's 5 ms switch interval (it only matters while this thread waits).
        sys.setswitchinterval(0.0005)
        self._thread = threading.Thread(target=self._run, name="gateway-health", daemon=True)
        self._thread.start()
        self._started.wait(10)
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        loop = uvloop.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as e:
            self._error = e
            self._started.set()
            return
        self._started.set()
        loop.run_forever()
        if self._server is not None:
            self._server.close()
        loop.close()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        liveness = self.liveness
        server = await loop.create_server(
            lambda: HealthProtocol(liveness), self.host, self.port, reuse_address=True, backlog=1024
        )
        self._server = server
        self.port = server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        loop = self._loop
        if loop is not None and loop.is_running():
            loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            with contextlib.suppress(RuntimeError):
                self._thread.join(5)
