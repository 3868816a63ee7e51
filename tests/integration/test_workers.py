"""`workers: 2` end to end: a master, two worker processes on one port, host-wide limits and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest

from tests.helpers import ROOT, Backend, free_port, gateway_command


async def _wait_http(url: str, deadline_s: float = 20.0) -> None:
    deadline = time.monotonic() + deadline_s
    async with aiohttp.ClientSession() as s:
        while True:
            try:
                async with s.get(url) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{url} not ready")
            await asyncio.sleep(0.1)


def _worker_pids(master: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.fixture
async def cluster(tmp_path: Path, backend: Backend):  # type: ignore[no-untyped-def]
    proxy, health, admin = free_port(), free_port(), free_port()
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(
        f"""
listen: 127.0.0.1:{proxy}
health_listen: 127.0.0.1:{health}
admin_listen: 127.0.0.1:{admin}
workers: 2
upstreams:
  api:
    targets: [{{address: {backend.address}}}]
routes:
  - name: api
    match: {{path_prefix: /}}
    upstream: api
    rate_limit: {{rate: 10, per: 60s, burst: 10, key: route}}
"""
    )
    proc = subprocess.Popen(
        gateway_command("run", "--config", str(cfg)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    workers: list[int] = []
    try:
        await _wait_http(f"http://127.0.0.1:{health}/readyz")
        workers = _worker_pids(proc.pid)
        yield proc, proxy, health, admin, cfg
    finally:
        workers += _worker_pids(proc.pid)  # after a restart, the new ones too (before the master goes)
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # normally gone already: they exit with their master


def _alive(pid: int) -> bool:
    """Running (not a zombie awaiting its reaper)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


async def test_workers_exit_when_the_master_is_killed(cluster) -> None:  # type: ignore[no-untyped-def]
    """A master killed outright (OOM killer, SIGKILL) must not leave workers serving a stale config."""
    proc, *_ = cluster
    workers = _worker_pids(proc.pid)
    assert len(workers) == 2
    proc.kill()
    proc.wait(10)
    deadline = time.monotonic() + 15
    while any(_alive(pid) for pid in workers):
        assert time.monotonic() < deadline, "workers outlived their master"
        await asyncio.sleep(0.05)


async def test_host_wide_limit_metrics_restart_and_stop(cluster) -> None:  # type: ignore[no-untyped-def]
    proc, proxy, health, admin, _ = cluster
    assert len(_worker_pids(proc.pid)) == 2
    statuses = []
    async with aiohttp.ClientSession() as s:
        # Fresh connections each time so SO_REUSEPORT spreads them over both workers.
        for _ in range(30):
            async with s.get(f"http://127.0.0.1:{proxy}/x", headers={"Connection": "close"}) as r:
                statuses.append(r.status)
    # The route-wide bucket (10) holds for the whole host, not 10 per worker.
    assert statuses.count(200) == 10, statuses
    assert statuses.count(429) == 20
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{admin}/metrics") as r:
        text = await r.text()
    assert 'gateway_requests_total{code_class="2xx",route="api"} 10.0' in text
    assert 'gateway_requests_total{code_class="4xx",route="api"} 20.0' in text

    victim = _worker_pids(proc.pid)[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while True:
        pids = _worker_pids(proc.pid)
        if len(pids) == 2 and victim not in pids:
            break
        assert time.monotonic() < deadline, "worker was not restarted"
        await asyncio.sleep(0.1)
    await _wait_http(f"http://127.0.0.1:{health}/readyz")
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{admin}/metrics") as r:
        assert 'gateway_worker_restarts_total{worker="0"} 1.0' in await r.text() or (
            'gateway_worker_restarts_total{worker="1"} 1.0' in await r.text()
        )

    proc.send_signal(signal.SIGTERM)
    assert await asyncio.get_running_loop().run_in_executor(None, proc.wait, 30) == 0


async def test_reload_reaches_every_worker(cluster) -> None:  # type: ignore[no-untyped-def]
    proc, proxy, _health, _admin, cfg = cluster
    cfg.write_text(cfg.read_text().replace("rate_limit: {rate: 10, per: 60s, burst: 10, key: route}", ""))
    proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    async with aiohttp.ClientSession() as s:
        while True:
            ok = 0
            for _ in range(20):
                async with s.get(f"http://127.0.0.1:{proxy}/x", headers={"Connection": "close"}) as r:
                    ok += r.status == 200
            if ok == 20:
                break
            assert time.monotonic() < deadline, "reload did not reach every worker"
            await asyncio.sleep(0.1)
