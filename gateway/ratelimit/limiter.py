"""Rate-limit stage: per-route token buckets (GCRA tables from policy/), keys, and 429 answers.

Rules:
- a request must pass every limit of its route; the check is two-phase (check all, then consume
  all) so a rejected request takes no token from any bucket;
- `client_ip` is the socket peer; only when the peer is a trusted proxy is X-Forwarded-For
  walked from the right past trusted hops (a client-sent header is never believed by default);
- a request without the keyed header shares one bucket named "missing" per limit;
- tables carry over a reload when the limit is unchanged (same route, name and parameters).
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from gateway import http1
from gateway.config.model import RateLimit
from gateway.observe import stats
from gateway.policy.token_bucket import RateTable


class LimitStore(Protocol):
    """A shared bucket store (Redis) deciding for several workers/instances at once."""

    def usable(self) -> bool:
        """False while the store is known to be down: the caller decides locally, without waiting."""
        ...

    async def admit(self, limiters: tuple[Limiter, ...], ex: Any, client_ip: str) -> bytes | None:
        """Like `admit()`, atomically in the store; on error/timeout falls back per `on_error`."""
        ...

    def begin(self, limiters: tuple[Limiter, ...], ex: Any, client_ip: str, done: Decided) -> None:
        """`admit` for the request path: calls `done(ex, rejection or None)` once decided.

        Why a callback: a task and a coroutine per limited request cost more than the decision.
        """
        ...


Decided = Callable[[Any, "bytes | None"], None]  # (the Exchange begun with, rejection or None)


MISSING = "\x00missing"
ROUTE = "\x00route"
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ClientIp:
    """Finds the client address, trusting X-Forwarded-For only from configured proxies."""

    __slots__ = ("networks",)

    def __init__(self, cidrs: Sequence[str]) -> None:
        self.networks: tuple[Network, ...] = tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)

    def _trusted(self, addr: str) -> bool:
        try:
            ip = ipaddress.ip_address(addr.strip())
        except ValueError:
            return False
        return any(ip in n for n in self.networks)

    def of(self, peer: str, forwarded_for: bytes | None) -> str:
        client = peer
        if not self.networks or forwarded_for is None or not self._trusted(client):
            return client
        hops = [h.strip() for h in forwarded_for.decode("latin-1").split(",") if h.strip()]
        for hop in reversed(hops):
            if not self._trusted(hop):
                return hop
        return hops[0] if hops else client


class Limiter:
    """One configured limit of one route with its bucket table and precomputed header pieces."""

    __slots__ = (
        "config",
        "counts",
        "header",
        "kind",
        "label",
        "policy",
        "rejections",
        "route",
        "signature",
        "status_line",
        "table",
    )

    def __init__(
        self, route: str, config: RateLimit, previous: Limiter | None, clock: Callable[[], float]
    ) -> None:
        self.route = route
        self.config = config
        self.label = config.label
        self.signature = (
            route,
            config.label,
            config.rate,
            config.per,
            config.bucket,
            config.key,
            config.max_keys,
        )
        if previous is not None and previous.signature == self.signature:
            self.table: RateTable = previous.table
        else:
            self.table = RateTable(config.rate, config.per, config.bucket, config.max_keys, clock)
        if config.key == "client_ip":
            self.kind = 0
            self.header = b""
        elif config.key == "route":
            self.kind = 1
            self.header = b""
        else:
            self.kind = 2
            self.header = config.key[7:].strip().lower().encode()
        window = config.per
        w = int(window) if float(window).is_integer() else window
        q = int(config.rate) if float(config.rate).is_integer() else config.rate
        self.policy = f'"{self.label}";q={q};w={w}'.encode()
        self.status_line = http1.status_line(config.status)
        key = (route, self.label)
        counts = stats.RATELIMIT.get(key)
        if counts is None:
            counts = stats.RATELIMIT[key] = [0, 0]
        self.counts = counts
        # Keyed by Retry-After * 4 + close * 2 + HEAD: an int key hashes for free (a tuple would be
        # built and hashed per rejection).
        self.rejections: dict[int, bytes] = {}

    def __repr__(self) -> str:
        return f"<Limiter {self.route}/{self.label} {self.table!r}>"

    def key_of(self, headers: list[tuple[bytes, bytes]], client_ip: str) -> str:
        kind = self.kind
        if kind == 0:
            return client_ip
        if kind == 1:
            return ROUTE
        name = self.header
        for hn, hv in headers:
            if hn.lower() == name:
                return hv.decode("latin-1")
        return MISSING

    def header_value(self, key: str) -> bytes:
        t = self.table
        return self.rate_value(t.remaining(key), t.reset_s(key))

    def rate_value(self, remaining: int, reset_s: float) -> bytes:
        """The RateLimit field value for `remaining` tokens and a bucket full again in `reset_s`."""
        return b'"%s";r=%d;t=%d' % (self.label.encode(), remaining, math.ceil(reset_s))

    def header_lines(self, remaining: int, reset_s: float) -> bytes:
        """RateLimit-Policy and RateLimit lines of an admitted response (shared with the Redis store)."""
        return (
            b"RateLimit-Policy: "
            + self.policy
            + b"\r\nRateLimit: "
            + self.rate_value(remaining, reset_s)
            + b"\r\n"
        )


def build_limiters(
    route: str,
    configs: Sequence[RateLimit],
    previous: Sequence[Limiter],
    clock: Callable[[], float] = time.monotonic,
) -> tuple[Limiter, ...]:
    by_sig = {p.signature: p for p in previous}
    out = []
    for c in configs:
        sig = (route, c.label, c.rate, c.per, c.bucket, c.key, c.max_keys)
        out.append(Limiter(route, c, by_sig.get(sig), clock))
    return tuple(out)


def reject(lim: Limiter, key: str, wait_s: float, close: bool, head: bool) -> bytes:
    """The complete rejection; built once per (Retry-After, close, HEAD) and then reused, so
    turning a surge away costs a dict lookup and a write."""
    retry = max(1, math.ceil(wait_s))
    cache_key = retry * 4 + (2 if close else 0) + (1 if head else 0)
    done = lim.rejections.get(cache_key)
    if done is not None:
        return done
    if len(lim.rejections) > 256:
        lim.rejections.clear()
    done = lim.rejections[cache_key] = _build_reject(lim, retry, close, head)
    return done


def _build_reject(lim: Limiter, retry: int, close: bool, head: bool) -> bytes:
    status = lim.config.status
    body = b"%d %s: rate limit %s exceeded\n" % (status, http1.reason(status), lim.label.encode())
    parts = [
        lim.status_line,
        b"Retry-After: %d\r\n" % retry,
        b"RateLimit-Policy: " + lim.policy + b"\r\n",
        b'RateLimit: "%s";r=0;t=%d\r\n' % (lim.label.encode(), retry),
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n" % len(body),
    ]
    if close:
        parts.append(b"Connection: close\r\n")
    parts.append(b"\r\n")
    if not head:
        parts.append(body)
    return b"".join(parts)
