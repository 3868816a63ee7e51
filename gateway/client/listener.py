"""One gateway process: the proxy listener, its sweeper, and the current runtime snapshot.

The control plane (health port on its own thread, admin/metrics) is attached by `gateway.process.app`;
this class is the data plane only, so tests can run it in-process on port 0.
"""

from __future__ import annotations

import asyncio
import socket
from time import monotonic as _now
from typing import TYPE_CHECKING, cast

from gateway.cache.store import close_refresh_session
from gateway.client.connection import ClientProtocol
from gateway.config.model import Config, parse_address
from gateway.pipeline.routing import Holder, Runtime

if TYPE_CHECKING:
    import ssl


class ProxyServer:
    """The proxy listener plus a once-a-tick sweep for coarse timeouts (header read, keep-alive, idle)."""

    def __init__(self, config: Config, ssl_context: ssl.SSLContext | None = None) -> None:
        self.holder = Holder(Runtime(config))
        self.clients: set[ClientProtocol] = set()
        self.server: asyncio.Server | None = None
        self.ssl_context = ssl_context
        self.reuse_port = False  # set for `workers: N`: every worker binds the port (SO_REUSEPORT)
        self._sweeper: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def runtime(self) -> Runtime:
        return self.holder.runtime

    def tick_s(self) -> float:
        c = self.runtime.config
        candidates = [
            1.0,
            c.client.header_read_timeout / 4,
            c.client.keepalive_timeout / 4,
            c.client.body_rate_window / 4,
            c.timeouts.idle / 4,
        ]
        # Response timeouts are enforced by this sweep: a tick of response/10 makes a 504 at most
        # 10% late (and never early) without a timer per request.
        candidates += [c.timeouts.response / 10]
        candidates += [r.timeouts.idle / 4 for r in c.routes if r.timeouts is not None]
        candidates += [r.timeouts.response / 10 for r in c.routes if r.timeouts is not None]
        candidates += [u.slow_start.window / 50 for u in c.upstreams.values() if u.slow_start is not None]
        candidates += [0.1 for u in c.upstreams.values() if u.adaptive is not None]
        return max(0.02, min(candidates))

    async def start(self, sock: socket.socket | None = None) -> None:
        loop = self._loop = asyncio.get_running_loop()
        holder = self.holder
        clients = self.clients
        scheme = b"https" if self.ssl_context is not None else b"http"

        per_ip: dict[bytes, int] = {}  # open connections per client address (client.max_connections_per_ip)

        def factory() -> asyncio.Protocol:
            # A compiled (mypyc) class cannot derive from asyncio.Protocol; the loop only calls its methods.
            p = ClientProtocol(holder, loop, clients, holder.runtime.config.client, scheme, per_ip)
            return cast(asyncio.Protocol, p)

        if sock is None:
            host, port = parse_address(self.runtime.config.listen, "listen")
            self.server = await loop.create_server(
                factory,
                host,
                port,
                backlog=4096,
                ssl=self.ssl_context,
                reuse_address=True,
                reuse_port=self.reuse_port or None,
            )
        else:
            self.server = await loop.create_server(factory, sock=sock, backlog=4096, ssl=self.ssl_context)
        self._sweeper = loop.call_later(self.tick_s(), self._sweep)

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    def _sweep(self) -> None:
        loop = self._loop
        assert loop is not None
        now = _now()  # the data plane stamps exchanges with time.monotonic (µs resolution)
        for client in list(self.clients):
            client.sweep(now)
        for pool in self.runtime.pools.values():
            pool.sweep(now)
        self._sweeper = loop.call_later(self.tick_s(), self._sweep)

    def swap(self, config: Config) -> Runtime:
        """Install a new snapshot; target state of unchanged targets is carried over."""
        old = self.holder.runtime
        new = Runtime(config, previous=old)
        self.holder.runtime = new
        kept = {id(t) for p in new.pools.values() for t in p.targets}
        for pool in old.pools.values():
            for t in pool.targets:
                if id(t) not in kept:
                    t.drained = True  # removed: finish in-flight work, close idle connections
                    t.close_all_idle()
        return new

    async def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
        for client in list(self.clients):
            client.abort()
        for pool in self.runtime.pools.values():
            for t in pool.targets:
                t.close_all_idle()
        await close_refresh_session()
