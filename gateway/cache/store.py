"""Micro-cache of one route: byte-bounded LRU of ready-to-send responses, plus in-flight fills.

Rules:
- an entry is stored as the response head (status line and end-to-end headers, without framing
  or connection headers) and the body bytes, so a hit costs one join and one write;
- the key is built from the configured request parts (HEAD shares GET's entry) plus the
  configured `vary` headers; a response's own `Vary` adds a secondary key: each primary key
  holds a few variants, matched on the request's values of the Vary-named headers;
- concurrent misses for one key coalesce: the first becomes the fill (goes upstream), the others
  wait on it up to `lock_timeout`, then are answered from what the fill stored, or go upstream
  themselves if it could not be stored (like nginx's proxy_cache_lock);
- memory is bounded by `max_bytes` (LRU by primary key); objects over `max_object_bytes` are
  never stored;
- freshness decisions are `gateway.policy.freshness` (pure); this module owns storage only.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp

from gateway.config.model import Cache as CacheConfig
from gateway.observe.stats import CacheStats, cache_stats
from gateway.policy.freshness import EXPIRED, Lifetimes, lifetimes, state


class Entry:
    __slots__ = (
        "body",
        "head",
        "hit",
        "life",
        "size",
        "status",
        "stored_at",
        "vary_names",
        "vary_values",
    )

    def __init__(
        self,
        status: int,
        head: bytes,
        body: bytes,
        life: Lifetimes,
        stored_at: float,
        vary_names: tuple[bytes, ...],
        vary_values: tuple[bytes | None, ...],
    ) -> None:
        self.status = status
        self.head = head
        self.body = body
        self.life = life
        self.stored_at = stored_at
        self.vary_names = vary_names
        self.vary_values = vary_values
        self.size = len(head) + len(body) + 200
        # The last keep-alive answer built, as (age in whole seconds, label line, bytes): hits within
        # the same second get the same bytes.
        self.hit: tuple[int, bytes | None, bytes] | None = None

    def __repr__(self) -> str:
        return f"<Entry {self.status} {len(self.body)}B ttl={self.life.ttl}>"

    def matches(self, headers: Sequence[tuple[bytes, bytes]]) -> bool:
        """Whether a request with `headers` is served by this variant (its Vary fields agree)."""
        return not self.vary_names or all(
            header_value(headers, n) == v for n, v in zip(self.vary_names, self.vary_values, strict=True)
        )

    def response(self, age_s: float, label: bytes | None, close: bool, head_only: bool) -> bytes:
        if close or head_only:
            return self._build(age_s, label, close, head_only)
        hit = self.hit
        age = int(age_s)
        if hit is not None and hit[0] == age and hit[1] == label:
            return hit[2]
        out = self._build(age_s, label, False, False)
        self.hit = (age, label, out)
        return out

    def _build(self, age_s: float, label: bytes | None, close: bool, head_only: bool) -> bytes:
        parts = [self.head, b"Content-Length: %d\r\nAge: %d\r\n" % (len(self.body), int(age_s))]
        if label is not None:
            parts.append(label)
        if close:
            parts.append(b"Connection: close\r\n")
        parts.append(b"\r\n")
        if not head_only:
            parts.append(self.body)
        return b"".join(parts)


@dataclass
class Fill:
    """One miss in flight; `waiters` are exchanges coalesced onto it."""

    started: float
    waiters: list[Any] = field(default_factory=list)


def header_value(headers: Sequence[tuple[bytes, bytes]], lname: bytes) -> bytes | None:
    for n, v in headers:
        if n.lower() == lname:
            return v
    return None


_METHOD: Final = 0
_HOST: Final = 1
_PATH: Final = 2
_QUERY: Final = 3
_KEY_PARTS: Final = {"method": _METHOD, "host": _HOST, "path": _PATH, "query": _QUERY}


class RouteCache:
    """The cache of one route (carried over reloads while its settings are unchanged)."""

    def __init__(self, route: str, config: CacheConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.route = route
        self.config = config
        self.clock = clock
        self.entries: OrderedDict[bytes, list[Entry]] = OrderedDict()
        self.fills: dict[bytes, Fill] = {}
        self.revalidating: set[bytes] = set()
        self.bytes = 0
        self.parts = config.key
        self._codes = tuple(_KEY_PARTS[p] for p in config.key)  # compared as ints per request
        self.vary = tuple(v.lower().encode() for v in config.vary)
        self.label = config.header.encode() if config.header else None
        self._label_lines: dict[str, bytes] = {}
        self.stats: CacheStats = cache_stats(route)

    def __repr__(self) -> str:
        return (
            f"<RouteCache {self.route} keys={len(self.entries)} bytes={self.bytes} fills={len(self.fills)}>"
        )

    def label_line(self, status: str) -> bytes | None:
        if self.label is None:
            return None
        line = self._label_lines.get(status)
        if line is None:
            line = self._label_lines[status] = self.label + b": " + status.encode() + b"\r\n"
        return line

    def key(self, method: bytes, host: bytes, url: bytes, headers: Sequence[tuple[bytes, bytes]]) -> bytes:
        path, _, query = url.partition(b"?")  # (one call without argument parsing, unlike find)
        parts = []
        for p in self._codes:
            if p == _METHOD:
                parts.append(b"GET" if method == b"HEAD" else method)
            elif p == _HOST:
                parts.append(host)
            elif p == _PATH:
                parts.append(path)
            else:
                parts.append(query)
        for name in self.vary:
            parts.append(header_value(headers, name) or b"")
        return b"\x00".join(parts)

    def lookup(self, key: bytes, headers: Sequence[tuple[bytes, bytes]]) -> tuple[Entry | None, str, float]:
        """(entry, freshness state, age) of the variant matching the request; (None, EXPIRED, 0) if none."""
        variants = self.entries.get(key)
        if not variants:
            return None, EXPIRED, 0.0
        now = self.clock()
        for e in variants:
            if e.matches(headers):
                age = now - e.stored_at
                st = state(age, e.life)
                if st == EXPIRED:
                    self._remove(key, e)
                    return None, EXPIRED, 0.0
                self.entries.move_to_end(key)
                return e, st, age
        return None, EXPIRED, 0.0

    def store(self, key: bytes, entry: Entry) -> bool:
        if (
            entry.size > self.config.max_object_bytes + len(entry.head) + 200
            or entry.size > self.config.max_bytes
        ):
            return False
        variants = self.entries.setdefault(key, [])
        for old in list(variants):
            if old.vary_names == entry.vary_names and old.vary_values == entry.vary_values:
                variants.remove(old)
                self.bytes -= old.size
        variants.append(entry)
        self.bytes += entry.size
        self.entries.move_to_end(key)
        self.stats.stores += 1
        while self.bytes > self.config.max_bytes and self.entries:
            _, evicted = self.entries.popitem(last=False)
            for e in evicted:
                self.bytes -= e.size
                self.stats.evictions += 1
        return True

    def _remove(self, key: bytes, entry: Entry) -> None:
        variants = self.entries.get(key)
        if variants and entry in variants:
            variants.remove(entry)
            self.bytes -= entry.size
            if not variants:
                del self.entries[key]

    def purge(self, prefix: bytes = b"") -> int:
        """Drop every entry whose key's path part starts with `prefix` (all when empty)."""
        if not prefix:
            n = len(self.entries)
            self.entries.clear()
            self.bytes = 0
            return n
        idx = self.parts.index("path") if "path" in self.parts else -1
        doomed = [k for k in self.entries if idx >= 0 and k.split(b"\x00")[idx].startswith(prefix)]
        for k in doomed:
            for e in self.entries.pop(k):
                self.bytes -= e.size
        return len(doomed)


class Capture:
    """The body of a cache fill as it streams to the client; stored when the response completes."""

    __slots__ = ("body", "cache", "head", "life", "size", "status", "vary_names", "vary_values")

    def __init__(
        self,
        cache: RouteCache,
        status: int,
        head: bytes,
        life: Lifetimes,
        vary_names: tuple[bytes, ...],
        vary_values: tuple[bytes | None, ...],
    ) -> None:
        self.cache = cache
        self.status = status
        self.head = head
        self.life = life
        self.vary_names = vary_names
        self.vary_values = vary_values
        self.body: list[bytes] = []
        self.size = 0

    def add(self, data: bytes) -> bool:
        self.size += len(data)
        if self.size > self.cache.config.max_object_bytes:
            return False
        self.body.append(data)
        return True

    def store(self, ex: Any) -> None:
        entry = Entry(
            self.status,
            self.head,
            b"".join(self.body),
            self.life,
            self.cache.clock(),
            self.vary_names,
            self.vary_values,
        )
        if ex.cache_key is not None and self.cache.store(ex.cache_key, entry):
            ex.cache_entry = entry


def _parse_head_lines(lines: Sequence[bytes]) -> tuple[list[bytes], bool, bytes | None]:
    """(Cache-Control values, has Set-Cookie, Vary) from `Name: value\\r\\n` lines."""
    cc: list[bytes] = []
    set_cookie = False
    vary: bytes | None = None
    for line in b"".join(lines).split(b"\r\n"):
        name, _, value = line.partition(b":")
        lname = name.strip().lower()
        if lname == b"cache-control":
            cc.append(value.strip())
        elif lname == b"set-cookie":
            set_cookie = True
        elif lname == b"vary":
            vary = value.strip() if vary is None else vary + b"," + value.strip()
    return cc, set_cookie, vary


def start_capture(
    cache: RouteCache, ex: Any, status: int, parts: list[bytes], cl: bytes | None
) -> Capture | None:
    """Decide at response-head time whether a fill's answer will be stored (RFC 9111 rules)."""
    if ex.head_only:
        return None
    cc, set_cookie, vary = _parse_head_lines(parts[1:])
    names = tuple(sorted({v.strip().lower() for v in vary.split(b",") if v.strip()})) if vary else ()
    cfg = cache.config
    life = lifetimes(
        status,
        cc,
        route_ttl=cfg.ttl,
        route_swr=cfg.stale_while_revalidate,
        route_sie=cfg.stale_if_error,
        has_set_cookie=set_cookie,
        request_authorized=header_value(ex.headers, b"authorization") is not None,
        allow_set_cookie=cfg.cache_set_cookie,
        allow_authorized=cfg.cache_authorized,
        vary_star=b"*" in names,
    )
    if life is None or (cl is not None and cl.isdigit() and int(cl) > cfg.max_object_bytes):
        return None
    lines = b"".join(parts[1:]).split(b"\r\n")
    head = parts[0] + b"".join(h + b"\r\n" for h in lines if h and h[:4].lower() != b"age:")
    return Capture(cache, status, head, life, names, tuple(header_value(ex.headers, n) for n in names))


_SESSION: aiohttp.ClientSession | None = None
_SESSION_LOOP: asyncio.AbstractEventLoop | None = None
_REFRESH_RETRY_S = 1.0  # after a refresh that stored nothing
_SKIP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "age", "upgrade", "te"})
# Request headers a refresh does not copy from the request that triggered it: framing, the host
# (set apart) and conditionals (a 304 or 206 could not refresh the entry).
_NOT_FORWARDED = frozenset({n.encode() for n in _SKIP}) | {
    b"host",
    b"proxy-connection",
    b"range",
    b"if-range",
    b"if-match",
    b"if-none-match",
    b"if-modified-since",
    b"if-unmodified-since",
}


async def refresh(
    cache: RouteCache,
    key: bytes,
    pool: Any,
    method: bytes,
    url: bytes,
    host: bytes,
    headers: Sequence[tuple[bytes, bytes]],
) -> None:
    """stale-while-revalidate: refetch one key in the background (once at a time per key)."""
    global _SESSION, _SESSION_LOOP
    stored = False
    try:
        circuit = pool.circuit
        if pool.forced_null or (circuit is not None and circuit.state != "closed"):
            return  # the operator's null switch or the breaker keeps traffic away from this upstream
        target = pool.pick()
        if target is None:
            return
        loop = asyncio.get_running_loop()
        if _SESSION is None or _SESSION.closed or _SESSION_LOOP is not loop:
            # No cookie jar: a Set-Cookie answered to one refresh must not ride along on the next.
            _SESSION = aiohttp.ClientSession(auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar())
            _SESSION_LOOP = loop
        # The request's own headers (its Vary variant: Accept-Encoding...), and no aiohttp defaults.
        req_headers = [
            (n.decode("latin-1"), v.decode("latin-1")) for n, v in headers if n.lower() not in _NOT_FORWARDED
        ]
        if host:
            req_headers.append(("Host", host.decode("latin-1")))
        scheme = "https" if pool.ssl_context is not None else "http"
        async with _SESSION.get(
            f"{scheme}://{target.address}{url.decode('latin-1')}",
            headers=req_headers,
            skip_auto_headers=("Accept-Encoding", "User-Agent"),
            timeout=aiohttp.ClientTimeout(total=30),
            allow_redirects=False,
            ssl=pool.ssl_context if pool.ssl_context is not None else True,
        ) as resp:
            body = await resp.read()
            lines = [
                f"{k}: {v}\r\n".encode("latin-1") for k, v in resp.headers.items() if k.lower() not in _SKIP
            ]
            status_line = b"HTTP/1.1 %d %s\r\n" % (resp.status, (resp.reason or "").encode("latin-1"))
            parts = [status_line, *lines]
            fake = _Req(headers)
            cap = start_capture(cache, fake, resp.status, parts, str(len(body)).encode())
            if cap is not None and cap.add(body):
                fake.cache_key = key
                cap.store(fake)
                cache.stats.revalidations += 1
                stored = True
    except (aiohttp.ClientError, TimeoutError, OSError):
        pass
    finally:
        if stored:
            cache.revalidating.discard(key)
        else:
            # Nothing stored (upstream down or switched off, 5xx...): the next try of this key waits a
            # moment, rather than one try per stale answer (a storm of failing connects).
            asyncio.get_running_loop().call_later(_REFRESH_RETRY_S, cache.revalidating.discard, key)


async def close_refresh_session() -> None:
    """Close the background-refresh client (when the proxy stops)."""
    global _SESSION
    session, _SESSION = _SESSION, None
    if session is not None and not session.closed:
        await session.close()


class _Req:
    """The few request fields `start_capture` reads, for a background refresh."""

    def __init__(self, headers: Sequence[tuple[bytes, bytes]]) -> None:
        self.headers = headers
        self.head_only = False
        self.cache_key: bytes | None = None
        self.cache_entry: Entry | None = None
