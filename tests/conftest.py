"""Shared fixtures: uvloop for every async test, real aiohttp backends and in-process gateways on port 0."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop
from aiohttp import web

import gateway
from gateway.config.parse import load_text
from gateway.process.app import App

# Listeners of an in-process test gateway: an ephemeral proxy port, no health or admin port.
HEADER = "listen: 127.0.0.1:0\nhealth_listen: null\nadmin_listen: null\n"


def stale_compiled_modules() -> list[str]:
    """Sources edited after their in-place compiled module was built (setup.py): the .so would be
    imported instead of the edited code, and the tests would pass or fail on old code."""
    root = Path(gateway.__file__).parent
    stale = []
    for so in root.rglob("*.so"):
        source = so.with_name(so.name.split(".", 1)[0] + ".py")
        if source.exists() and source.stat().st_mtime > so.stat().st_mtime:
            stale.append(str(source.relative_to(root.parent)))
    return stale


def pytest_configure(config: pytest.Config) -> None:
    stale = stale_compiled_modules()
    if stale:
        pytest.exit(
            f"compiled modules are older than their source ({', '.join(stale)}): rebuild with "
            "`.venv/bin/pip install -e .` (scripts/test does), or GATEWAY_PURE=1 for pure Python",
            returncode=2,
        )
    # The gateway runs on uvloop in production; the tests do too.
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


class Backend:
    """A real aiohttp server on 127.0.0.1:<free port>, counting the requests it received."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.runner: web.AppRunner | None = None
        self.port = 0
        self.requests: list[web.Request] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> None:
        self.runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port, reuse_address=True)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

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


@pytest.fixture
async def backend_factory() -> AsyncIterator[Callable[..., Awaitable[Backend]]]:
    started: list[Backend] = []

    async def make(app: web.Application | None = None, port: int = 0, name: str = "backend") -> Backend:
        b = Backend(app if app is not None else default_backend_app(name))
        await b.start(port)
        started.append(b)
        return b

    yield make
    for b in started:
        await b.stop()


@pytest.fixture
async def backend(backend_factory: Callable[..., Awaitable[Backend]]) -> Backend:
    return await backend_factory()


GATEWAY_HEADER = """
listen: 127.0.0.1:0
health_listen: 127.0.0.1:0
admin_listen: 127.0.0.1:0
"""


@pytest.fixture
async def gateway_factory() -> AsyncIterator[Callable[[str], Awaitable[App]]]:
    """Start an in-process gateway from YAML text (listeners on port 0 unless the text sets them)."""
    apps: list[App] = []

    async def make(yaml_text: str, path: str | None = None) -> App:
        text = yaml_text if "listen:" in yaml_text else GATEWAY_HEADER + yaml_text
        config = load_text(text, "<test>")
        if "isolation" not in text:
            # In-process tests answer health from a thread (a process per test would cost ~0.2 s
            # each); the process mode has its own tests.
            config = dataclasses.replace(
                config, health=dataclasses.replace(config.health, isolation="thread")
            )
        app = App(config, path)
        await app.start()
        apps.append(app)
        return app

    yield make
    for app in apps:
        await app.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proxy_url(app: App, path: str = "/") -> str:
    return f"http://127.0.0.1:{app.proxy.port}{path}"


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
