"""Shallow health checks on their own port, answered outside the proxy's event loop.

Why: the incident this gateway exists for began with health checks queued behind saturated
proxy work on the same port and loop. Here `/healthz` never touches upstreams, Redis or the
proxy loop's queues: it reads one timestamp the proxy loop refreshes (a heartbeat, in shared
memory) and answers 503 only when that loop has not run for `stall_threshold` (a hang, not load).
`/readyz` is 200 once listeners are bound and 503 while draining.
By default (`health.isolation: process`) the responder is its own small process, so it shares no
GIL with the proxy; `thread` runs it on a thread with its own loop (used by in-process tests and
by the `workers: N` master, whose loop is never busy).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import uvloop

from gateway.process.orphan import release_signals, signals_held, until_orphaned

if TYPE_CHECKING:
    from collections.abc import Callable


class Liveness:
    """Heartbeat written by the proxy loop, read by the health responder.

    The three values (last beat, ready, draining) live in a small shared-memory array, so the
    responder can run in another thread or in its own process; a float store is atomic either way.
    CLOCK_MONOTONIC is the same for every process of the host.
    """

    def __init__(
        self,
        stall_threshold_s: float,
        clock: Callable[[], float] = time.monotonic,
        shared: Any = None,
    ) -> None:
        self.stall_threshold_s = stall_threshold_s
        self.clock = clock
        self.shared = shared if shared is not None else multiprocessing.RawArray("d", 3)
        self.last_beat = clock()
        self._handle: asyncio.TimerHandle | None = None

    @property
    def last_beat(self) -> float:
        return float(self.shared[0])

    @last_beat.setter
    def last_beat(self, value: float) -> None:
        self.shared[0] = value

    @property
    def ready(self) -> bool:
        return bool(self.shared[1])

    @ready.setter
    def ready(self, value: bool) -> None:
        self.shared[1] = 1.0 if value else 0.0

    @property
    def draining(self) -> bool:
        return bool(self.shared[2])

    @draining.setter
    def draining(self, value: bool) -> None:
        self.shared[2] = 1.0 if value else 0.0

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


def _serve_in_child(
    shared: Any, stall_threshold_s: float, host: str, port: int, conn: Any, parent: int
) -> None:
    """Entry point of the health process: answer probes until the gateway process is gone.

    It starts with the documented signals held (inherited from the gateway, gateway.process.orphan) and
    releases them once it knows what to do with each. A HUP or USR1 sent to the whole process group
    (`systemctl kill`, a terminal) or to this process is ignored: nothing here to reload or reopen.
    INT is ignored too: Ctrl-C drains the gateway, and this process keeps answering meanwhile.
    TERM ends it cleanly (exit 0).
    """
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        # Best effort (needs CAP_SYS_NICE): a probe's wake-up should not queue behind busy
        # processes for a scheduler slice when the host is saturated.
        os.setpriority(os.PRIO_PROCESS, 0, -10)
    liveness = Liveness(stall_threshold_s, shared=shared)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        server = loop.run_until_complete(
            loop.create_server(lambda: HealthProtocol(liveness), host, port, reuse_address=True, backlog=1024)
        )
    except OSError as e:
        conn.send(("error", f"{e.strerror or e}"))
        return
    conn.send(("port", server.sockets[0].getsockname()[1]))  # type: ignore[attr-defined]
    conn.close()

    watch = loop.create_task(until_orphaned(parent, 0.5))
    loop.add_signal_handler(signal.SIGTERM, watch.cancel)
    release_signals()
    with contextlib.suppress(asyncio.CancelledError):
        loop.run_until_complete(watch)
    server.close()  # open probe connections close with the process
    loop.close()


class HealthProcess:
    """The health responder in its own process: no GIL shared with the proxy loop at all.

    Why: under a saturated proxy loop a thread still waits for the GIL (p99 of tens of ms);
    a process answers in the time the kernel takes. It reads the proxy loop's heartbeat from
    shared memory, exits when the gateway process is gone, and is killed on a clean stop.
    """

    def __init__(self, liveness: Liveness, host: str, port: int) -> None:
        self.liveness = liveness
        self.host = host
        self.port = port
        self.proc: Any = None

    def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        parent_conn, child_conn = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(
            target=_serve_in_child,
            args=(
                self.liveness.shared,
                self.liveness.stall_threshold_s,
                self.host,
                self.port,
                child_conn,
                os.getpid(),
            ),
            name="gateway-health",
            daemon=True,
        )
        with signals_held():  # the child starts held, whatever the caller's mask
            self.proc.start()
        child_conn.close()
        if not parent_conn.poll(20):
            self.stop()
            raise OSError("the health process did not start")
        kind, value = parent_conn.recv()
        parent_conn.close()
        if kind == "error":
            self.stop()
            raise OSError(f"health_listen {self.host}:{self.port}: {value}")
        self.port = int(value)

    def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.is_alive():
            proc.kill()
            proc.join(5)
