"""Runtime state of upstream pools: targets, idle keep-alive connections, balancing.

A `Pool` is rebuilt on reload, but `TargetState` objects of unchanged targets are carried over
by (upstream, address) so their pooled connections and counters survive.
"""

from __future__ import annotations

import random
from collections import deque
from typing import TYPE_CHECKING, Protocol

from gateway.config.model import Upstream, parse_address
from gateway.policy.balancer import LeastRequestP2C, SmoothWeightedRoundRobin
from gateway.stats import TargetStats, target_stats

if TYPE_CHECKING:
    from collections.abc import Callable


class Pooled(Protocol):
    """What the pool needs of an upstream connection."""

    closed: bool
    idle_since: float

    def close(self) -> None: ...


class TargetState:
    """One backend instance: address, weight, idle connections, in-flight count."""

    __slots__ = (
        "address",
        "drained",
        "healthy",
        "host",
        "idle",
        "in_flight",
        "max_idle",
        "port",
        "stats",
        "upstream",
        "weight",
    )

    def __init__(self, upstream: str, address: str, weight: int, max_idle: int) -> None:
        self.upstream = upstream
        self.address = address
        self.host, self.port = parse_address(address, "address")
        self.weight = weight
        self.max_idle = max_idle
        self.idle: deque[Pooled] = deque()
        self.in_flight = 0
        self.healthy = True
        self.drained = False
        self.stats: TargetStats = target_stats(upstream, address)

    def __repr__(self) -> str:
        return (
            f"<Target {self.address} w={self.weight} in_flight={self.in_flight} idle={len(self.idle)}"
            f"{'' if self.healthy else ' unhealthy'}{' drained' if self.drained else ''}>"
        )

    @property
    def available(self) -> bool:
        return self.healthy and not self.drained

    def take_idle(self) -> Pooled | None:
        idle = self.idle
        while idle:
            conn = idle.pop()  # LIFO: the most recently used connection is the least likely stale
            if not conn.closed:
                return conn
        return None

    def put_idle(self, conn: Pooled, now: float) -> None:
        if len(self.idle) >= self.max_idle or self.drained:
            conn.close()
            return
        conn.idle_since = now
        self.idle.append(conn)

    def close_idle_older_than(self, deadline: float) -> None:
        idle = self.idle
        while idle and (idle[0].closed or idle[0].idle_since < deadline):
            idle.popleft().close()

    def close_all_idle(self) -> None:
        while self.idle:
            self.idle.pop().close()


class Pool:
    """A named upstream: its targets and the balancer choosing among the available ones."""

    __slots__ = ("_lr", "_rr", "_weights", "config", "forced_null", "name", "targets")

    def __init__(
        self,
        name: str,
        config: Upstream,
        previous: dict[str, TargetState] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.forced_null = False  # the operator's manual switch: all traffic to the null upstream
        previous = previous or {}
        self.targets: list[TargetState] = []
        for t in config.targets:
            state = previous.get(t.address)
            if state is None:
                state = TargetState(name, t.address, t.weight, config.keepalive)
            else:
                state.weight = t.weight
                state.max_idle = config.keepalive
            self.targets.append(state)
        p2c = config.balance == "least_request"
        self._lr = LeastRequestP2C(rng or random.Random()) if p2c else None
        self._rr = None if p2c else SmoothWeightedRoundRobin(len(self.targets))
        self._weights: list[float] = []
        self.refresh()

    def __repr__(self) -> str:
        return f"<Pool {self.name} {self.targets!r}>"

    def refresh(self) -> None:
        """Recompute effective weights after any availability change (health, drain)."""
        self._weights = [float(t.weight) if t.available else 0.0 for t in self.targets]

    def pick(self) -> TargetState | None:
        if len(self.targets) == 1:
            t = self.targets[0]
            return t if self._weights[0] > 0 else None
        if self._rr is not None:
            i = self._rr.pick(self._weights)
        else:
            assert self._lr is not None
            i = self._lr.pick(self._weights, [t.in_flight for t in self.targets])
        return self.targets[i] if i >= 0 else None

    def target(self, address: str) -> TargetState | None:
        for t in self.targets:
            if t.address == address:
                return t
        return None

    def sweep(self, now: float) -> None:
        deadline = now - self.config.keepalive_timeout
        for t in self.targets:
            t.close_idle_older_than(deadline)


def carry_over(pools: dict[str, Pool]) -> Callable[[str], dict[str, TargetState]]:
    """Previous targets by address for an upstream name, for rebuilding pools on reload."""

    def lookup(name: str) -> dict[str, TargetState]:
        pool = pools.get(name)
        return {t.address: t for t in pool.targets} if pool else {}

    return lookup
