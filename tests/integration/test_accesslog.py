"""Access log: one JSON line per request, sampling, reopen after rotation, shed reasons, reload."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.process.app import App
from tests.helpers import (
    HEADER,
    Backend,
    GatewayFactory,
    free_port,
    gateway_command,
    proxy_url,
    stop_process,
    wait_for,
)

FIELDS = {
    "time",
    "client",
    "method",
    "path",
    "route",
    "upstream",
    "target",
    "status",
    "bytes",
    "duration_s",
    "upstream_duration_s",
    "shed_reason",
    "cache",
}


def config(address: str, log_path: Path | str, sample: float = 1.0, extra_routes: str = "") -> str:
    return (
        HEADER
        + f"access_log: {{enabled: true, path: '{log_path}', sample: {sample}}}\n"
        + f"upstreams:\n  api:\n    targets:\n      - address: {address}\n"
        + "routes:\n"
        + extra_routes
        + "  - name: api\n    upstream: api\n"
    )


def lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


async def get(app: App, path: str, method: str = "GET", data: bytes | None = None) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, proxy_url(app, path), data=data) as resp,
    ):
        await resp.read()
        return resp.status


async def test_one_json_line_per_request_with_every_field(
    backend: Backend, gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    log_path = tmp_path / "access.log"
    app = await gateway_factory(config(backend.address, log_path))
    before = time.time()
    assert await get(app, "/a?x=1") == 200
    assert await get(app, "/b", "POST", b"x" * 100) == 200
    assert await get(app, "/status/404") == 404
    # No explicit flush: the 0.5 s timer writes the batch.
    await wait_for(lambda: len(lines(log_path)) == 3)
    records = lines(log_path)
    assert all(set(r) == FIELDS for r in records)
    a, b, c = records
    assert (a["method"], a["path"], a["status"]) == ("GET", "/a?x=1", 200)
    assert (b["method"], b["path"], b["status"]) == ("POST", "/b", 200)
    assert (c["path"], c["status"]) == ("/status/404", 404)
    for r in records:
        assert r["client"] == "127.0.0.1"
        assert r["route"] == "api" and r["upstream"] == "api" and r["target"] == backend.address
        assert r["shed_reason"] is None
        assert before - 1 <= r["time"] <= time.time() + 1
        assert r["time"] == round(r["time"], 3)
        assert 0 <= r["upstream_duration_s"] <= r["duration_s"] < 5
    assert a["bytes"] > 0  # the echo body
    assert c["bytes"] == len(b"status\n")


async def test_sampling(backend: Backend, gateway_factory: GatewayFactory, tmp_path: Path) -> None:
    none_path, half_path = tmp_path / "none.log", tmp_path / "half.log"
    app0 = await gateway_factory(config(backend.address, none_path, sample=0.0))
    app5 = await gateway_factory(config(backend.address, half_path, sample=0.5))
    for _ in range(10):
        assert await get(app0, "/") == 200
        assert await get(app5, "/") == 200
    assert app0.access_log is not None and app5.access_log is not None
    app0.access_log.flush()
    app5.access_log.flush()
    assert none_path.exists() and none_path.read_bytes() == b""
    assert len(lines(half_path)) == 5  # counter-based: exactly half


async def test_sampling_is_even_and_exact(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from gateway.config.model import AccessLogConfig
    from gateway.observe.accesslog import AccessLog

    loop = asyncio.get_running_loop()
    client = SimpleNamespace(peer=b"127.0.0.1")
    for sample, requests, kept in (
        (0.1, 100, 10),
        (0.25, 40, 10),
        (1 / 3, 30, 10),
        (0.0, 50, 0),
        (1.0, 7, 7),
    ):
        path = tmp_path / f"s{sample}.log"
        sink = AccessLog(AccessLogConfig(enabled=True, path=str(path), sample=sample), loop)
        for i in range(requests):
            ex = SimpleNamespace(
                route=SimpleNamespace(name="r"),
                pool=None,
                target=None,
                method=b"GET",
                url=b"/%d" % (i + 1),
                response_bytes=0,
                started=0.0,
                sent_at=0.0,
                shed_reason=None,
                cache_status=None,
            )
            sink.record(client, ex, 200, 0.001)
        sink.close()
        got = [r["path"] for r in lines(path)]
        assert len(got) == kept, sample
        if sample == 0.1:
            assert got == [f"/{n}" for n in range(10, 101, 10)]  # every tenth, not in bursts


async def test_reopen_after_rotation(
    backend: Backend, gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    log_path = tmp_path / "access.log"
    rotated = tmp_path / "access.log.1"
    app = await gateway_factory(config(backend.address, log_path))
    assert await get(app, "/first") == 200
    assert app.access_log is not None
    app.access_log.flush()
    log_path.rename(rotated)  # what logrotate does before sending SIGUSR1
    assert await get(app, "/second") == 200  # buffered: still belongs to the old file
    app.reopen_logs()  # the SIGUSR1 handler
    assert await get(app, "/third") == 200
    await app.stop()  # flushes on stop
    assert [r["path"] for r in lines(rotated)] == ["/first", "/second"]
    assert [r["path"] for r in lines(log_path)] == ["/third"]


async def test_sigusr1_reopens_the_file_of_a_running_gateway(backend: Backend, tmp_path: Path) -> None:
    """The real signal path: `gateway run` in a subprocess, logrotate-style rename + SIGUSR1."""
    log_path, rotated, cfg = tmp_path / "access.log", tmp_path / "access.log.1", tmp_path / "gateway.yaml"
    port = free_port()
    cfg.write_text(config(backend.address, log_path).replace("127.0.0.1:0", f"127.0.0.1:{port}"))
    proc = await asyncio.create_subprocess_exec(
        *gateway_command("run", "--config", str(cfg)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        assert b"gateway listening" in await asyncio.wait_for(proc.stdout.readline(), 20)
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/first") as resp:
                assert resp.status == 200
            await wait_for(lambda: len(lines(log_path)) == 1)
            log_path.rename(rotated)
            proc.send_signal(signal.SIGUSR1)
            await wait_for(log_path.exists)  # reopened: a fresh file at the configured path
            async with session.get(f"{base}/second") as resp:
                assert resp.status == 200
        assert (await stop_process(proc, signal.SIGTERM, 20))[0] == 0
    finally:
        if proc.returncode is None:
            await stop_process(proc, signal.SIGKILL, 10)
    assert [r["path"] for r in lines(rotated)] == ["/first"]
    assert [r["path"] for r in lines(log_path)] == ["/second"]  # flushed on stop


async def test_shed_requests_carry_the_reason(
    backend: Backend, gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    log_path = tmp_path / "access.log"
    routes = (
        "  - name: retired\n    match: {path_prefix: /old/}\n    upstream: null\n"
        "  - name: limited\n    match: {path_prefix: /limited/}\n    upstream: api\n"
        "    rate_limit: {rate: 1, per: 1m, burst: 1, key: route}\n"
    )
    app = await gateway_factory(config(backend.address, log_path, extra_routes=routes))
    assert await get(app, "/old/x") == 503
    assert await get(app, "/limited/a") == 200
    assert await get(app, "/limited/b") == 429
    assert app.access_log is not None
    app.access_log.flush()
    old, ok, limited = lines(log_path)
    assert (old["route"], old["status"], old["shed_reason"]) == ("retired", 503, "null_upstream")
    assert old["upstream"] is None and old["target"] is None and old["upstream_duration_s"] is None
    assert ok["shed_reason"] is None and ok["target"] == backend.address
    assert (limited["route"], limited["status"], limited["shed_reason"]) == ("limited", 429, "rate_limited")
    assert limited["target"] is None


async def test_off_by_default(backend: Backend, gateway_factory: GatewayFactory) -> None:
    app = await gateway_factory(
        HEADER + f"upstreams:\n  api:\n    targets:\n      - address: {backend.address}\n"
        "routes:\n  - name: api\n    upstream: api\n"
    )
    assert app.access_log is None and app.proxy.holder.access_log is None
    assert await get(app, "/") == 200


async def test_reload_recreates_the_sink_only_when_settings_change(
    backend: Backend, gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    first, second = tmp_path / "first.log", tmp_path / "second.log"
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(config(backend.address, first))
    app = await gateway_factory(cfg.read_text(), str(cfg))
    sink = app.access_log
    assert sink is not None
    assert await get(app, "/one") == 200
    assert app.reload() == (True, [])
    assert app.access_log is sink  # unchanged settings: same sink, nothing lost
    cfg.write_text(config(backend.address, second))
    assert app.reload() == (True, [])
    assert app.access_log is not sink and app.proxy.holder.access_log is app.access_log
    assert await get(app, "/two") == 200
    cfg.write_text(config(backend.address, second).replace("enabled: true", "enabled: false"))
    assert app.reload() == (True, [])
    assert app.access_log is None and app.proxy.holder.access_log is None  # switched off
    assert await get(app, "/three") == 200
    await app.stop()
    assert [r["path"] for r in lines(first)] == ["/one"]  # the old sink flushed when replaced
    assert [r["path"] for r in lines(second)] == ["/two"]


async def test_stdout_destination(
    backend: Backend, gateway_factory: GatewayFactory, capfd: pytest.CaptureFixture[str]
) -> None:
    app = await gateway_factory(config(backend.address, "stdout"))
    assert await get(app, "/to-stdout") == 200
    assert app.access_log is not None
    app.access_log.flush()
    out = capfd.readouterr().out
    records = [orjson.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["path"] for r in records] == ["/to-stdout"]


async def test_buffer_limit_triggers_an_early_write(
    backend: Backend, gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    log_path = tmp_path / "access.log"
    app = await gateway_factory(
        config(backend.address, log_path).replace("sample: 1.0}", "sample: 1.0, buffer: 2}")
    )
    sink = app.access_log
    assert sink is not None and sink.limit == 2
    sink._timer.cancel()  # only the buffer limit may write now
    assert await get(app, "/1") == 200
    assert await get(app, "/2") == 200
    await wait_for(lambda: len(lines(log_path)) == 2, timeout=2.0)


def test_access_log_settings_are_validated() -> None:
    from gateway.config.parse import load_text
    from gateway.config.schema import ConfigError

    with pytest.raises(ConfigError) as e:
        load_text("access_log: {enabled: true, sample: 1.5}\n", "<t>")
    assert "access_log.sample" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_text("access_log: {enabled: true, buffer: 0}\n", "<t>")
    assert "access_log.buffer" in str(e.value)
