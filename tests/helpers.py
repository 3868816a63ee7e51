"""Helpers shared by the test modules: config text, servers to proxy to, raw clients, a manual clock,
the strict recording backend of the smuggling tests and the fuzz harness.

Fixtures live in the conftest.py files and call these; no test module imports from another one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import re
import socket
import ssl
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, Protocol, TypeVar

import aiohttp
import httptools
import orjson
from aiohttp import web
from hypothesis import strategies as st

from gateway.config.parse import load_text
from gateway.process.app import App

ROOT = Path(__file__).resolve().parents[1]  # the repository
DATA = ROOT / "tests" / "data"

# ---- config text --------------------------------------------------------------------------------

# Listeners of an in-process test gateway: an ephemeral proxy port, no health or admin port.
HEADER = "listen: 127.0.0.1:0\nhealth_listen: null\nadmin_listen: null\n"

# What `gateway_app` puts before a config that names no listener: every port ephemeral.
GATEWAY_HEADER = """
listen: 127.0.0.1:0
health_listen: 127.0.0.1:0
admin_listen: 127.0.0.1:0
"""


def uniq(prefix: str) -> str:
    """A route or upstream name no other test uses (stats are process-wide, keyed by name)."""
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def config_for(
    *addresses: str,
    balance: str = "round_robin",
    weights: tuple[int, ...] | None = None,
    route: str = "",
    client: str = "",
    extra_routes: str = "",
) -> str:
    """One upstream `api` over `addresses` and one catch-all route `api` (plus `route` lines)."""
    targets = "".join(
        f"      - address: {a}\n        weight: {weights[i] if weights else 1}\n"
        for i, a in enumerate(addresses)
    )
    text = HEADER + f"upstreams:\n  api:\n    balance: {balance}\n    targets:\n{targets}routes:\n"
    text += extra_routes
    text += "  - name: api\n    upstream: api\n" + route
    if client:
        text += f"client: {client}\n"
    return text


def one_upstream(address: str, upstream: str, route: str, extra: str = "") -> str:
    """`extra`, then one upstream over `address` and one catch-all route to it (no listener lines)."""
    return f"""{extra}
upstreams:
  {upstream}:
    targets: [{{address: "{address}"}}]
routes:
  - name: {route}
    upstream: {upstream}
"""


def rate_limit_config(backend: Backend, route: str, limits: str, extra: str = "") -> str:
    """HEADER, `extra`, then one upstream over `backend` and the route `route` limited by `limits`."""
    return (
        HEADER
        + extra
        + f"""
upstreams:
  api:
    targets: [{{address: {backend.address}}}]
routes:
  - name: {route}
    upstream: api
    rate_limit: {limits}
"""
    )


def proxy_url(app: App, path: str = "/") -> str:
    return f"http://127.0.0.1:{app.proxy.port}{path}"


def admin_url(app: App, path: str) -> str:
    assert app.admin is not None
    return f"http://127.0.0.1:{app.admin.port}{path}"


# ---- servers: started on demand, stopped at teardown -------------------------------------------


class Server(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


S = TypeVar("S", bound=Server)
P = ParamSpec("P")


@contextlib.asynccontextmanager
async def started_servers(kind: Callable[P, S]) -> AsyncIterator[Callable[P, Awaitable[S]]]:
    """A factory for fixtures: `await make(*args)` builds `kind(*args)`, starts it and returns it;
    every server it started is stopped when the block exits (at the fixture's teardown)."""
    started: list[S] = []

    async def make(*args: P.args, **kwargs: P.kwargs) -> S:
        server = kind(*args, **kwargs)
        await server.start()
        started.append(server)
        return server

    try:
        yield make
    finally:
        for server in started:
            await server.stop()


def gateway_app(yaml_text: str, path: str | None = None) -> App:
    """An in-process gateway from YAML text (listeners on port 0 unless the text sets them)."""
    text = yaml_text if "listen:" in yaml_text else GATEWAY_HEADER + yaml_text
    config = load_text(text, "<test>")
    if "isolation" not in text:
        # In-process tests answer health from a thread (a process per test would cost ~0.2 s
        # each); the process mode has its own tests.
        config = dataclasses.replace(config, health=dataclasses.replace(config.health, isolation="thread"))
    return App(config, path)


class GatewayFactory(Protocol):
    """The `gateway_factory` fixture: a started `gateway_app(yaml_text, path)`."""

    def __call__(self, yaml_text: str, path: str | None = None) -> Awaitable[App]: ...


class BackendFactory(Protocol):
    """The `backend_factory` fixture: a started `Backend(app, port, name)`."""

    def __call__(
        self, app: web.Application | None = None, port: int = 0, name: str = "backend"
    ) -> Awaitable[Backend]: ...


class Backend:
    """A real aiohttp server on 127.0.0.1:`port` (0: a free one), counting the requests it received.

    Without `app` it serves `default_backend_app(name)`.
    """

    def __init__(self, app: web.Application | None = None, port: int = 0, name: str = "backend") -> None:
        self.app = app if app is not None else default_backend_app(name)
        self.runner: web.AppRunner | None = None
        self.port = port  # the port asked for; the bound one once started
        self.requests: list[web.Request] = []
        self.ssl_context: ssl.SSLContext | None = None  # serve over TLS with it

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(
            self.runner, "127.0.0.1", self.port, reuse_address=True, ssl_context=self.ssl_context
        )
        await site.start()
        self.port = int(self.runner.addresses[0][1])

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


def default_backend_app(name: str = "backend") -> web.Application:
    @web.middleware
    async def count(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> Any:
        request.app["requests"].append(request)
        return await handler(request)

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response(
            {
                "name": name,
                "method": request.method,
                "path": request.path_qs,
                "headers": dict(request.headers),
                "body_len": len(body),
            }
        )

    async def status(request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]), text="status\n")

    async def sleep(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.match_info["secs"]))
        return web.Response(text="slept\n")

    app = web.Application(middlewares=[count], client_max_size=2**40)
    app["requests"] = []
    app.router.add_route("*", "/status/{code}", status)
    app.router.add_route("*", "/sleep/{secs}", sleep)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


class TcpBackend:
    """A raw server on an ephemeral loopback port for tests that speak HTTP by hand.

    Subclasses implement `serve(reader, writer)` for one connection; connection errors end it
    quietly, the writer is always closed, and `stop` closes every connection still open.
    """

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.port = 0
        self.writers: list[asyncio.StreamWriter] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            await self.serve(reader, writer)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for w in self.writers:
                w.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.server.wait_closed(), 2.0)
            self.server = None


async def read_request(reader: asyncio.StreamReader, body: bool = True) -> bytes:
    """One request head (and its Content-Length body unless `body` is False)."""
    head = await reader.readuntil(b"\r\n\r\n")
    if body:
        await skip_body(reader, head)
    return head


async def skip_body(reader: asyncio.StreamReader, head: bytes) -> None:
    """Read and drop the Content-Length body that `head` announces."""
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            await reader.readexactly(int(line.split(b":", 1)[1]))


# ---- ports, waiting, processes ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.01) -> None:
    """Wait on a condition with a deadline (never a fixed sleep)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(interval)


async def stop_process(
    proc: asyncio.subprocess.Process, sig: int, timeout: float
) -> tuple[int, bytes, bytes]:
    """Signal a `gateway run` subprocess and read its pipes to EOF: (exit code, stdout, stderr).

    Why read to EOF and not just wait(): helper processes of the gateway (multiprocessing's
    resource tracker) hold the inherited pipes for a moment after it exits; a pipe transport
    still open when the test's loop closes fails the next test's setup.
    """
    if proc.returncode is None:
        proc.send_signal(sig)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out or b"", err or b""


def gateway_command(*args: str) -> list[str]:
    """The `gateway` CLI in this interpreter, as a command line: `gateway_command("run", "-c", path)`."""
    return [sys.executable, "-m", "gateway", *args]


def gateway_cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run the `gateway` CLI from the repository root to its end (stdout and stderr as text)."""
    return subprocess.run(
        gateway_command(*args), cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


# ---- clients --------------------------------------------------------------------------------------

Result = tuple[int, dict[str, str], bytes]


async def fetch(
    session: aiohttp.ClientSession | None,
    target: App | str,
    path: str = "/",
    method: str = "GET",
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
    tls: ssl.SSLContext | bool = True,
) -> Result:
    """One request to `target` (a gateway's proxy port and `path`, or a URL): status, headers, body.

    With `session` None the request gets a session, so a connection, of its own.
    """
    url = proxy_url(target, path) if isinstance(target, App) else target
    if session is None:
        async with aiohttp.ClientSession() as own:
            return await fetch(own, url, method=method, data=data, headers=headers, tls=tls)
    async with session.request(method, url, data=data, headers=headers, ssl=tls) as r:
        return r.status, dict(r.headers), await r.read()


async def admin_call(
    app: App, method: str, path: str, token: str | None = None, auth: str | None = None
) -> tuple[int, Any]:
    """One request to the admin port (a bearer `token` or a whole Authorization value `auth`):
    the status and the body, decoded when it is JSON."""
    headers = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if auth is not None:
        headers["Authorization"] = auth
    async with aiohttp.ClientSession() as s, s.request(method, admin_url(app, path), headers=headers) as r:
        body = await r.read()
        ctype = r.headers.get("Content-Type", "")
        return r.status, orjson.loads(body) if ctype.startswith("application/json") else body


async def raw_request(port: int, data: bytes, read_timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes (or the timeout): for malformed-input tests."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    chunks = []
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), read_timeout)
            if not chunk:
                break
            chunks.append(chunk)
    except (TimeoutError, ConnectionResetError):
        pass
    finally:
        writer.close()
    return b"".join(chunks)


@dataclass
class Resp:
    version: bytes
    status: int
    reason: bytes
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    def header(self, name: str) -> str | None:
        name = name.lower()
        values = [v for k, v in self.headers if k.lower() == name]
        return ", ".join(values) if values else None

    def has(self, name: str) -> bool:
        return self.header(name) is not None


class RawConn:
    """A raw HTTP/1.1 client connection: send any bytes, parse responses strictly in order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> RawConn:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def head(self, timeout: float = 5.0) -> Resp:
        raw = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
        lines = raw[:-4].split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        code, _, reason = rest.partition(b" ")
        resp = Resp(version, int(code), reason)
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            resp.headers.append((name.decode("latin-1"), value.strip().decode("latin-1")))
        return resp

    async def response(self, head_only: bool = False, timeout: float = 5.0) -> Resp:
        """The next final response (interim 1xx are returned too: callers ask again)."""
        resp = await self.head(timeout)
        if head_only or resp.status in (204, 304) or 100 <= resp.status < 200:
            return resp
        te = resp.header("transfer-encoding")
        cl = resp.header("content-length")
        if te is not None:
            assert te.lower() == "chunked", te
            parts = []
            while True:
                size_line = await asyncio.wait_for(self.reader.readuntil(b"\r\n"), timeout)
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    trailer = await asyncio.wait_for(self.reader.readuntil(b"\r\n"), timeout)
                    assert trailer == b"\r\n"
                    break
                parts.append(await asyncio.wait_for(self.reader.readexactly(size), timeout))
                assert await asyncio.wait_for(self.reader.readexactly(2), timeout) == b"\r\n"
            resp.body = b"".join(parts)
        elif cl is not None:
            resp.body = await asyncio.wait_for(self.reader.readexactly(int(cl)), timeout)
        else:
            resp.body = await self.until_closed(timeout)
        return resp

    async def until_closed(self, timeout: float = 5.0) -> bytes:
        """Everything up to EOF; fails if the peer does not close within `timeout`."""
        chunks = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise AssertionError("the connection was not closed in time")
            try:
                chunk = await asyncio.wait_for(self.reader.read(65536), left)
            except ConnectionResetError:
                break
            except TimeoutError:
                raise AssertionError("the connection was not closed in time") from None
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


def get(path: str, host: str = "test.local", extra: str = "", method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


def assert_no_traceback(body: bytes) -> None:
    assert b"Traceback" not in body
    assert b'File "' not in body


# ---- a manual clock ---------------------------------------------------------------------------------


class ManualClock:
    """A monotonic clock the test moves by hand: call it to read, ``advance`` to move it."""

    __slots__ = ("now",)

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, dt: float) -> None:
        if dt < 0:
            raise ValueError("a monotonic clock cannot go backwards")
        self.now += dt

    def __repr__(self) -> str:
        return f"ManualClock(now={self.now:g})"


# ---- the smuggling tests' strict recording backend, and an llhttp client (tests/fuzz reuses both) ---

SEGMENT_PAUSE_S = 0.05
SLOW_PREFIX = b"/slow"  # the recording backend answers these targets after SLOW_DELAY_S
SLOW_DELAY_S = 0.3


def gateway_config(address: str, client: str = "{header_read_timeout: 3s}") -> str:
    return (
        HEADER
        + f"upstreams:\n  api:\n    targets: [{{address: {address}}}]\n"
        + "routes:\n  - name: api\n    upstream: api\n    timeouts: {connect: 1s, response: 5s, idle: 5s}\n"
        + f"client: {client}\n"
    )


# ---- the strict backend-side reader -------------------------------------------------------------

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") (/[\x21-\x7e]*|\*) HTTP/1\.1")
_FIELD_LINE = re.compile(rb"(" + _TOKEN + rb"): ((?:[\x21-\x7e\x80-\xff](?:[\t\x20-\x7e\x80-\xff]*))?)")
_HOST = re.compile(rb"[A-Za-z0-9\-._~!$&'()*+,;=%:\[\]]+")
_CHUNK_LINE = re.compile(rb"(0|[1-9a-f][0-9a-f]*)\r\n")
MAX_HEAD = 1 << 20


class ByteFields:
    """`header(name)`: the values of the fields `name` (any case) joined by ", ", or None."""

    headers: list[tuple[bytes, bytes]]

    def header(self, name: bytes) -> bytes | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return b", ".join(values) if values else None


class StrictError(Exception):
    pass


@dataclass
class BackendRequest(ByteFields):
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    raw: bytes = b""


class _LLHTTPCheck:
    """What llhttp makes of one forwarded message, to compare with the strict reader."""

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.messages = 0
        self.bytes_after_end = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_begin(self) -> None:
        if self.messages:
            self.bytes_after_end = True

    def on_message_complete(self) -> None:
        self.messages += 1


def llhttp_agrees(req: BackendRequest) -> str | None:
    """None when llhttp parses `req.raw` as exactly one message equal to `req`; else why not."""
    check = _LLHTTPCheck()
    parser = httptools.HttpRequestParser(check)
    try:
        parser.feed_data(req.raw)
    except httptools.HttpParserUpgrade as e:  # an upgrade request: llhttp stops right after it
        if e.args[0] != len(req.raw):
            return "llhttp stops before the end of the request"
    except httptools.HttpParserError as e:
        return f"llhttp rejects it: {e}"
    if check.messages != 1 or check.bytes_after_end:
        return f"llhttp sees {check.messages} messages"
    if parser.get_method() != req.method or check.url != req.target:
        return "llhttp reads another request line"
    if check.headers != req.headers or check.body != req.body:
        return "llhttp reads other fields or another body"
    return None


class StrictRequestStream:
    """Incremental reader of a backend connection's bytes; raises StrictError at the first deviation."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.pos = 0

    def at_boundary(self) -> bool:
        return self.pos == len(self.buf)

    def feed(self, data: bytes) -> list[BackendRequest]:
        self.buf += data
        out = []
        for _ in range(len(self.buf) + 1):  # bounded: every pass consumes a whole request or stops
            req = self._one()
            if req is None:
                break
            out.append(req)
        if self.pos > 1 << 16:
            del self.buf[: self.pos]
            self.pos = 0
        return out

    def _one(self) -> BackendRequest | None:
        buf, start = self.buf, self.pos
        end = buf.find(b"\r\n\r\n", start)
        if end < 0:
            if len(buf) - start > MAX_HEAD:
                raise StrictError("head never ends")
            self._no_bare_cr_lf(bytes(buf[start:]), partial=True)
            return None
        head = bytes(buf[start:end])
        self._no_bare_cr_lf(head)
        lines = head.split(b"\r\n")
        m = _REQUEST_LINE.fullmatch(lines[0])
        if m is None:
            raise StrictError(f"bad request line {lines[0][:100]!r}")
        method, target = m.group(1), m.group(2)
        headers: list[tuple[bytes, bytes]] = []
        for line in lines[1:]:
            f = _FIELD_LINE.fullmatch(line)
            if f is None:
                raise StrictError(f"bad field line {line[:100]!r}")
            headers.append((f.group(1), f.group(2)))
        lower = [(k.lower(), v) for k, v in headers]
        hosts = [v for k, v in lower if k == b"host"]
        if len(hosts) != 1 or _HOST.fullmatch(hosts[0]) is None:
            raise StrictError(f"Host fields {hosts!r}")
        cls = [v for k, v in lower if k == b"content-length"]
        tes = [v for k, v in lower if k == b"transfer-encoding"]
        if len(cls) > 1 or len(tes) > 1 or (cls and tes):
            raise StrictError(f"framing fields CL={cls!r} TE={tes!r}")
        if tes and tes[0] != b"chunked":
            raise StrictError(f"Transfer-Encoding {tes[0]!r}")
        if cls and re.fullmatch(rb"0|[1-9][0-9]*", cls[0]) is None:
            raise StrictError(f"Content-Length {cls[0]!r}")
        pos = end + 4
        if cls:
            n = int(cls[0])
            if len(buf) - pos < n:
                return None
            body = bytes(buf[pos : pos + n])
            pos += n
        elif tes:
            parts = []
            while True:
                nl = buf.find(b"\r\n", pos)
                if nl < 0:
                    if len(buf) - pos > 32:
                        raise StrictError("chunk-size line too long")
                    return None
                c = _CHUNK_LINE.fullmatch(bytes(buf[pos : nl + 2]))
                if c is None:
                    raise StrictError(f"bad chunk-size line {bytes(buf[pos : nl + 2])[:40]!r}")
                size = int(c.group(1), 16)
                pos = nl + 2
                if size == 0:
                    if len(buf) - pos < 2:
                        return None
                    if buf[pos : pos + 2] != b"\r\n":
                        raise StrictError("trailer section or garbage after the last chunk")
                    pos += 2
                    break
                if len(buf) - pos < size + 2:
                    return None
                if buf[pos + size : pos + size + 2] != b"\r\n":
                    raise StrictError("chunk data not followed by CRLF")
                parts.append(bytes(buf[pos : pos + size]))
                pos += size + 2
            body = b"".join(parts)
        else:
            body = b""
        req = BackendRequest(method, target, headers, body, bytes(buf[start:pos]))
        why = llhttp_agrees(req)
        if why is not None:
            raise StrictError(why)
        self.pos = pos
        return req

    @staticmethod
    def _no_bare_cr_lf(head: bytes, partial: bool = False) -> None:
        stripped = head.replace(b"\r\n", b"")
        if partial:
            stripped = stripped.rstrip(b"\r")  # a CRLF cut in two by the read
        if b"\r" in stripped or b"\n" in stripped:
            raise StrictError("bare CR or LF in a head")


class RecordingBackend(TcpBackend):
    """A raw HTTP/1.1 backend that records every byte and answers each strict-parsed request with 200.

    The answer body is the request target; targets starting with /slow are answered after a pause.
    """

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[BackendRequest] = []
        self.errors: list[str] = []
        self.streams: list[bytearray] = []
        self.partial = 0  # connections that ended inside a request (the gateway cut an upload)
        self._tasks: set[asyncio.Task[None]] = set()

    def targets(self) -> list[bytes]:
        return [r.target for r in self.requests]

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream = StrictRequestStream()
        raw = bytearray()
        self.streams.append(raw)
        while True:
            data = await reader.read(65536)
            if not data:
                break
            raw += data
            if len(raw) > 1 << 20:
                del raw[: -(1 << 16)]  # a long-lived connection keeps only its recent bytes
            try:
                reqs = stream.feed(data)
            except StrictError as e:
                self.errors.append(f"{e}; stream tail {bytes(raw[-300:])!r}")
                break
            for r in reqs:
                self.requests.append(r)
                if r.target.startswith(SLOW_PREFIX):
                    await asyncio.sleep(SLOW_DELAY_S)
                body = b"" if r.method == b"HEAD" else r.target
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(r.target), body))
                await writer.drain()
        if not stream.at_boundary():
            self.partial += 1


# ---- the client side --------------------------------------------------------------------------------


@dataclass
class Response(ByteFields):
    status: int
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""


class _ResponseCollector:
    def __init__(self) -> None:
        self.done: list[Response] = []
        self.current: Response | None = None
        self.parser = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        self.current = Response(0)

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.current is not None
        self.current.headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self.current is not None
        self.current.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        assert self.current is not None
        self.current.body += body

    def on_message_complete(self) -> None:
        assert self.current is not None
        self.done.append(self.current)
        self.current = None


@dataclass
class ClientResult:
    responses: list[Response]
    closed: bool
    malformed: str | None = None  # the gateway's bytes were not valid HTTP responses
    leftover: bool = False  # a response started but did not finish before the close / timeout


async def read_responses(
    reader: asyncio.StreamReader, count: int, wait_close: bool, timeout: float = 5.0
) -> ClientResult:
    """Parse responses with llhttp until `count` arrived (then, if `wait_close`, until EOF) or time is up."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    col = _ResponseCollector()
    closed = False
    malformed = None
    while loop.time() < deadline:
        if len(col.done) >= count and not wait_close:
            break
        try:
            data = await asyncio.wait_for(reader.read(65536), max(0.01, deadline - loop.time()))
        except TimeoutError:
            break
        except (ConnectionError, OSError):
            closed = True
            break
        if not data:
            closed = True
            break
        if malformed is not None:
            continue  # unparseable already: only see whether the gateway closes
        try:
            col.parser.feed_data(data)
        except httptools.HttpParserError as e:
            malformed = f"{e}: {data[:200]!r}"
            if not wait_close:
                break
    return ClientResult(col.done, closed, malformed, col.current is not None)


async def converse(
    port: int,
    send: Callable[[asyncio.StreamWriter, asyncio.Future[ClientResult]], Awaitable[None]],
    count: int,
    wait_close: bool,
    timeout: float = 5.0,
) -> ClientResult:
    """On a new connection, `send(writer, reading)` while `read_responses` reads the answers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    reading = asyncio.ensure_future(read_responses(reader, count, wait_close, timeout))
    try:
        await send(writer, reading)
        return await reading
    finally:
        reading.cancel()
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


async def play(
    port: int, segments: list[bytes], count: int, wait_close: bool, timeout: float = 5.0
) -> ClientResult:
    """Write `segments` (pausing between them) while reading responses, as a client would."""

    async def send(writer: asyncio.StreamWriter, reading: asyncio.Future[ClientResult]) -> None:
        for i, seg in enumerate(segments):
            if i:
                await asyncio.sleep(SEGMENT_PAUSE_S)
            if reading.done() or writer.is_closing():
                break  # answered and closed: the rest would only meet a reset
            writer.write(seg)
            with contextlib.suppress(ConnectionError, OSError):
                await writer.drain()

    return await converse(port, send, count, wait_close, timeout)


# ---- the fuzz harness (tests/fuzz/test_fuzz_requests.py and tests/fuzz/campaign.py) ------------------

SEEDS: list[bytes] = [
    b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n",
    b"GET /b?x=1 HTTP/1.1\r\nHost: t\r\nAccept: */*\r\nX-A: b\r\n\r\n",
    b"POST /c HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /d HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n3;x=y\r\nabc\r\n0\r\n\r\n",
    b"GET /e HTTP/1.1\r\nHost: t\r\n\r\nPOST /f HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc",
    b"GET /g HTTP/1.0\r\nHost: t\r\n\r\n",
    b"PUT /h HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 3\r\n\r\nabc",
    b"GET http://t/i HTTP/1.1\r\nHost: t\r\n\r\n",
    b"POST /j HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok",
    b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"DELETE /k HTTP/1.1\r\nHost: t\r\nConnection: keep-alive, X-H\r\nX-H: 1\r\n\r\n",
    b"POST /l HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\nX-T: 1\r\n\r\n"
    b"GET /m HTTP/1.1\r\nHost: t\r\n\r\n",
]

INSERTS: list[bytes] = [
    b"\r",
    b"\n",
    b"\r\n",
    b"\x00",
    b" ",
    b"\t",
    b":",
    b",",
    b";",
    b"\x7f",
    b"\xff",
    b"0",
    b"f",
    b"\r\n\r\n",
    b"\r\n ",
    b"Transfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: xchunked\r\n",
    b"Content-Length: 5\r\n",
    b"Content-Length: 0\r\n",
    b"Host: x\r\n",
    b"Connection: upgrade\r\nUpgrade: h2c\r\n",
    b"GET /second HTTP/1.1\r\nHost: t\r\n\r\n",
]

_op = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 16), st.integers(1, 255)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 16), st.sampled_from(INSERTS)),
    st.tuples(st.just("delete"), st.integers(0, 1 << 16), st.integers(1, 4)),
    st.tuples(st.just("dup_line"), st.integers(0, 64), st.just(0)),
    st.tuples(st.just("swap_lines"), st.integers(0, 64), st.integers(0, 64)),
)


def mutate(data: bytes, ops: list[tuple[str, int, object]]) -> bytes:
    buf = bytearray(data)
    for name, a, b in ops:
        if name == "flip" and buf:
            buf[a % len(buf)] ^= int(b)  # type: ignore[call-overload]
        elif name == "insert":
            pos = a % (len(buf) + 1)
            buf[pos:pos] = b  # type: ignore[call-overload]
        elif name == "delete" and buf:
            pos = a % len(buf)
            del buf[pos : pos + int(b)]  # type: ignore[call-overload]
        elif name in ("dup_line", "swap_lines"):
            lines = bytes(buf).split(b"\r\n")
            i = a % len(lines)
            if name == "dup_line":
                lines.insert(i, lines[i])
            else:
                j = int(b) % len(lines)  # type: ignore[call-overload]
                lines[i], lines[j] = lines[j], lines[i]
            buf = bytearray(b"\r\n".join(lines))
    return bytes(buf)


@st.composite
def chunked_request(draw: st.DrawFn) -> bytes:
    """A chunked POST with random chunk framing: sizes that may lie, odd hex, extensions, trailers."""
    parts = [b"POST /chunked HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"]
    for data in draw(st.lists(st.binary(max_size=24), max_size=4)):
        size = max(0, len(data) + draw(st.sampled_from([0, 0, 0, 0, 1, -1, 7])))
        fmt = draw(st.sampled_from([b"%x", b"%X", b"00%x", b"%x;e=1", b'%x;e="q"', b"%x ", b"%x\t", b"+%x"]))
        parts.append(fmt % size + draw(st.sampled_from([b"\r\n", b"\r\n", b"\n"])) + data + b"\r\n")
    parts.append(draw(st.sampled_from([b"0\r\n\r\n", b"0\r\nX-T: 1\r\n\r\n", b"0\r\n", b"", b"0;z\r\n\r\n"])))
    return b"".join(parts)


@st.composite
def mutated_requests(draw: st.DrawFn) -> list[bytes]:
    """The client's bytes, as the reads they arrive in."""
    seed = draw(st.one_of(st.sampled_from(SEEDS), chunked_request()))
    data = mutate(seed, draw(st.lists(_op, max_size=5)))
    cuts = sorted(draw(st.lists(st.integers(0, max(0, len(data))), max_size=2)))
    bounds = [0, *cuts, len(data)]
    return [data[x:y] for x, y in itertools.pairwise(bounds) if y > x] or [b""]


# ---- the oracle ------------------------------------------------------------------------------------


class _Targets:
    def __init__(self) -> None:
        self.targets: list[bytes] = []
        self.url = b""

    def on_message_begin(self) -> None:
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_headers_complete(self) -> None:
        url = self.url
        if url[:7].lower() == b"http://" or url[:8].lower() == b"https://":
            rest = url[url.find(b"//") + 2 :]
            slash = rest.find(b"/")
            url = rest[slash:] if slash >= 0 else b"/"
        self.targets.append(url)


def client_targets(data: bytes) -> list[bytes]:
    """The request targets llhttp reads from the client's bytes (up to an error or an upgrade)."""
    t = _Targets()
    with contextlib.suppress(httptools.HttpParserError, httptools.HttpParserUpgrade):
        httptools.HttpRequestParser(t).feed_data(data)
    return t.targets


def is_subsequence(small: list[bytes], big: list[bytes]) -> bool:
    it = iter(big)
    return all(any(x == y for y in it) for x in small)


async def play_half_closed(port: int, segments: list[bytes], timeout: float = 5.0) -> ClientResult:
    """Write the reads (a short pause between), half-close, and read responses until the gateway closes."""

    async def send(writer: asyncio.StreamWriter, _reading: asyncio.Future[ClientResult]) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            for i, seg in enumerate(segments):
                if i:
                    await asyncio.sleep(0.002)
                writer.write(seg)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()

    return await converse(port, send, 1 << 30, True, timeout)


@dataclass
class Outcome:
    statuses: list[int]
    forwarded: int


class FuzzHarness:
    """A gateway before a RecordingBackend on a private event loop; `run(segments)` checks one example."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.backend = RecordingBackend()
        self.app: App | None = None
        self.examples = 0
        self.forwarded = 0
        self.statuses: dict[int, int] = {}

    def __enter__(self) -> FuzzHarness:
        self.loop.run_until_complete(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.run_until_complete(self._stop())
        self.loop.close()

    async def _start(self) -> None:
        await self.backend.start()
        limits = "{header_read_timeout: 2s, keepalive_timeout: 5s}"
        self.app = App(load_text(gateway_config(self.backend.address, limits), "<fuzz>"))
        await self.app.start()

    async def _stop(self) -> None:
        if self.app is not None:
            await self.app.stop()
        await self.backend.stop()

    def run(self, segments: list[bytes]) -> Outcome:
        return self.loop.run_until_complete(self.check(segments))

    async def check(self, segments: list[bytes]) -> Outcome:
        assert self.app is not None
        port = self.app.proxy.port
        b = self.backend
        del b.requests[:-1]  # bounded memory over long campaigns
        b.streams.clear()
        n0, e0 = len(b.requests), len(b.errors)
        data = b"".join(segments)
        result = await play_half_closed(port, segments)
        finals = [r for r in result.responses if r.status >= 200]
        head_request = b"HEAD" in data  # llhttp cannot frame responses to HEAD without being told
        if not head_request:
            assert result.malformed is None, f"malformed response: {result.malformed}"
            assert not result.leftover, "a response was cut"
        assert result.closed, "the gateway did not close after the client's half-close"
        for r in result.responses:
            assert 100 <= r.status <= 599, r.status
            assert b"Traceback" not in r.body
        # The backend: nothing it could not parse exactly like llhttp, nothing the client did not send.
        assert b.errors[e0:] == [], b.errors[e0:]
        forwarded = [r.target for r in b.requests[n0:]]
        assert is_subsequence(forwarded, client_targets(data)), (forwarded, client_targets(data))
        ok = [r.body for r in finals if r.status == 200]
        if not head_request:
            assert is_subsequence(ok, forwarded), (ok, forwarded)
            assert len(forwarded) - len(ok) <= 1, (forwarded, [r.status for r in finals])
        # The gateway is alive and its pooled backend connections are in sync.
        canary = await play(port, [b"GET /canary HTTP/1.1\r\nHost: t\r\n\r\n"], 1, False)
        assert [(r.status, r.body) for r in canary.responses] == [(200, b"/canary")], canary
        assert b.errors == [] and b.requests[-1].target == b"/canary"
        self.examples += 1
        self.forwarded += len(forwarded)
        for r in finals:
            self.statuses[r.status] = self.statuses.get(r.status, 0) + 1
        return Outcome([r.status for r in finals], len(forwarded))
