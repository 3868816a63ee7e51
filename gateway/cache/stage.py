"""The cache phase of the request path: lookup, coalescing of misses, stale answers.

The cache policy itself (keys, freshness, storage) is in gateway/cache/store.py and
gateway/policy/freshness.py. Each function takes the client connection (`Downstream`) an exchange
came on and continues through its answer and forward steps.
"""

from __future__ import annotations

from time import monotonic as _now

from gateway.cache.store import Entry, Fill, header_value, refresh
from gateway.pipeline.exchange import AFTER_CACHE, Downstream, Exchange
from gateway.policy.freshness import FRESH, STALE_REVALIDATE


def cached_or_forward(client: Downstream, ex: Exchange) -> None:
    """Answer from the route's cache, join the fill in flight for this key, or become it."""
    route = ex.route
    assert route is not None
    cache = route.cache
    if cache is None:
        client.forward(ex)
        return
    if (
        (ex.method != b"GET" and ex.method != b"HEAD")
        or ex.upgrade is not None
        or (not cache.config.cache_authorized and header_value(ex.headers, b"authorization") is not None)
    ):
        cache.stats.bypass += 1
        ex.cache_status = "BYPASS"
        client.forward(ex)
        return
    key = cache.key(ex.method, ex.host.lower(), ex.url, ex.headers)
    entry, st, age = cache.lookup(key, ex.headers)
    if entry is not None:
        if st == FRESH:
            cache.stats.hits += 1
            serve_entry(client, ex, entry, age, "HIT")
            return
        if st == STALE_REVALIDATE:
            cache.stats.stale["revalidate"] = cache.stats.stale.get("revalidate", 0) + 1
            serve_entry(client, ex, entry, age, "STALE")
            pool = route.pool
            if pool is not None and key not in cache.revalidating:
                cache.revalidating.add(key)
                client.loop.create_task(refresh(cache, key, pool, ex.method, ex.url, ex.host, ex.headers))
            return
        ex.stale_entry = entry  # past its ttl: only for stale-if-error
    ex.cache_key = key
    fill = cache.fills.get(key)
    now = _now()
    if fill is not None:
        cache.stats.coalesced += 1
        fill.waiters.append(ex)
        ex.cache_wait = fill
        ex.cache_wait_since = now
        return
    if not ex.head_only:
        cache.fills[key] = Fill(now)
        ex.cache_fill = True
    cache.stats.misses += 1
    ex.cache_status = "MISS"
    client.forward(ex)


def serve_entry(client: Downstream, ex: Exchange, entry: Entry, age_s: float, label: str) -> None:
    route = ex.route
    assert route is not None and route.cache is not None
    close = not ex.keep_alive or not ex.request_done
    ex.canned = entry.response(age_s, route.cache.label_line(label), close, ex.head_only)
    ex.status = entry.status
    ex.cache_status = label
    ex.response_bytes = len(entry.body)
    client.answer_local(ex)


def _stale_age(client: Downstream, ex: Exchange) -> float | None:
    """Age of `ex`'s stale entry if it may answer now (exists, within grace, nothing answered yet)."""
    entry = ex.stale_entry
    route = ex.route
    if entry is None or route is None or route.cache is None or client.closed or ex.status != 0:
        return None
    age: float = route.cache.clock() - entry.stored_at
    life = entry.life
    return age if age < life.ttl + max(life.stale_if_error, life.stale_while_revalidate) else None


def can_serve_stale(client: Downstream, ex: Exchange) -> bool:
    """Whether serve_stale would answer `ex` now."""
    return _stale_age(client, ex) is not None


def serve_stale(client: Downstream, ex: Exchange, reason: str) -> bool:
    """stale-if-error: answer from the stale entry, if this exchange has a usable one."""
    age = _stale_age(client, ex)
    entry = ex.stale_entry
    ex.stale_entry = None
    route = ex.route
    if age is None or entry is None or route is None or route.cache is None:
        return False
    stale = route.cache.stats.stale
    stale[reason] = stale.get(reason, 0) + 1
    up = ex.upstream
    if up is not None:
        up.abandon()
        ex.upstream = None
    serve_entry(client, ex, entry, age, "STALE")
    return True


def cache_wakeup(client: Downstream, ex: Exchange, entry: Entry | None, refill: bool = False) -> None:
    """The fill this exchange waited on finished: continue it (after_fill) if it is still wanted."""
    ex.cache_wait = None
    ex.fill_entry = entry
    ex.fill_refill = refill
    client.resume_exchange(ex, AFTER_CACHE)


def after_fill(client: Downstream, ex: Exchange) -> None:
    """Serve what the awaited fill stored, or go upstream."""
    entry = ex.fill_entry
    refill = ex.fill_refill
    ex.fill_entry = None
    route = ex.route
    if entry is not None and route is not None and route.cache is not None:
        if entry.matches(ex.headers):
            serve_entry(client, ex, entry, route.cache.clock() - entry.stored_at, "HIT")
        else:
            cached_or_forward(client, ex)  # the fill stored another Vary variant: find or fill ours
    elif refill:
        cached_or_forward(client, ex)  # the fill's client left unanswered: one waiter takes over
    elif not serve_stale(client, ex, "error"):
        client.forward(ex)


def leave_cache(client: Downstream, ex: Exchange) -> None:
    route = ex.route
    cache = route.cache if route is not None else None
    if cache is None or ex.cache_key is None:
        return
    if ex.cache_wait is not None:
        waiters = ex.cache_wait.waiters
        if ex in waiters:
            waiters.remove(ex)
        ex.cache_wait = None
    if ex.cache_fill:
        ex.cache_fill = False
        fill = cache.fills.pop(ex.cache_key, None)
        if fill is not None:
            for w in fill.waiters:
                if w.client is not None:
                    cache_wakeup(w.client, w, ex.cache_entry, ex.status == 0)
