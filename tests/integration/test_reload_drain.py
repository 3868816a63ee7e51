"""Hot reload and graceful drain, end to end.

- 20 reloads (targets added/removed, timeouts, a rate limit, a route) while 8 keep-alive clients
  run: every response is 200 and no client connection is closed or reopened;
- target and policy state of unchanged parts survives a reload (ejection, health, circuit, the
  operator's null switch, rate-limit tokens); a removed target is drained, then closed;
- an invalid file is rejected with file:line errors and the old config keeps serving;
- SIGTERM: /readyz 503 at once, in-flight requests finish, responses carry `Connection: close`,
  new connections are refused after `drain_delay`, exit 0 within `drain_timeout`;
- `gateway reload` (pid file, admin API, invalid file) and `workers: 2` reload + stop.

The clients here are raw HTTP/1.1 connections on purpose: aiohttp's client silently retries an
idempotent request once when a reused connection dies, which would hide exactly the failures
these tests are about. Every loop is bounded in count and time; every process is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from gateway.observe import stats
from gateway.process.app import App
from tests.helpers import ROOT, Backend, free_port, gateway_cli, gateway_command, wait_for

NET_ERRORS = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError)


# ---- a raw keep-alive HTTP/1.1 client (no pooling, no retries: every failure is seen) ---------------
@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def closes(self) -> bool:
        return self.headers.get("connection", "").lower() == "close"


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, timeout: float = 5.0) -> Conn:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
        return cls(reader, writer)

    def send(self, path: str, close: bool = False) -> None:
        extra = "Connection: close\r\n" if close else ""
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: gw.test\r\n{extra}\r\n".encode())

    async def read_response(self, timeout: float = 10.0) -> Response:
        return await asyncio.wait_for(self._read(), timeout)

    async def _read(self) -> Response:
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                parts.append(await self.reader.readexactly(size + 2))
                if size == 0:
                    break
            body = b"".join(p[:-2] for p in parts)
        else:
            body = await self.reader.read()
        return Response(status, headers, body)

    async def request(self, path: str, close: bool = False, timeout: float = 10.0) -> Response:
        self.send(path, close)
        return await self.read_response(timeout)

    async def at_eof(self, timeout: float = 5.0) -> bool:
        """True once the server closed the connection (nothing more is sent on it)."""
        try:
            data = await asyncio.wait_for(self.reader.read(1), timeout)
        except (OSError, TimeoutError):
            return False
        return data == b""

    def close(self) -> None:
        self.writer.close()


async def get(port: int, path: str) -> Response:
    conn = await Conn.open(port)
    try:
        return await conn.request(path, close=True)
    finally:
        conn.close()


async def refused(port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1.0)
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        # The handshake landed in the listener's queue just as the listener closed: reset, not yet
        # refused. The caller polls again and sees the refusal.
        return False
    writer.close()
    return False


# ---- subprocess helpers -------------------------------------------------------------------------------
def spawn(cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            gateway_command("run", "--config", str(cfg)),
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def wait_ready(proc: subprocess.Popen[bytes], health: int, log: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"gateway exited with {proc.returncode}:\n{log.read_text()}"
        with contextlib.suppress(*NET_ERRORS):
            if (await get(health, "/readyz")).status == 200:
                return
        await asyncio.sleep(0.05)
    raise AssertionError(f"gateway not ready within {timeout}s:\n{log.read_text()}")


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False).stdout
    return [int(p) for p in out.split()]


def kill(proc: subprocess.Popen[bytes], workers: list[int] | None = None) -> None:
    """Kill what the test started (the gateway and, for `workers: N`, its known worker pids)."""
    for pid in workers or []:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


async def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return proc.poll()


# ---- 20 reloads under load ----------------------------------------------------------------------------
def load_config(
    a: str, b: str | None, response: str = "5s", rate: int = 100000, extra_route: bool = False
) -> str:
    targets = "".join(f"      - address: {t}\n" for t in (a, b) if t is not None)
    extra = "  - name: extra\n    match: {path_prefix: /extra}\n    upstream: api\n" if extra_route else ""
    return f"""\
listen: 127.0.0.1:0
health_listen: null
admin_listen: null
upstreams:
  api:
    keepalive: 32
    targets:
{targets}routes:
{extra}  - name: all
    match: {{path_prefix: /}}
    upstream: api
    timeouts: {{response: {response}}}
    rate_limit: {{rate: {rate}, per: 1s, key: route, name: never}}
"""


@dataclass
class Load:
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    closed_by_server: int = 0
    connections: int = 0
    by_backend: dict[str, int] = field(default_factory=dict)


async def keepalive_client(
    port: int, paths: list[str], stop: asyncio.Event, load: Load, max_requests: int = 20000
) -> None:
    """One client on one keep-alive connection until `stop` (reconnects are counted, never hidden)."""
    conn: Conn | None = None
    try:
        for n in range(max_requests):
            if stop.is_set():
                return
            if conn is None:
                conn = await Conn.open(port)
                load.connections += 1
            try:
                r = await conn.request(paths[n % len(paths)])
            except NET_ERRORS as e:
                load.failed.append(repr(e))
                conn.close()
                conn = None
                continue
            if r.status != 200:
                load.failed.append(f"{r.status} {r.body[:80]!r}")
            else:
                load.ok += 1
                name = r.body.split(b'"name": "', 1)[-1].split(b'"', 1)[0].decode()
                load.by_backend[name] = load.by_backend.get(name, 0) + 1
            if r.closes:
                load.closed_by_server += 1
                conn.close()
                conn = None
    finally:
        if conn is not None:
            conn.close()


async def test_20_reloads_under_load_fail_nothing_and_keep_connections(
    gateway_factory: Callable[..., Awaitable[App]],
    backend_factory: Callable[..., Awaitable[Backend]],
    tmp_path: Path,
) -> None:
    a = await backend_factory(name="a")
    b = await backend_factory(name="b")
    variants = [
        load_config(a.address, b.address),  # both targets
        load_config(a.address, None),  # remove b
        load_config(a.address, b.address, response="7s"),  # add b back; route timeout changed
        load_config(a.address, b.address, response="7s", rate=200000),  # rate limit changed
        load_config(a.address, b.address, response="7s", rate=200000, extra_route=True),  # route added
    ]
    path = tmp_path / "gateway.yaml"
    path.write_text(variants[0])
    app = await gateway_factory(variants[0], path=str(path))
    port = app.proxy.port
    state_a = app.proxy.runtime.pools["api"].target(a.address)
    assert state_a is not None
    opened_a = state_a.stats.connections_opened
    accepted = stats.GLOBAL.connections_accepted

    load = Load()
    stop = asyncio.Event()
    clients = [
        asyncio.create_task(keepalive_client(port, ["/", f"/extra/{i}"], stop, load)) for i in range(8)
    ]
    try:
        for i in range(20):
            target = load.ok + len(load.failed) + 100  # load runs between every two reloads
            await wait_for(lambda t=target: load.ok + len(load.failed) >= t, timeout=10)
            path.write_text(variants[(i + 1) % len(variants)])
            assert app.reload() == (True, [])
        await wait_for(lambda t=load.ok + 40: load.ok >= t, timeout=10)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*clients), 15)

    assert load.failed == []
    assert load.ok >= 20 * 100
    # Keep-alive held: 8 connections opened once, none closed under the clients.
    assert load.connections == 8 and load.closed_by_server == 0
    assert stats.GLOBAL.connections_accepted - accepted == 8
    assert set(load.by_backend) == {"a", "b"}
    # The unchanged target is the same object with the same pooled upstream connections.
    pool = app.proxy.runtime.pools["api"]
    assert pool.target(a.address) is state_a
    assert state_a.stats.connections_opened - opened_a <= 8
    assert app.proxy.runtime.routes[0].name == "all" and stats.GLOBAL.reloads >= 20


# ---- state carried over a reload ----------------------------------------------------------------------
def state_config(a: str, b: str, c: str, v2: bool = False, rate: int = 3) -> str:
    rm_target = a if v2 else c
    new_route = "  - name: new\n    match: {path_prefix: /new}\n    upstream: null\n" if v2 else ""
    return f"""\
listen: 127.0.0.1:0
health_listen: null
admin_listen: 127.0.0.1:0
upstreams:
  api:
    targets: [{{address: "{a}"}}, {{address: "{b}"}}]
    passive: {{consecutive_failures: 2, ejection_time: 60s}}
  hc:
    targets: [{{address: "{a}"}}, {{address: "{b}"}}]
    health_check: {{path: /hz, interval: 50ms, timeout: 1s, healthy_threshold: 1, unhealthy_threshold: 1}}
  cb:
    targets: [{{address: "{a}"}}]
    circuit_breaker: {{min_requests: 3, failure_ratio: 0.5, window: 30s, open_for: 60s}}
  side:
    targets: [{{address: "{a}"}}]
  lim:
    targets: [{{address: "{a}"}}]
  rm:
    targets: [{{address: "{rm_target}"}}]
routes:
{new_route}  - name: hc
    match: {{path_prefix: /hc}}
    upstream: hc
  - name: cb
    match: {{path_prefix: /status}}
    upstream: cb
  - name: side
    match: {{path_prefix: /side}}
    upstream: side
  - name: lim
    match: {{path_prefix: /limited}}
    upstream: lim
    rate_limit: {{rate: {rate}, per: 60s, key: route, name: kept}}
  - name: rm
    match: {{path_prefix: /sleep}}
    upstream: rm
  - name: api
    match: {{path_prefix: /}}
    upstream: api
    timeouts: {{response: {"6s" if v2 else "5s"}}}
"""


def failing_app() -> web.Application:
    """A backend answering 500 to everything, recording the paths it was asked for."""

    async def fail(request: web.Request) -> web.Response:
        request.app["paths"].append(request.path)
        return web.Response(status=500, text="broken\n")

    app = web.Application()
    app["paths"] = []
    app.router.add_route("*", "/{tail:.*}", fail)
    return app


async def test_reload_carries_state_over_and_drains_removed_target(
    gateway_factory: Callable[..., Awaitable[App]],
    backend_factory: Callable[..., Awaitable[Backend]],
    tmp_path: Path,
) -> None:
    a = await backend_factory(name="a")
    b = await backend_factory(failing_app())
    c = await backend_factory(name="c")
    b_paths: list[str] = b.app["paths"]

    def a_hits(prefix: str) -> int:
        return sum(r.path.startswith(prefix) for r in a.app["requests"])

    def b_traffic() -> int:
        return sum(p != "/hz" for p in b_paths)

    path = tmp_path / "gateway.yaml"
    text = state_config(a.address, b.address, c.address)
    path.write_text(text)
    app = await gateway_factory(text, path=str(path))
    port = app.proxy.port
    pools = app.proxy.runtime.pools

    # Passive ejection of b from real 5xx traffic.
    for _ in range(10):
        if pools["api"].target(b.address).ejected:  # type: ignore[union-attr]
            break
        assert (await get(port, "/x")).status in (200, 500)
    assert pools["api"].target(b.address).ejected  # type: ignore[union-attr]
    # Active health check marks b unhealthy.
    await wait_for(lambda: not pools["hc"].target(b.address).healthy, timeout=5)  # type: ignore[union-attr]
    # Circuit opens after 3 failures out of 3.
    for _ in range(3):
        assert (await get(port, "/status/500")).status == 500
    r = await get(port, "/status/500")
    assert r.status == 503 and int(r.headers["retry-after"]) > 1
    assert a_hits("/status") == 3
    # The operator's null switch.
    conn = await Conn.open(app.admin.port)  # type: ignore[attr-defined]
    conn.writer.write(b"POST /admin/upstreams/side/null HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
    assert (await conn.read_response()).status == 200
    conn.close()
    assert (await get(port, "/side")).status == 503
    # Two of three tokens of the route-wide bucket taken.
    for _ in range(2):
        assert (await get(port, "/limited")).status == 200
    # A slow request in flight to c, the target the reload removes.
    slow = await Conn.open(port)
    slow.send("/sleep/0.5")
    await wait_for(lambda: any(r.path.startswith("/sleep") for r in c.app["requests"]), timeout=5)
    old_c = pools["rm"].target(c.address)
    old_api_b = pools["api"].target(b.address)
    old_circuit = pools["cb"].circuit
    b_before = b_traffic()

    path.write_text(state_config(a.address, b.address, c.address, v2=True))
    assert app.reload() == (True, [])
    new = app.proxy.runtime.pools
    assert new is not pools
    # Nothing awaited since the reload: what is seen now was carried over, not recomputed.
    assert new["api"].target(b.address) is old_api_b and old_api_b.ejected  # type: ignore[union-attr]
    assert not new["hc"].target(b.address).healthy  # type: ignore[union-attr]
    assert new["cb"].circuit is old_circuit and old_circuit.state == "open"  # type: ignore[union-attr]
    assert new["side"].forced_null
    assert old_c is not None and old_c.drained and new["rm"].target(c.address) is None

    # The in-flight request to the removed target completes; its connection is closed after.
    r = await slow.read_response()
    assert r.status == 200 and r.body == b"slept\n"
    slow.close()
    assert old_c.in_flight == 0 and not old_c.idle
    assert c.runner is not None
    server = c.runner.server
    assert server is not None
    await wait_for(lambda: not server.connections, timeout=5)
    assert (await get(port, "/sleep/0.01")).status == 200  # now to a
    assert sum(r.path.startswith("/sleep") for r in c.app["requests"]) == 1

    for _ in range(6):
        assert (await get(port, "/y")).status == 200  # b stays ejected
        assert (await get(port, "/hc/y")).status == 200  # b stays unhealthy
    assert b_traffic() == b_before
    r = await get(port, "/status/500")
    assert r.status == 503 and a_hits("/status") == 3  # the circuit stays open
    assert (await get(port, "/side")).status == 503  # the null switch holds
    assert (await get(port, "/limited")).status == 200  # the third token: the bucket kept its state
    assert (await get(port, "/limited")).status == 429
    assert (await get(port, "/new/z")).status == 503  # the added (null) route answers

    # A changed limit starts a fresh bucket.
    path.write_text(state_config(a.address, b.address, c.address, v2=True, rate=4))
    assert app.reload() == (True, [])
    assert (await get(port, "/limited")).status == 200


async def test_invalid_file_is_rejected_and_old_config_keeps_serving(
    gateway_factory: Callable[..., Awaitable[App]], backend: Backend, tmp_path: Path
) -> None:
    text = load_config(backend.address, None)
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    app = await gateway_factory(text, path=str(path))
    config, runtime = app.config, app.proxy.runtime
    conn = await Conn.open(app.proxy.port)
    assert (await conn.request("/before")).status == 200
    failures = stats.GLOBAL.reload_failures

    broken = text.replace("    upstream: api\n", "    upstream: nosuch\n")
    line = broken.splitlines().index("    upstream: nosuch") + 1
    path.write_text(broken)
    ok, errors = app.reload()
    assert not ok
    assert any(e.startswith(f"{path}:{line}:") and "nosuch" in e for e in errors), errors
    path.write_text(text.replace("per: 1s", "per: soon"))
    ok, errors = app.reload()
    assert not ok and any(e.startswith(f"{path}:") and "per" in e for e in errors), errors
    path.write_text("routes: [\n")
    ok, errors = app.reload()
    assert not ok and any(e.startswith(f"{path}:") for e in errors), errors

    assert app.config is config and app.proxy.runtime is runtime
    assert stats.GLOBAL.reload_failures - failures == 3
    r = await conn.request("/after")  # the same keep-alive connection, still served
    assert r.status == 200 and not r.closes
    conn.close()
    path.write_text(text)
    assert app.reload() == (True, [])


# ---- SIGTERM: graceful drain of a subprocess gateway -------------------------------------------------------
def drain_config(port: int, health: int, backend: str, extra: str = "") -> str:
    return f"""\
listen: 127.0.0.1:{port}
health_listen: 127.0.0.1:{health}
admin_listen: null
drain_delay: 300ms
drain_timeout: 5s
{extra}upstreams:
  api:
    targets: [{{address: "{backend}"}}]
routes:
  - name: api
    match: {{path_prefix: /}}
    upstream: api
"""


async def test_sigterm_drains_in_flight_requests(backend: Backend, tmp_path: Path) -> None:
    port, health = free_port(), free_port()
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(drain_config(port, health, backend.address))
    log = tmp_path / "gateway.observe.log"
    proc = spawn(cfg, log)
    wave1: list[Conn] = []
    wave2: list[Conn] = []
    idle: Conn | None = None
    try:
        await wait_ready(proc, health, log)
        idle = await Conn.open(port)
        r = await idle.request("/warm")
        assert r.status == 200 and not r.closes
        for _ in range(16):
            conn = await Conn.open(port)
            conn.send("/sleep/0.2")
            wave1.append(conn)
        await wait_for(lambda: sum(r.path == "/sleep/0.2" for r in backend.app["requests"]) == 16, timeout=5)

        loop = asyncio.get_running_loop()
        t0 = loop.time()
        proc.send_signal(signal.SIGTERM)
        # Readiness turns 503 at once; liveness stays 200.
        for _ in range(200):
            if (await get(health, "/readyz")).status == 503:
                break
            await asyncio.sleep(0.005)
        t_unready = loop.time() - t0
        assert t_unready < 0.15, t_unready
        # New connections are still accepted during the delay; these requests outlast it.
        for _ in range(8):
            conn = await Conn.open(port)
            conn.send("/sleep/1.0")
            wave2.append(conn)
        # During the delay the idle keep-alive client is answered, and told to go away.
        sent_at = loop.time() - t0
        r = await idle.request("/during-drain")
        assert sent_at < 0.3, sent_at
        assert r.status == 200 and r.closes, r.headers
        assert await idle.at_eof()
        assert (await get(health, "/readyz")).body == b"draining\n"
        assert (await get(health, "/healthz")).status == 200
        # After the delay: new connections are refused while the slow requests are still running.
        t_refused = None
        for _ in range(200):
            if await refused(port):
                t_refused = loop.time() - t0
                break
            await asyncio.sleep(0.01)
        assert t_refused is not None and 0.3 <= t_refused < 1.0, t_refused
        assert proc.poll() is None
        # Every in-flight request completes with 200 (those answered after draining began: close).
        first = await asyncio.gather(*(c.read_response() for c in wave1))
        assert [x.status for x in first] == [200] * 16
        second = await asyncio.gather(*(c.read_response() for c in wave2))
        assert [x.status for x in second] == [200] * 8
        assert all(x.closes and x.body == b"slept\n" for x in second)
        rc = await wait_exit(proc, 5.3)
        elapsed = loop.time() - t0
        assert rc == 0, log.read_text()
        assert 1.0 <= elapsed < 5.3, elapsed  # waited for the slow requests, well within the timeout
        assert "Traceback" not in log.read_text()
    finally:
        for c in [*wave1, *wave2, *([idle] if idle else [])]:
            c.close()
        kill(proc)


async def test_sigterm_with_busy_keepalive_clients_loses_no_request(backend: Backend, tmp_path: Path) -> None:
    """8 clients reuse their connections back to back; each stops when told `Connection: close`
    (as a load balancer moves to another instance). SIGTERM must not close a connection under a
    request: every request sent is answered, every client is told to leave. Half of the clients get
    proxied answers (200), half local ones (a null route: 503), which must say `close` as well."""
    port, health = free_port(), free_port()
    cfg = tmp_path / "gateway.yaml"
    null_route = "routes:\n  - {name: maint, match: {path_prefix: /off}, upstream: null}\n"
    cfg.write_text(drain_config(port, health, backend.address).replace("routes:\n", null_route))
    log = tmp_path / "gateway.observe.log"
    proc = spawn(cfg, log)
    ok = [0] * 8
    told_to_leave = [False] * 8
    failed: list[str] = []

    async def client(i: int) -> None:
        path, expected = ("/busy", 200) if i % 2 == 0 else ("/off", 503)
        conn = await Conn.open(port)
        try:
            for _ in range(20000):
                try:
                    r = await conn.request(path)
                except NET_ERRORS as e:
                    failed.append(f"client {i} after {ok[i]} ok: {e!r}")
                    return
                if r.status != expected:
                    failed.append(f"client {i}: {r.status}")
                    return
                ok[i] += 1
                if r.closes:
                    told_to_leave[i] = True
                    return
        finally:
            conn.close()

    try:
        await wait_ready(proc, health, log)
        tasks = [asyncio.create_task(client(i)) for i in range(8)]
        await wait_for(lambda: min(ok) >= 20, timeout=10)
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        assert failed == [], failed
        assert all(told_to_leave), ok
        assert await wait_exit(proc, 6) == 0, log.read_text()
    finally:
        kill(proc)


# ---- `gateway reload` from the command line ------------------------------------------------------------
async def test_gateway_reload_command(backend: Backend, tmp_path: Path) -> None:
    port, health, admin = free_port(), free_port(), free_port()
    pid_file = tmp_path / "gateway.pid"
    cfg = tmp_path / "gateway.yaml"
    maint = "  - name: maint\n    match: {path_prefix: /maint}\n    upstream: null\n"

    def text(pid: bool, route: str = "") -> str:
        t = drain_config(port, health, backend.address, f"pid_file: {pid_file}\n" if pid else "")
        return t.replace("admin_listen: null", f"admin_listen: 127.0.0.1:{admin}").replace(
            "routes:\n", "routes:\n" + route
        )

    cfg.write_text(text(pid=True))
    log = tmp_path / "gateway.observe.log"
    proc = spawn(cfg, log)
    try:
        await wait_ready(proc, health, log)
        await wait_for(lambda: pid_file.exists() and pid_file.read_text().strip() == str(proc.pid))
        assert (await get(port, "/maint/x")).status == 200

        # pid_file set: SIGHUP.
        cfg.write_text(text(pid=True, route=maint))
        p = gateway_cli("reload", "--config", str(cfg))
        assert p.returncode == 0 and f"sent SIGHUP to {proc.pid}" in p.stdout, p.stdout + p.stderr
        for _ in range(100):
            if (await get(port, "/maint/x")).status == 503:
                break
            await asyncio.sleep(0.05)
        assert (await get(port, "/maint/x")).status == 503  # the new null route answers
        assert (await get(port, "/other")).status == 200

        # No pid_file, admin_listen set: POST /admin/reload (synchronous: applied when it returns).
        cfg.write_text(text(pid=False, route=maint.replace("/maint", "/gone")))
        p = gateway_cli("reload", "-c", str(cfg))
        assert p.returncode == 0 and '"ok":true' in p.stdout.replace(" ", ""), p.stdout + p.stderr
        assert (await get(port, "/gone/x")).status == 503
        assert (await get(port, "/maint/x")).status == 200

        # An invalid file: reported with file:line, nothing sent, exit non-zero.
        cfg.write_text(text(pid=False).replace("upstream: api", "upstream: nosuch"))
        p = gateway_cli("reload", "-c", str(cfg))
        assert p.returncode != 0
        assert f"{cfg}:" in p.stderr and "nosuch" in p.stderr and "not reloading" in p.stderr
        assert (await get(port, "/gone/x")).status == 503  # still the last good config

        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc, 6) == 0, log.read_text()
        assert log.read_text().count('"event":"reloaded"') == 2
    finally:
        kill(proc)


async def test_workers_reload_and_stop(backend: Backend, tmp_path: Path) -> None:
    port, health = free_port(), free_port()
    cfg = tmp_path / "gateway.yaml"
    base = drain_config(port, health, backend.address, "workers: 2\n")
    cfg.write_text(base)
    log = tmp_path / "gateway.observe.log"
    proc = spawn(cfg, log)
    workers: list[int] = []
    try:
        await wait_ready(proc, health, log)
        workers = children(proc.pid)
        assert len(workers) == 2
        cfg.write_text(
            base.replace("routes:\n", "routes:\n  - {name: m, match: {path: /m}, upstream: null}\n")
        )
        proc.send_signal(signal.SIGHUP)
        # Fresh connections (SO_REUSEPORT spreads them): every worker must answer the new route.
        deadline = time.monotonic() + 15
        while True:
            statuses = [(await get(port, "/m")).status for _ in range(16)]
            if statuses == [503] * 16:
                break
            assert time.monotonic() < deadline, statuses
            await asyncio.sleep(0.05)
        assert (await get(port, "/other")).status == 200
        assert sorted(children(proc.pid)) == sorted(workers)  # reloaded, not restarted
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc, 10) == 0, log.read_text()
        assert "Traceback" not in log.read_text()
    finally:
        kill(proc, workers)
