"""Shared-cache freshness rules (RFC 9111) for the micro-cache: pure functions, no I/O, no clock.

Rules kept here:
- only GET/HEAD, and only final statuses that are cacheable by default (RFC 9110 §15.1) are stored;
- response `Cache-Control` wins over the route's ttl: `no-store` and `private` are never stored
  (a shared cache), `no-cache` is stored with ttl 0 (always revalidated, i.e. refetched), `s-maxage`
  beats `max-age`; `stale-while-revalidate` / `stale-if-error` from the response beat the route's;
- a response with `Set-Cookie`, or to a request with `Authorization`, is not stored unless the
  route allows it; `Vary: *` is never stored;
- an entry's state at age `a`: fresh if a < ttl; stale-while-revalidate if a < ttl + swr;
  usable on error if a < ttl + sie; else expired.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

CACHEABLE_STATUS = frozenset({200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501})

# Final: compiled, constants instead of a module-dict lookup per cache hit.
FRESH: Final = "fresh"
STALE_REVALIDATE: Final = "stale_revalidate"
STALE_ERROR_ONLY: Final = "stale_error_only"
EXPIRED: Final = "expired"


@dataclass(frozen=True, slots=True)
class Directives:
    no_store: bool = False
    private: bool = False
    no_cache: bool = False
    max_age: float | None = None
    s_maxage: float | None = None
    stale_while_revalidate: float | None = None
    stale_if_error: float | None = None


def parse_cache_control(values: list[bytes]) -> Directives:
    """Parse one or more Cache-Control field values; unknown directives are ignored."""
    fields: dict[str, str | None] = {}
    for value in values:
        for part in value.decode("latin-1").split(","):
            name, sep, arg = part.strip().partition("=")
            if name:
                fields[name.lower()] = arg.strip().strip('"') if sep else None

    def seconds(name: str) -> float | None:
        raw = fields.get(name)
        if raw is None:
            return None
        try:
            return max(0.0, float(int(raw)))
        except ValueError:
            return None

    return Directives(
        no_store="no-store" in fields,
        private="private" in fields,
        no_cache="no-cache" in fields,
        max_age=seconds("max-age"),
        s_maxage=seconds("s-maxage"),
        stale_while_revalidate=seconds("stale-while-revalidate"),
        stale_if_error=seconds("stale-if-error"),
    )


@dataclass(frozen=True, slots=True)
class Lifetimes:
    ttl: float
    stale_while_revalidate: float
    stale_if_error: float


def lifetimes(
    status: int,
    cache_control: list[bytes],
    *,
    route_ttl: float,
    route_swr: float,
    route_sie: float,
    has_set_cookie: bool,
    request_authorized: bool,
    allow_set_cookie: bool = False,
    allow_authorized: bool = False,
    vary_star: bool = False,
) -> Lifetimes | None:
    """How long a response may be served, or None when it must not be stored at all."""
    if status not in CACHEABLE_STATUS or vary_star:
        return None
    if has_set_cookie and not allow_set_cookie:
        return None
    d = parse_cache_control(cache_control)
    if d.no_store or d.private:
        return None
    if request_authorized and not allow_authorized and d.s_maxage is None:
        return None  # RFC 9111 §3.5: only explicit shared-cache permission (s-maxage) overrides
    if d.no_cache:
        ttl = 0.0
    elif d.s_maxage is not None:
        ttl = d.s_maxage
    elif d.max_age is not None:
        ttl = d.max_age
    else:
        ttl = route_ttl
    swr = d.stale_while_revalidate if d.stale_while_revalidate is not None else route_swr
    sie = d.stale_if_error if d.stale_if_error is not None else route_sie
    if ttl <= 0 and swr <= 0 and sie <= 0:
        return None
    return Lifetimes(ttl, swr, sie)


def state(age_s: float, life: Lifetimes) -> str:
    if age_s < life.ttl:
        return FRESH
    if age_s < life.ttl + life.stale_while_revalidate:
        return STALE_REVALIDATE
    if age_s < life.ttl + life.stale_if_error:
        return STALE_ERROR_ONLY
    return EXPIRED
