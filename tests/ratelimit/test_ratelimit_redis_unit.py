"""RedisLimitStore without a Redis: key encoding, and `on_error` against a port nobody listens on."""

from __future__ import annotations

from typing import Any, Literal

import pytest

from gateway.config.model import RateLimit, RateLimitStore
from gateway.observe import log
from gateway.pipeline.exchange import Exchange
from gateway.ratelimit.limiter import MISSING, ROUTE, Limiter
from gateway.ratelimit.redis_store import RedisLimitStore, encode_key, limit_prefix
from tests.helpers import free_port


def test_keys_are_encoded_unambiguously() -> None:
    assert encode_key(ROUTE) == "!route"
    assert encode_key(MISSING) == "!missing"
    assert encode_key("!route") != "!route"  # a real key can never look like the special ones
    assert encode_key("10.0.0.1") == "10.0.0.1"
    assert encode_key("::1") == "%3A%3A1"
    assert encode_key("a b:c") == "a%20b%3Ac"
    long = encode_key("x" * 65)
    assert long.startswith("#") and len(long) == 41 and long != encode_key("x" * 66)
    assert encode_key("#" + "0" * 40).startswith("%23")  # a real key never looks like a hash
    for key in ("a:b", "a b", "é", "x" * 200, "\t"):
        assert ":" not in encode_key(key) and " " not in encode_key(key)
    assert limit_prefix("p:", "a:b", "c") != limit_prefix("p:", "a", "b:c")
    assert limit_prefix("p:", "my route", "client_ip") == "p:my%20route:client_ip:"


def limiter(route: str, status: int = 429) -> Limiter:
    config = RateLimit(rate=2, per=60.0, burst=2, key="route", status=status)
    return Limiter(route, config, None, lambda: 0.0)


def exchange() -> Exchange:
    ex = Exchange(0.0)
    ex.request_done = True
    return ex


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    monkeypatch.setattr(log, "event", lambda name, **fields: seen.append({"event": name, **fields}))
    return seen


def unreachable(on_error: Literal["allow", "deny"]) -> RateLimitStore:
    return RateLimitStore(redis=f"redis://127.0.0.1:{free_port()}/0", on_error=on_error, timeout=0.2)


async def test_unreachable_allow_decides_with_the_local_bucket(events: list[dict[str, Any]]) -> None:
    store = RedisLimitStore(unreachable("allow"))
    lims = (limiter("unit-allow"),)
    try:
        assert store.usable()
        results = [await store.admit(lims, exchange(), "10.0.0.1") for _ in range(3)]
        assert results[:2] == [None, None]  # the local bucket: burst 2
        assert results[2] is not None and results[2].startswith(b"HTTP/1.1 429")
        assert not store.usable()
        assert (store.errors, store.fallbacks, store.downs, store.decisions) == (1, 3, 1, 0)
        assert [e["state"] for e in events] == ["down"]
    finally:
        await store.close()
    assert store.closed and not store.usable()
    await store.close()  # idempotent


async def test_unreachable_deny_rejects_with_retry_after_1(events: list[dict[str, Any]]) -> None:
    store = RedisLimitStore(unreachable("deny"))
    lim = limiter("unit-deny", status=503)
    before = list(lim.counts)
    try:
        for _ in range(3):
            answer = await store.admit((lim,), exchange(), "10.0.0.1")
            assert answer is not None and answer.startswith(b"HTTP/1.1 503")
            assert b"\r\nRetry-After: 1\r\n" in answer
        assert store.usable()  # deny keeps answering (at once) instead of letting requests through
        assert store.errors == 1 and store.fallbacks == 3
        assert lim.counts == [before[0], before[1] + 3]
        assert [e["state"] for e in events] == ["down"]
    finally:
        await store.close()


async def test_start_against_an_unreachable_redis_marks_it_down(events: list[dict[str, Any]]) -> None:
    store = RedisLimitStore(unreachable("allow"))
    try:
        await store.start()  # never raises
        assert not store.healthy and store.downs == 1
    finally:
        await store.close()
    # a closed store lets the local buckets decide, without counting a failure
    assert await store.admit((limiter("unit-closed"),), exchange(), "10.0.0.1") is None
    assert store.errors == 0 and store.fallbacks == 0
