"""The rate-limit phase's local decision: every limit of a route must pass (two-phase).

Apart from the limiter (buckets, keys, rejections) because it reads the exchange: the route table
builds limiters, and nothing the route table imports may import the exchange.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.ratelimit.limiter import Limiter, reject

if TYPE_CHECKING:
    from gateway.pipeline.exchange import Exchange


def admit(limiters: tuple[Limiter, ...], ex: Exchange, client_ip: str) -> bytes | None:
    """None if admitted (tokens taken from every bucket); else the complete rejection response."""
    if len(limiters) == 1:  # the common case: one lookup, one clock read
        lim = limiters[0]
        key = lim.key_of(ex.headers, client_ip)
        wait = lim.table.take(key)
        if wait > 0.0:
            lim.counts[1] += 1
            return reject(lim, key, wait, close=not ex.keep_alive or not ex.request_done, head=ex.head_only)
        lim.counts[0] += 1
        if lim.config.headers:
            ex.extra_headers = lim.header_lines(lim.table.remaining(key), lim.table.reset_s(key))
        return None
    keys = [lim.key_of(ex.headers, client_ip) for lim in limiters]
    for lim, key in zip(limiters, keys, strict=True):
        wait = lim.table.check(key)
        if wait > 0.0:
            lim.counts[1] += 1
            return reject(lim, key, wait, close=not ex.keep_alive or not ex.request_done, head=ex.head_only)
    extra: list[bytes] | None = None
    for lim, key in zip(limiters, keys, strict=True):
        lim.table.consume(key)
        lim.counts[0] += 1
        if lim.config.headers:
            if extra is None:
                extra = []
            extra.append(lim.header_lines(lim.table.remaining(key), lim.table.reset_s(key)))
    if extra is not None:
        ex.extra_headers = b"".join(extra)
    return None
