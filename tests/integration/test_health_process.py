"""The default health isolation: a separate process reading the proxy loop's heartbeat from shared memory."""

from __future__ import annotations

import os

import aiohttp

from tests.helpers import wait_for

CONFIG = """
listen: 127.0.0.1:0
health_listen: 127.0.0.1:0
admin_listen: null
health: {stall_threshold: 300ms, isolation: process}
routes:
  - name: nothing
    upstream: null
"""


async def _get(port: int, path: str, method: str = "GET") -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.request(method, f"http://127.0.0.1:{port}{path}") as r:
        return r.status, await r.text()


async def test_health_answers_from_another_process_and_follows_the_heartbeat(gateway_factory) -> None:  # type: ignore[no-untyped-def]
    app = await gateway_factory(CONFIG)
    health = app.health
    assert health is not None and health.proc is not None  # type: ignore[union-attr]
    assert health.proc.pid != os.getpid()  # type: ignore[union-attr]
    port = health.port
    assert await _get(port, "/healthz") == (200, "ok\n")
    assert await _get(port, "/readyz") == (200, "ready\n")
    assert (await _get(port, "/healthz", "HEAD"))[0] == 200
    assert (await _get(port, "/nope"))[0] == 404
    assert (await _get(port, "/healthz", "POST"))[0] == 405

    # Draining is visible to the other process at once (shared memory), liveness unaffected.
    app.liveness.draining = True
    assert await _get(port, "/readyz") == (503, "draining\n")
    assert (await _get(port, "/healthz"))[0] == 200

    # A heartbeat older than stall_threshold (a hung proxy loop) turns liveness 503.
    app.liveness.stop()
    app.liveness.last_beat = app.liveness.clock() - 10
    assert await _get(port, "/healthz") == (503, "event loop stalled\n")

    proc = health.proc  # type: ignore[union-attr]
    await app.stop()
    await wait_for(lambda: not proc.is_alive(), timeout=5)
