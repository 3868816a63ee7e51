"""A running gateway: data plane, health thread, admin/metrics, signals, reload and drain.

Lifecycle: load config → bind proxy, health and admin listeners → ready. SIGHUP reloads (an
invalid file is logged and the running config kept); SIGTERM/SIGINT drain: readiness turns 503,
after `drain_delay` the listener stops accepting, in-flight exchanges finish up to
`drain_timeout`, idle keep-alive connections are closed, then the process exits 0.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

from gateway import log, stats
from gateway.config.model import Config, parse_address
from gateway.config.parse import load_file
from gateway.config.schema import ConfigError
from gateway.control.checker import HealthChecker
from gateway.control.health import HealthServer, Liveness
from gateway.server import ProxyServer


class App:
    def __init__(self, config: Config, config_path: str | Path | None = None) -> None:
        self.config = config
        self.config_path = Path(config_path) if config_path is not None else None
        self.proxy = ProxyServer(config)
        self.liveness = Liveness(config.health.stall_threshold)
        self.health: HealthServer | None = None
        self.checker = HealthChecker(self.proxy)
        self.admin: object | None = None
        self._stopped = asyncio.Event()
        self._stopping = False

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.liveness.beat_on(loop)
        await self.proxy.start()
        self.checker.sync()
        cfg = self.config
        if cfg.health_listen is not None:
            host, port = parse_address(cfg.health_listen, "health_listen")
            self.health = HealthServer(self.liveness, host, port)
            self.health.start()
        if cfg.admin_listen is not None:
            from gateway.control.admin import AdminServer

            host, port = parse_address(cfg.admin_listen, "admin_listen")
            admin = AdminServer(self, host, port)
            await admin.start()
            self.admin = admin
        self.liveness.ready = True

    def addresses(self) -> dict[str, str]:
        out = {"proxy": f"{self.config.listen.rsplit(':', 1)[0]}:{self.proxy.port}"}
        if self.health is not None:
            out["health"] = f"{self.health.host}:{self.health.port}"
        admin = self.admin
        if admin is not None:
            out["admin"] = f"{admin.host}:{admin.port}"  # type: ignore[attr-defined]
        return out

    def reload(self) -> tuple[bool, list[str]]:
        """Re-read the config file; on error keep the running config and report why."""
        if self.config_path is None:
            return False, ["no configuration file to reload"]
        try:
            config = load_file(self.config_path)
        except ConfigError as e:
            stats.GLOBAL.reload_failures += 1
            log.event("reload_failed", errors=e.errors)
            return False, e.errors
        self.config = config
        self.proxy.swap(config)
        self.checker.sync()
        stats.GLOBAL.reloads += 1
        log.event("reloaded", path=str(self.config_path))
        return True, []

    async def drain_and_stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        cfg = self.config
        self.liveness.draining = True
        log.event("draining", drain_delay_s=cfg.drain_delay, drain_timeout_s=cfg.drain_timeout)
        if cfg.drain_delay > 0:
            await asyncio.sleep(cfg.drain_delay)
        await self.proxy.stop_accepting()
        self.proxy.holder.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + cfg.drain_timeout
        for client in list(self.proxy.clients):
            if client.active is None and not client.queue and client.parsing is None:
                client.close()
        while loop.time() < deadline and any(c.active is not None for c in self.proxy.clients):
            await asyncio.sleep(0.05)
        await self.stop()

    async def stop(self) -> None:
        self.liveness.stop()
        await self.checker.close()
        if self.admin is not None:
            await self.admin.stop()  # type: ignore[attr-defined]
        if self.health is not None:
            self.health.stop()
        await self.proxy.close()
        self._stopped.set()

    async def serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: loop.create_task(self.drain_and_stop()))
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        await self._stopped.wait()


async def run(config: Config, config_path: str | Path | None) -> int:
    app = App(config, config_path)
    try:
        await app.start()
    except OSError as e:
        print(f"gateway: cannot listen: {e.strerror or e}", file=sys.stderr)
        return 1
    where = app.addresses()
    print(
        f"gateway listening on http://{where['proxy']}"
        + (f", health on http://{where['health']}/healthz" if "health" in where else "")
        + (f", admin on http://{where['admin']}/metrics" if "admin" in where else ""),
        flush=True,
    )
    await app.serve_forever()
    return 0
