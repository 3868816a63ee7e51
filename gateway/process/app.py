"""A running gateway: data plane, health thread, admin/metrics, signals, reload and drain.

Lifecycle: load config → bind proxy, health and admin listeners → ready. The documented signals
are held from the start of the process until their handlers are installed, so one received during
start takes effect once started (gateway.process.orphan). SIGHUP reloads (an invalid file is logged and the
running config kept); SIGTERM/SIGINT drain: readiness turns 503 and responses carry
`Connection: close`, after `drain_delay` the listener stops accepting and idle keep-alive
connections are closed, in-flight exchanges finish up to `drain_timeout`, then the process exits 0.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sys
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway import compiled
from gateway.client.listener import ProxyServer
from gateway.cluster.health_check import HealthChecker
from gateway.config.model import AccessLogConfig, Config, parse_address
from gateway.config.parse import load_file
from gateway.config.schema import ConfigError
from gateway.control.admin import AdminServer
from gateway.control.liveness import HealthProcess, HealthServer, Liveness
from gateway.control.view import GatewayView
from gateway.observe import log, stats
from gateway.observe.accesslog import AccessLog
from gateway.process import orphan
from gateway.ratelimit.coordinator import CoordinatorStore
from gateway.tls import reload_server_context, server_context

if TYPE_CHECKING:
    from gateway.ratelimit.redis_store import RedisLimitStore

    SharedStore = RedisLimitStore | CoordinatorStore


@dataclass(frozen=True, slots=True)
class WorkerRole:
    """Set on an App that is one of `workers: N` (gateway.process.workers): its index, and where the
    master's host-wide rate-limit buckets are (None: no coordinator, e.g. Redis is configured)."""

    index: int
    coordinator: str | None

    def limit_store(self) -> CoordinatorStore | None:
        return CoordinatorStore(self.coordinator) if self.coordinator else None


class App:
    def __init__(self, config: Config, config_path: str | Path | None = None) -> None:
        self.config = config
        self.config_path = Path(config_path) if config_path is not None else None
        self.proxy = ProxyServer(config, server_context(config.tls) if config.tls is not None else None)
        self.access_log: AccessLog | None = None
        self.liveness = Liveness(config.health.stall_threshold)
        self.health: HealthServer | HealthProcess | None = None
        self.checker = HealthChecker(self.proxy)
        self.admin: AdminServer | None = None
        self._stopped = asyncio.Event()
        self._stopping = False
        # The active shared-bucket store: the Redis store when configured, else e.g. the workers' one.
        self.limit_store: SharedStore | None = None
        self.redis_store: RedisLimitStore | None = None
        # A non-Redis store set aside while Redis is configured (restored when it no longer is).
        self._store_shadowed: SharedStore | None = None
        # Set by gateway.process.workers before start() when this process is one of `workers: N`.
        self.worker: WorkerRole | None = None
        self._store_tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.liveness.beat_on(loop)
        store = self._sync_limit_store()
        if store is not None:
            await store.start()  # bounded; an unreachable Redis only marks it down
        if self.worker is not None:
            self.proxy.reuse_port = True
            shared = self.worker.limit_store() if self.limit_store is None else None
            if shared is not None:  # host-wide buckets held by the master
                self.limit_store = self.proxy.runtime.limit_store = shared
                await shared.start()
        await self.proxy.start()
        self.checker.sync()
        self.set_access_log(self.config.access_log)
        cfg = self.config
        if cfg.health_listen is not None and self.worker is None:  # with workers, the master serves health
            host, port = parse_address(cfg.health_listen, "health_listen")
            if cfg.health.isolation == "process":
                self.health = HealthProcess(self.liveness, host, port)
            else:
                self.health = HealthServer(self.liveness, host, port)
            self.health.start()
        if cfg.admin_listen is not None:
            host, port = parse_address(cfg.admin_listen, "admin_listen")
            if self.worker is not None:
                host, port = "127.0.0.1", 0  # private: the master aggregates and forwards
            admin = AdminServer(self.control_view(), host, port)
            await admin.start()
            self.admin = admin
        self.liveness.ready = True

    def control_view(self) -> GatewayView:
        """What the admin API and /metrics may use of this process (gateway.control.view)."""
        proxy = self.proxy
        return GatewayView(
            runtime=lambda: proxy.runtime,
            reload=self.reload,
            config_path=self.config_path,
            worker=str(self.worker.index) if self.worker is not None else None,
        )

    def _sync_limit_store(self) -> RedisLimitStore | None:
        """Attach the Redis rate-limit store the config asks for: keep it if unchanged, else replace
        it (the old one closes in the background). Returns a newly created store, to be started.
        Another store (not Redis) is set aside while Redis is configured and restored after."""
        want = self.config.rate_limit_store
        old = self.redis_store
        if old is not None and old.config == want:
            return None
        new: RedisLimitStore | None = None
        if want is not None:
            from gateway.ratelimit.redis_store import RedisLimitStore

            new = RedisLimitStore(want)
        if old is not None:
            self._store_task(old.close())
        elif new is not None:
            self._store_shadowed = self.limit_store
        self.redis_store = new
        if new is not None:
            self.limit_store = new
        elif old is not None:
            self.limit_store, self._store_shadowed = self._store_shadowed, None
        self.proxy.runtime.limit_store = self.limit_store
        return new

    def _store_task(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._store_tasks.add(task)
        task.add_done_callback(self._store_tasks.discard)

    def addresses(self) -> dict[str, str]:
        out = {"proxy": f"{self.config.listen.rsplit(':', 1)[0]}:{self.proxy.port}"}
        if self.health is not None:
            out["health"] = f"{self.health.host}:{self.health.port}"
        admin = self.admin
        if admin is not None:
            out["admin"] = f"{admin.host}:{admin.port}"
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
        old, self.config = self.config, config
        self.proxy.swap(config)
        store = self._sync_limit_store()
        if store is not None:
            self._store_task(store.start())
        self.checker.sync()
        self._reload_ops(old, config)
        stats.GLOBAL.reloads += 1
        log.event("reloaded", path=str(self.config_path))
        return True, []

    def _reload_ops(self, old: Config, new: Config) -> None:
        """Reload parts outside the runtime snapshot: access-log sink, listener certificate."""
        if new.access_log != old.access_log:
            try:
                self.set_access_log(new.access_log)
            except OSError as e:
                log.event("access_log_failed", path=new.access_log.path, error=str(e))
        ctx = self.proxy.ssl_context
        if ctx is not None and new.tls is not None:
            try:
                reload_server_context(ctx, new.tls)  # rotated certificate: new handshakes use it
            except OSError as e:
                log.event("tls_reload_failed", error=str(e))
        elif (ctx is None) != (new.tls is None):
            log.event("restart_required", reason="tls on/off for the listener changes on restart only")

    def set_access_log(self, settings: AccessLogConfig | None) -> None:
        """Install the access-log sink for `settings` (None or disabled: none); flush the old one."""
        new = None
        if settings is not None and settings.enabled:
            new = AccessLog(settings, asyncio.get_running_loop())
        old = self.access_log
        if old is not None:
            old.close()
        self.access_log = self.proxy.holder.access_log = new

    def reopen_logs(self) -> None:
        """SIGUSR1 (logrotate): reopen the access-log file."""
        if self.access_log is not None:
            self.access_log.reopen()

    async def drain_and_stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        cfg = self.config
        self.liveness.draining = True
        # From now on every response says `Connection: close`: a busy keep-alive client leaves at a
        # response boundary during the delay, instead of having its connection closed under its next
        # request when the delay ends. Idle connections stay open until then (closed below).
        self.proxy.holder.draining = True
        log.event("draining", drain_delay_s=cfg.drain_delay, drain_timeout_s=cfg.drain_timeout)
        if cfg.drain_delay > 0:
            await asyncio.sleep(cfg.drain_delay)
        await self.proxy.stop_accepting()
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
            await self.admin.stop()
        if self.health is not None:
            self.health.stop()
        await self.proxy.close()
        self.set_access_log(None)  # flush what the last exchanges logged
        for store in (self.limit_store, self._store_shadowed):
            if store is not None:
                await store.close()
        self.limit_store = self.redis_store = self._store_shadowed = None
        if self._store_tasks:
            await asyncio.wait(self._store_tasks)
        self._stopped.set()

    async def serve_forever(self) -> None:
        """Install the signal handlers, then release the signals held since the process started
        (gateway.process.orphan): one received during start runs its handler now, once started."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: loop.create_task(self.drain_and_stop()))
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        loop.add_signal_handler(signal.SIGUSR1, self.reopen_logs)
        orphan.release_signals()
        await self._stopped.wait()


def write_pid_file(path: str | None) -> None:
    if path:
        Path(path).write_text(f"{os.getpid()}\n")


def tune_gc() -> None:
    """Freeze start-up objects out of the collector and collect the young generation less often.

    The request path allocates a few short-lived objects per request, nearly all freed by
    reference counting; a default gen-0 threshold of 700 would run the cyclic collector every
    ~100 requests for little gain.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


async def run(config: Config, config_path: str | Path | None) -> int:
    try:
        app = App(config, config_path)
        await app.start()
    except OSError as e:  # also ssl.SSLError (certificate) and an unwritable access-log file
        print(f"gateway: cannot listen: {e.strerror or e}", file=sys.stderr)
        return 1
    tune_gc()
    write_pid_file(config.pid_file)
    where = app.addresses()
    print(
        f"gateway listening on http://{where['proxy']}"
        + (f", health on http://{where['health']}/healthz" if "health" in where else "")
        + (f", admin on http://{where['admin']}/metrics" if "admin" in where else "")
        + ("" if compiled() else " (pure-Python data plane: slower; see README, Install)"),
        flush=True,
    )
    await app.serve_forever()
    return 0
