"""RouteCache storage with a manual clock: keys, Vary variants, byte-bounded LRU, object limit, purge."""

from __future__ import annotations

import random
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

from gateway.cache.store import Capture, Entry, RouteCache, start_capture
from gateway.config.model import Cache
from gateway.policy.freshness import EXPIRED, FRESH, STALE_ERROR_ONLY, STALE_REVALIDATE, Lifetimes
from tests.helpers import ManualClock

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
LIFE = Lifetimes(ttl=10.0, stale_while_revalidate=5.0, stale_if_error=60.0)
H = Sequence[tuple[bytes, bytes]]


def make(clock: ManualClock | None = None, **cfg: Any) -> RouteCache:
    return RouteCache("test-store", Cache(**cfg), clock=clock or ManualClock())


def entry(
    c: RouteCache,
    body: bytes = b"x",
    vary: tuple[bytes, ...] = (),
    values: tuple[bytes | None, ...] = (),
    life: Lifetimes = LIFE,
) -> Entry:
    return Entry(200, HEAD, body, life, c.clock(), vary, values)


def k(
    c: RouteCache, url: bytes, method: bytes = b"GET", host: bytes = b"example.com", headers: H = ()
) -> bytes:
    return c.key(method, host, url, list(headers))


# ---- keys ----------------------------------------------------------------------------------------


def test_head_shares_get_key_other_methods_do_not() -> None:
    c = make()
    assert k(c, b"/a", b"HEAD") == k(c, b"/a", b"GET")
    assert k(c, b"/a", b"POST") != k(c, b"/a", b"GET")


def test_default_key_has_host_path_and_query() -> None:
    c = make()
    assert k(c, b"/a?x=1") != k(c, b"/a?x=2")
    assert k(c, b"/a?x=1") != k(c, b"/a")
    assert k(c, b"/a", host=b"one.example") != k(c, b"/a", host=b"two.example")
    assert k(c, b"/a") != k(c, b"/b")


def test_query_left_out_of_key() -> None:
    c = make(key=("method", "host", "path"))
    assert k(c, b"/a?x=1") == k(c, b"/a?x=2") == k(c, b"/a")
    assert k(c, b"/a?x=1") != k(c, b"/b?x=1")


def test_host_left_out_of_key() -> None:
    c = make(key=("method", "path", "query"))
    assert k(c, b"/a", host=b"one.example") == k(c, b"/a", host=b"two.example")


def test_configured_vary_headers_join_the_key() -> None:
    c = make(vary=("Accept-Language",))
    en = k(c, b"/a", headers=[(b"accept-language", b"en")])
    assert en == k(c, b"/a", headers=[(b"Accept-Language", b"en")])  # header names case-insensitive
    assert en != k(c, b"/a", headers=[(b"Accept-Language", b"fr")])
    assert en != k(c, b"/a")
    assert k(c, b"/a", headers=[(b"X-Other", b"1")]) == k(c, b"/a")  # unlisted headers do not count


# ---- lookup, freshness over time -----------------------------------------------------------------


def test_lookup_states_follow_the_clock_and_expired_entries_are_dropped() -> None:
    clock = ManualClock()
    c = make(clock)
    key = k(c, b"/a")
    assert c.lookup(key, []) == (None, EXPIRED, 0.0)
    e = entry(c, b"body")
    assert c.store(key, e)
    assert c.lookup(key, []) == (e, FRESH, 0.0)
    clock.now += 10.0
    assert c.lookup(key, [])[:2] == (e, STALE_REVALIDATE)
    clock.now += 5.0
    assert c.lookup(key, [])[:2] == (e, STALE_ERROR_ONLY)
    clock.now += 54.9  # ttl + stale_if_error = 70 s
    got, st, age = c.lookup(key, [])
    assert (got, st) == (e, STALE_ERROR_ONLY) and abs(age - 69.9) < 1e-9
    clock.now += 0.1
    assert c.lookup(key, []) == (None, EXPIRED, 0.0)
    assert key not in c.entries and c.bytes == 0


def test_store_replaces_the_same_variant_and_keeps_bytes_exact() -> None:
    c = make()
    key = k(c, b"/a")
    c.store(key, entry(c, b"old" * 10))
    new = entry(c, b"new")
    c.store(key, new)
    assert c.entries[key] == [new]
    assert c.bytes == new.size


def test_entry_response_adds_length_age_label_and_close() -> None:
    c = make()
    e = entry(c, b"hello")
    raw = e.response(3.7, c.label_line("HIT"), close=True, head_only=False)
    assert raw == HEAD + b"Content-Length: 5\r\nAge: 3\r\nX-Cache: HIT\r\nConnection: close\r\n\r\nhello"
    head_only = e.response(0.0, None, close=False, head_only=True)
    assert head_only == HEAD + b"Content-Length: 5\r\nAge: 0\r\n\r\n"


def test_entry_response_is_rebuilt_when_the_age_second_or_label_changes() -> None:
    """Keep-alive hits reuse the bytes built for the same whole-second age and label, and only those."""
    c = make()
    e = entry(c, b"hello")
    hit, stale = c.label_line("HIT"), c.label_line("STALE")
    first = e.response(3.1, hit, close=False, head_only=False)
    assert first == HEAD + b"Content-Length: 5\r\nAge: 3\r\nX-Cache: HIT\r\n\r\nhello"
    assert e.response(3.9, hit, close=False, head_only=False) is first  # same second: the same bytes
    assert b"Age: 4\r\n" in e.response(4.0, hit, close=False, head_only=False)
    assert b"X-Cache: STALE\r\n" in e.response(4.2, stale, close=False, head_only=False)
    assert b"Connection: close" in e.response(4.2, stale, close=True, head_only=False)
    assert e.response(4.2, None, close=False, head_only=False).endswith(b"Age: 4\r\n\r\nhello")


# ---- Vary variants -------------------------------------------------------------------------------


def test_vary_keeps_one_variant_per_header_value() -> None:
    c = make()
    key = k(c, b"/a")
    ae = (b"accept-encoding",)
    gz = entry(c, b"gzipped", ae, (b"gzip",))
    plain = entry(c, b"plain", ae, (None,))
    assert c.store(key, gz) and c.store(key, plain)
    assert len(c.entries) == 1 and len(c.entries[key]) == 2
    assert c.lookup(key, [(b"Accept-Encoding", b"gzip")])[0] is gz
    assert c.lookup(key, [])[0] is plain
    assert c.lookup(key, [(b"Accept-Encoding", b"br")])[0] is None  # no such variant yet: a miss
    br = entry(c, b"brotli", ae, (b"br",))
    c.store(key, br)
    assert c.lookup(key, [(b"accept-encoding", b"br")])[0] is br
    assert c.bytes == gz.size + plain.size + br.size


def test_expired_variant_removed_alone() -> None:
    clock = ManualClock()
    c = make(clock)
    key = k(c, b"/a")
    ae = (b"accept-encoding",)
    short = entry(c, b"gz", ae, (b"gzip",), life=Lifetimes(1.0, 0.0, 0.0))
    long = entry(c, b"id", ae, (None,))
    c.store(key, short)
    c.store(key, long)
    clock.now += 2.0
    assert c.lookup(key, [(b"Accept-Encoding", b"gzip")])[0] is None
    assert c.entries[key] == [long] and c.bytes == long.size


# ---- LRU by bytes --------------------------------------------------------------------------------


def test_lru_evicts_least_recently_used_key() -> None:
    probe = make()
    size = entry(probe, b"x" * 100).size
    c = make(max_bytes=3 * size)
    keys = [k(c, f"/{i}".encode()) for i in range(4)]
    for key in keys[:3]:
        assert c.store(key, entry(c, b"x" * 100))
    assert c.lookup(keys[0], [])[0] is not None  # /0 is now the most recently used
    c.store(keys[3], entry(c, b"x" * 100))
    assert list(c.entries) == [keys[2], keys[0], keys[3]]  # /1 was least recently used
    assert c.bytes == 3 * size <= c.config.max_bytes
    assert c.stats.evictions >= 1


def test_total_bytes_bounded_after_many_inserts() -> None:
    c = RouteCache(
        "test-store-many", Cache(max_bytes=64 * 1024, max_object_bytes=8 * 1024), clock=ManualClock()
    )
    rng = random.Random(7)
    for i in range(5000):
        body = b"y" * rng.randrange(0, 8 * 1024)
        c.store(k(c, f"/k{i}".encode()), entry(c, body))
        assert c.bytes <= 64 * 1024
    assert c.bytes == sum(e.size for v in c.entries.values() for e in v)
    assert 0 < len(c.entries) < 5000
    assert k(c, b"/k4999") in c.entries  # the newest always fits


def test_max_object_bytes_and_max_bytes_limits() -> None:
    c = make(max_bytes=10_000, max_object_bytes=1000)
    assert c.store(k(c, b"/ok"), entry(c, b"z" * 1000))  # exactly the limit is fine
    assert not c.store(k(c, b"/big"), entry(c, b"z" * 1001))
    assert k(c, b"/big") not in c.entries
    small = make(max_bytes=500, max_object_bytes=1000)
    assert not small.store(k(small, b"/x"), entry(small, b"z" * 400))  # larger than the whole cache
    assert small.bytes == 0 and not small.entries


# ---- purge ---------------------------------------------------------------------------------------


def test_purge_by_path_prefix() -> None:
    c = make()
    for url in (b"/a", b"/a/1", b"/a/2?q=1", b"/ab", b"/b", b"/b/a"):
        c.store(k(c, url), entry(c))
    assert c.purge(b"/a/") == 2
    assert c.purge(b"/a") == 2  # /a and /ab
    assert sorted(key.split(b"\x00")[2] for key in c.entries) == [b"/b", b"/b/a"]
    assert c.bytes == sum(e.size for v in c.entries.values() for e in v)
    assert c.purge(b"") == 2
    assert not c.entries and c.bytes == 0


def test_purge_prefix_without_path_in_key_drops_nothing() -> None:
    c = make(key=("method", "host"))
    c.store(k(c, b"/a"), entry(c))
    assert c.purge(b"/a") == 0 and len(c.entries) == 1


# ---- capture decisions at response-head time ------------------------------------------------------


def fake_ex(headers: H = (), head_only: bool = False) -> Any:
    return SimpleNamespace(headers=list(headers), head_only=head_only, cache_key=None, cache_entry=None)


def parts(*lines: bytes, status: bytes = b"HTTP/1.1 200 OK\r\n") -> list[bytes]:
    return [status, *(line + b"\r\n" for line in lines)]


def test_start_capture_strips_age_and_records_vary() -> None:
    c = make()
    ex = fake_ex([(b"Accept-Encoding", b"gzip")])
    cap = start_capture(c, ex, 200, parts(b"Age: 40", b"Vary: Accept-Encoding, Accept", b"ETag: x"), b"3")
    assert isinstance(cap, Capture)
    assert b"Age:" not in cap.head and b"ETag: x\r\n" in cap.head
    assert cap.vary_names == (b"accept", b"accept-encoding")
    assert cap.vary_values == (None, b"gzip")
    cap.add(b"abc")
    ex.cache_key = k(c, b"/v")
    cap.store(ex)
    assert ex.cache_entry is not None and ex.cache_entry.body == b"abc"
    assert c.lookup(ex.cache_key, [(b"accept-encoding", b"gzip")])[0] is ex.cache_entry
    assert c.lookup(ex.cache_key, [(b"accept-encoding", b"br")])[0] is None


def test_start_capture_refusals() -> None:
    c = make(max_object_bytes=100)
    assert start_capture(c, fake_ex(), 200, parts(b"Cache-Control: no-store"), b"1") is None
    assert start_capture(c, fake_ex(), 200, parts(b"Cache-Control: private"), b"1") is None
    assert start_capture(c, fake_ex(), 200, parts(b"Set-Cookie: a=b"), b"1") is None
    assert start_capture(c, fake_ex(), 200, parts(b"Vary: *"), b"1") is None
    assert start_capture(c, fake_ex([(b"Authorization", b"x")]), 200, parts(), b"1") is None
    assert start_capture(c, fake_ex(), 500, parts(), b"1") is None
    assert start_capture(c, fake_ex(), 200, parts(), b"101") is None  # declared length over the limit
    assert start_capture(c, fake_ex(head_only=True), 200, parts(), b"1") is None
    allowed = make(cache_set_cookie=True, cache_authorized=True)
    ex = fake_ex([(b"Authorization", b"x")])
    assert start_capture(allowed, ex, 200, parts(b"Set-Cookie: a=b"), b"1") is not None


def test_capture_gives_up_past_max_object_bytes() -> None:
    c = make(max_object_bytes=10)
    cap = start_capture(c, fake_ex(), 200, parts(), None)  # chunked: length unknown up front
    assert cap is not None
    assert cap.add(b"x" * 6)
    assert not cap.add(b"x" * 5)
