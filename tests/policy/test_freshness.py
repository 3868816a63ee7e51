"""RFC 9111 freshness rules of the micro-cache (`gateway.policy.freshness`): pure, no clock, no I/O."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.policy.freshness import (
    CACHEABLE_STATUS,
    EXPIRED,
    FRESH,
    STALE_ERROR_ONLY,
    STALE_REVALIDATE,
    Directives,
    Lifetimes,
    lifetimes,
    parse_cache_control,
    state,
)

ROUTE = {"route_ttl": 10.0, "route_swr": 5.0, "route_sie": 60.0}


def life(cc: list[bytes] | None = None, status: int = 200, **kw: Any) -> Lifetimes | None:
    args: dict[str, Any] = {"has_set_cookie": False, "request_authorized": False, **ROUTE}
    args.update(kw)
    return lifetimes(status, cc or [], **args)


# ---- parsing -------------------------------------------------------------------------------------


def test_parse_cache_control_directives() -> None:
    d = parse_cache_control([b'public, Max-Age=30, s-maxage="60"', b"stale-while-revalidate=5,no-cache"])
    assert d == Directives(
        no_store=False, private=False, no_cache=True, max_age=30.0, s_maxage=60.0, stale_while_revalidate=5.0
    )


def test_parse_ignores_unknown_and_malformed_arguments() -> None:
    d = parse_cache_control([b"max-age=abc, s-maxage=-3, x-ext=1, , immutable"])
    assert d.max_age is None  # not an integer: ignored
    assert d.s_maxage == 0.0  # negative clamps to 0 (already stale)
    assert parse_cache_control([]) == Directives()


# ---- what is never stored ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cc",
    [
        [b"no-store"],
        [b"private"],
        [b"private, max-age=60"],
        [b"s-maxage=60, no-store"],
        [b"max-age=60", b"no-store"],  # a second Cache-Control line counts too
        [b"NO-STORE"],  # directive names are case-insensitive
        [b'private="Set-Cookie", s-maxage=60'],  # private with fields: still not for a shared cache
    ],
)
def test_no_store_and_private_never_stored(cc: list[bytes]) -> None:
    assert life(cc) is None


def test_no_cache_is_stored_with_ttl_zero() -> None:
    lt = life([b"no-cache, max-age=600"])
    assert lt == Lifetimes(ttl=0.0, stale_while_revalidate=5.0, stale_if_error=60.0)
    assert state(0.0, lt) == STALE_REVALIDATE  # never fresh: always refetched (here in the background)


def test_no_cache_without_any_stale_window_is_not_stored() -> None:
    assert life([b"no-cache"], route_swr=0.0, route_sie=0.0) is None
    assert life([b"max-age=0"], route_swr=0.0, route_sie=0.0) is None


@pytest.mark.parametrize("status", [206, 302, 304, 400, 403, 500, 502, 503, 504])
def test_statuses_not_cacheable_by_default(status: int) -> None:
    assert status not in CACHEABLE_STATUS
    assert life([b"max-age=60"], status=status) is None


@pytest.mark.parametrize("status", sorted(CACHEABLE_STATUS))
def test_statuses_cacheable_by_default(status: int) -> None:
    assert life(status=status) == Lifetimes(10.0, 5.0, 60.0)


def test_vary_star_never_stored() -> None:
    assert life([b"s-maxage=60"], vary_star=True) is None
    assert life([b"s-maxage=60"], vary_star=True, allow_set_cookie=True, allow_authorized=True) is None


def test_set_cookie_not_stored_unless_allowed() -> None:
    assert life(has_set_cookie=True) is None
    assert life([b"s-maxage=60"], has_set_cookie=True) is None  # explicit freshness does not help
    assert life(has_set_cookie=True, allow_set_cookie=True) == Lifetimes(10.0, 5.0, 60.0)
    assert life([b"no-store"], has_set_cookie=True, allow_set_cookie=True) is None


def test_authorized_request_not_stored_unless_allowed_or_s_maxage() -> None:
    assert life(request_authorized=True) is None
    assert life([b"max-age=60"], request_authorized=True) is None  # max-age is not shared permission
    assert life(request_authorized=True, allow_authorized=True) == Lifetimes(10.0, 5.0, 60.0)
    # RFC 9111 §3.5: s-maxage explicitly allows a shared cache to store it
    assert life([b"s-maxage=30"], request_authorized=True) == Lifetimes(30.0, 5.0, 60.0)
    assert life([b"private"], request_authorized=True, allow_authorized=True) is None


# ---- precedence ----------------------------------------------------------------------------------


def test_route_ttl_when_the_response_says_nothing() -> None:
    assert life() == Lifetimes(10.0, 5.0, 60.0)
    assert life([b"public"]) == Lifetimes(10.0, 5.0, 60.0)


def test_max_age_beats_route_ttl() -> None:
    assert life([b"max-age=3"]) == Lifetimes(3.0, 5.0, 60.0)
    assert life([b"max-age=300"]) == Lifetimes(300.0, 5.0, 60.0)


def test_s_maxage_beats_max_age() -> None:
    assert life([b"max-age=3, s-maxage=7"]) == Lifetimes(7.0, 5.0, 60.0)
    assert life([b"s-maxage=7, max-age=300"]) == Lifetimes(7.0, 5.0, 60.0)
    assert life([b"s-maxage=0, max-age=300"]) == Lifetimes(0.0, 5.0, 60.0)


def test_no_cache_beats_s_maxage() -> None:
    lt = life([b"s-maxage=60, no-cache"])
    assert lt is not None and lt.ttl == 0.0


def test_response_stale_directives_beat_the_route() -> None:
    assert life([b"stale-while-revalidate=2, stale-if-error=3"]) == Lifetimes(10.0, 2.0, 3.0)
    assert life([b"stale-while-revalidate=0"]) == Lifetimes(10.0, 0.0, 60.0)  # 0 from the response wins
    assert life([b"stale-if-error=0"], route_swr=0.0) == Lifetimes(10.0, 0.0, 0.0)
    assert life([b"stale-if-error=120"], route_sie=0.0) == Lifetimes(10.0, 5.0, 120.0)


def test_zero_ttl_kept_when_a_stale_window_exists() -> None:
    assert life(route_ttl=0.0, route_swr=0.0, route_sie=5.0) == Lifetimes(0.0, 0.0, 5.0)
    assert life(route_ttl=0.0, route_swr=0.0, route_sie=0.0) is None


# ---- state at exact boundaries -------------------------------------------------------------------


def test_state_boundaries_swr_shorter_than_sie() -> None:
    lt = Lifetimes(ttl=10.0, stale_while_revalidate=5.0, stale_if_error=60.0)
    assert state(0.0, lt) == FRESH
    assert state(9.999, lt) == FRESH
    assert state(10.0, lt) == STALE_REVALIDATE  # age == ttl is no longer fresh
    assert state(14.999, lt) == STALE_REVALIDATE
    assert state(15.0, lt) == STALE_ERROR_ONLY  # age == ttl + swr
    assert state(69.999, lt) == STALE_ERROR_ONLY
    assert state(70.0, lt) == EXPIRED  # age == ttl + sie
    assert state(1e9, lt) == EXPIRED


def test_state_boundaries_swr_longer_than_sie() -> None:
    lt = Lifetimes(ttl=1.0, stale_while_revalidate=10.0, stale_if_error=2.0)
    assert state(0.999, lt) == FRESH
    assert state(1.0, lt) == STALE_REVALIDATE
    assert state(10.999, lt) == STALE_REVALIDATE  # past ttl + sie but still within swr
    assert state(11.0, lt) == EXPIRED


def test_state_without_stale_windows() -> None:
    lt = Lifetimes(ttl=1.0, stale_while_revalidate=0.0, stale_if_error=0.0)
    assert state(0.5, lt) == FRESH
    assert state(1.0, lt) == EXPIRED


def test_state_zero_ttl_is_never_fresh() -> None:
    lt = Lifetimes(ttl=0.0, stale_while_revalidate=0.0, stale_if_error=5.0)
    assert state(0.0, lt) == STALE_ERROR_ONLY
    assert state(5.0, lt) == EXPIRED
