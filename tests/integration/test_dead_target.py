"""A target that refuses connections costs clients nothing while another can answer (defects, item 2).

nginx with two `server` lines, one of them dead, gives no failed request: `proxy_next_upstream
error` tries the next server, and `max_fails=1 fail_timeout=10s` keeps the dead one out. The same
holds here with the default configuration (no `retry`, no `passive`): a request that never reached
a backend goes to another target regardless of the retry budget, and the default passive ejection
takes the dead target out after a few failures.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.helpers import HEADER, Backend, GatewayFactory, free_port


async def statuses(port: int, n: int) -> list[int]:
    """`n` sequential GETs on one keep-alive client connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out = []
    try:
        for i in range(n):
            writer.write(f"GET /{i} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            out.append(int(head.split(b" ", 2)[1]))
    finally:
        writer.close()
    return out


def config(addresses: list[str], extra: str = "") -> str:
    targets = ", ".join(f"{{address: {a}}}" for a in addresses)
    return (
        HEADER
        + f"upstreams:\n  app:\n    targets: [{targets}]\n{extra}"
        + "routes:\n  - name: app\n    upstream: app\n"
    )


@pytest.mark.parametrize(
    "extra",
    ["    passive: false\n", "    passive: false\n    retry: {on: [503], budget: 0, min_retries: 0}\n"],
    ids=["default-retry", "no-connect-retry-and-no-budget"],
)
async def test_refused_target_never_reaches_the_client(
    extra: str, backend: Backend, gateway_factory: GatewayFactory
) -> None:
    """Without ejection every other request meets the dead target first: far more retries than the
    budget (20% of requests, at least 3 per 10 s) allows, and still no 502."""
    dead = f"127.0.0.1:{free_port()}"
    app = await gateway_factory(config([dead, backend.address], extra))
    got = await statuses(app.proxy.port, 40)
    assert got == [200] * 40
    pool = app.proxy.runtime.pools["app"]
    assert pool.target(dead) is not None
    assert pool.target(dead).stats.connect_errors >= 15  # it was really tried, every other request


async def test_each_target_is_tried_once_before_a_502(
    backend: Backend, gateway_factory: GatewayFactory
) -> None:
    """Three targets, two dead: with `attempts: 2` a retry could land on the other dead one; an
    unreached request tries each target once instead, so it always finds the live one."""
    dead = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    app = await gateway_factory(config([*dead, backend.address], "    passive: false\n"))
    assert await statuses(app.proxy.port, 30) == [200] * 30


async def test_all_targets_dead_is_a_bounded_502(gateway_factory: GatewayFactory) -> None:
    dead = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    app = await gateway_factory(config(dead, "    passive: false\n"))
    assert await statuses(app.proxy.port, 5) == [502] * 5
    pool = app.proxy.runtime.pools["app"]
    # Each request tried each target once: 15 attempts, not a retry loop.
    assert sum(t.stats.connect_errors for t in pool.targets) == 15


async def test_default_passive_ejection_takes_the_dead_target_out(
    backend: Backend, gateway_factory: GatewayFactory
) -> None:
    """No `passive` key: after 3 consecutive connection failures the dead target is ejected for 10 s
    and stops costing a connection attempt per request."""
    dead = f"127.0.0.1:{free_port()}"
    app = await gateway_factory(config([dead, backend.address]))
    assert await statuses(app.proxy.port, 40) == [200] * 40
    target = app.proxy.runtime.pools["app"].target(dead)
    assert target is not None
    assert target.ejected
    assert target.stats.connect_errors == 3


async def test_default_passive_ignores_5xx(backend: Backend, gateway_factory: GatewayFactory) -> None:
    """The default ejects for failed connections only: a backend's own 500s eject nothing."""
    app = await gateway_factory(config([backend.address]))
    reader, writer = await asyncio.open_connection("127.0.0.1", app.proxy.port)
    try:
        for _ in range(10):
            writer.write(b"GET /status/500 HTTP/1.1\r\nHost: t\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            assert head.startswith(b"HTTP/1.1 500")
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    await reader.readexactly(int(line.split(b":", 1)[1]))
    finally:
        writer.close()
    assert not app.proxy.runtime.pools["app"].targets[0].ejected


async def test_passive_false_turns_ejection_off(backend: Backend, gateway_factory: GatewayFactory) -> None:
    dead = f"127.0.0.1:{free_port()}"
    app = await gateway_factory(config([dead, backend.address], "    passive: false\n"))
    assert await statuses(app.proxy.port, 20) == [200] * 20
    target = app.proxy.runtime.pools["app"].target(dead)
    assert target is not None and not target.ejected and target.outlier is None
