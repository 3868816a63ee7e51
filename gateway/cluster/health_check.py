"""Active health checks: one probe loop per target, off the request path, on aiohttp.

Rules: each target has at most one probe in flight (its loop awaits each probe); probes are
spread by a random first delay over one interval plus per-probe jitter, so a pool never gets a
synchronized stampede; the pure `HealthState` decides when a target flips; a flip updates the
pool's weights at once and is logged once. Loops follow reloads: `sync()` starts loops for new
(upstream, target, settings) and cancels the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import time
from typing import TYPE_CHECKING

import aiohttp

from gateway.observe import log

if TYPE_CHECKING:
    from gateway.client.listener import ProxyServer
    from gateway.config.model import HealthCheck

Key = tuple[str, str, "HealthCheck"]


class HealthChecker:
    def __init__(self, server: ProxyServer, rng: random.Random | None = None) -> None:
        self.server = server
        self.rng = rng or random.Random()
        self.tasks: dict[Key, asyncio.Task[None]] = {}
        self.session: aiohttp.ClientSession | None = None

    def sync(self) -> None:
        """Start probe loops for the current snapshot's checked targets; stop the rest."""
        wanted: set[Key] = set()
        for name, pool in self.server.runtime.pools.items():
            hc = pool.config.health_check
            if hc is None:
                continue
            for t in pool.targets:
                wanted.add((name, t.address, hc))
        for key in list(self.tasks):
            if key not in wanted:
                self.tasks.pop(key).cancel()
        if wanted and self.session is None:
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, force_close=True), auto_decompress=False
            )
        for key in wanted:
            if key not in self.tasks:
                self.tasks[key] = asyncio.get_running_loop().create_task(self._loop(*key))

    async def close(self) -> None:
        for task in self.tasks.values():
            task.cancel()
        for task in self.tasks.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.tasks.clear()
        if self.session is not None:
            await self.session.close()
            self.session = None

    async def _loop(self, upstream: str, address: str, hc: HealthCheck) -> None:
        jitter = hc.jitter if hc.jitter is not None else hc.interval * 0.1
        await asyncio.sleep(self.rng.uniform(0, hc.interval))  # spread the first probes over one interval
        headers = {"Host": hc.host or address, "User-Agent": "gateway-health-check"}
        while True:
            started = time.monotonic()
            # Probe the way traffic goes: TLS (same context, same SNI name) when the upstream uses it.
            current = self.server.runtime.pools.get(upstream)
            ctx = current.ssl_context if current is not None else None
            sni = None
            if current is not None and ctx is not None:
                t = current.target(address)
                sni = current.server_hostname(t) if t is not None else None
            url = f"{'https' if ctx is not None else 'http'}://{address}{hc.path}"
            ok, detail = await self._probe(url, headers, hc, ctx, sni)
            pool = self.server.runtime.pools.get(upstream)
            target = pool.target(address) if pool is not None else None
            if pool is None or target is None or target.health is None:
                return
            target.last_check = {
                "ok": ok,
                "detail": detail,
                "at": round(time.time(), 3),
                "duration_s": round(time.monotonic() - started, 4),
            }
            flipped = target.health.on_success() if ok else target.health.on_failure()
            if flipped:
                pool.set_health(target, target.health.healthy)
                log.event(
                    "health_check",
                    upstream=upstream,
                    target=address,
                    healthy=target.health.healthy,
                    detail=detail,
                )
            await asyncio.sleep(hc.interval + self.rng.uniform(0, jitter))

    async def _probe(
        self,
        url: str,
        headers: dict[str, str],
        hc: HealthCheck,
        ctx: ssl.SSLContext | None = None,
        sni: str | None = None,
    ) -> tuple[bool, str]:
        assert self.session is not None
        try:
            async with self.session.get(
                url,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=hc.timeout),
                allow_redirects=False,
                ssl=ctx if ctx is not None else True,
                server_hostname=sni,
            ) as resp:
                await resp.read()
                status = resp.status
        except TimeoutError:
            return False, "timeout"
        except (aiohttp.ClientError, OSError) as e:
            return False, type(e).__name__
        ok = status in hc.expected_status if hc.expected_status else 200 <= status < 400
        return ok, f"status {status}"
