"""HTTP/1.1 wire helpers for the data plane: hop-by-hop rules, status lines, canned responses.

Everything here is precomputed at import or built with one `b"".join`, because it runs on every
request; nothing here does I/O.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Final

# RFC 9110 §7.6.1: connection-specific fields never forwarded. TE/Trailer/Upgrade/Proxy-* included;
# Content-Length/Transfer-Encoding are re-framed by us rather than copied.
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

# Request fields the client protocol looks at while parsing (lower-case).
# Final: compiled, a C static read by the client protocol per header (not a module attribute lookup).
SPECIAL_REQUEST: Final = HOP_BY_HOP | {
    b"host",
    b"content-length",
    b"expect",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
}


def _underscored(names: frozenset[bytes]) -> frozenset[bytes]:
    """Every spelling of `names` with some '-' written as '_' (at least one)."""
    out: set[bytes] = set()
    for name in names:
        spellings = [b""]
        for ch in name:
            c = bytes((ch,))
            spellings = [s + c for s in spellings] + ([s + b"_" for s in spellings] if c == b"-" else [])
        out.update(s for s in spellings if b"_" in s)
    return frozenset(out)


# CGI-style backends read `X_Forwarded_For` as `X-Forwarded-For`: a request field spelled so is refused,
# since it would pass for one the proxy controls (one set lookup per field instead of a scan).
SPECIAL_REQUEST_UNDERSCORED: Final = _underscored(SPECIAL_REQUEST)

SPECIAL_RESPONSE: Final = HOP_BY_HOP | {b"content-length"}

# What the client protocol does with a request field, by kind (`field_kind`).
FIELD_PLAIN: Final = 0  # forwarded as it came
FIELD_HOST: Final = 1
FIELD_CONTENT_LENGTH: Final = 2
FIELD_TRANSFER_ENCODING: Final = 3
FIELD_CONNECTION: Final = 4
FIELD_EXPECT: Final = 5
FIELD_UPGRADE: Final = 6
FIELD_FORWARDED_FOR: Final = 7
FIELD_DROPPED: Final = 8  # keep-alive, proxy-*, te, trailer, x-forwarded-proto/-host: we set our own
FIELD_UNDERSCORED: Final = 9  # a special name spelled with '_': refused
_KIND_OF_SPECIAL: Final = {
    b"host": FIELD_HOST,
    b"content-length": FIELD_CONTENT_LENGTH,
    b"transfer-encoding": FIELD_TRANSFER_ENCODING,
    b"connection": FIELD_CONNECTION,
    b"expect": FIELD_EXPECT,
    b"upgrade": FIELD_UPGRADE,
    b"x-forwarded-for": FIELD_FORWARDED_FOR,
}


def field_kind_of(name: bytes) -> int:
    """The kind of a field name, case-insensitively (the rule; `field_kind` remembers its answers)."""
    lname = name.lower()
    if lname in SPECIAL_REQUEST:
        return _KIND_OF_SPECIAL.get(lname, FIELD_DROPPED)
    return FIELD_UNDERSCORED if lname in SPECIAL_REQUEST_UNDERSCORED else FIELD_PLAIN


# Field names as sent, with their kind: a request's ten-odd names are the same few dozen spellings
# from every client, so one dict lookup replaces a lower() and two set lookups per field. Bounded:
# names past the bound (random ones, say) are classified each time, never stored.
FIELD_KINDS_MAX: Final = 4096
_FIELD_KINDS: Final[dict[bytes, int]] = {}


# Length and first letter (its low five bits, so either case) of every special name: a name whose
# shape no special name has is plain without hashing it — most of a request's fields.
_SHAPE_LEN: Final = max(len(n) for n in SPECIAL_REQUEST) + 1
_SHAPES: Final = bytes(
    int(any(len(s) == i // 32 and s[0] & 31 == i % 32 for s in SPECIAL_REQUEST))
    for i in range(_SHAPE_LEN * 32)
)


def field_kind(name: bytes) -> int:
    n = len(name)
    if 0 < n < _SHAPE_LEN and not _SHAPES[n * 32 + (name[0] & 31)]:
        return FIELD_PLAIN
    if name == b"Host":  # in every request, and nearly always spelled so: a compare, not a hash
        return FIELD_HOST
    kind = _FIELD_KINDS.get(name, -1)
    if kind < 0:
        kind = field_kind_of(name)
        if len(_FIELD_KINDS) < FIELD_KINDS_MAX:
            _FIELD_KINDS[name] = kind
    return kind


def field_kinds_remembered() -> int:
    return len(_FIELD_KINDS)


def not_connected(data: bytes) -> None:
    """A protocol's bound write before its transport exists (connection_made replaces it)."""
    raise RuntimeError("write before connection_made")


STATUS_LINE: dict[int, bytes] = {}
for _s in HTTPStatus:
    STATUS_LINE[_s.value] = b"HTTP/1.1 %d %s\r\n" % (_s.value, _s.phrase.encode())


def reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


def status_line(status: int, reason: bytes = b"") -> bytes:
    line = STATUS_LINE.get(status)
    if line is not None:
        return line
    return b"HTTP/1.1 %d %s\r\n" % (status, reason or b"Unknown")


def canned(
    status: int,
    body: bytes,
    *,
    close: bool,
    content_type: bytes = b"text/plain; charset=utf-8",
    extra: tuple[tuple[bytes, bytes], ...] = (),
) -> bytes:
    """A complete small response, built once and written with one call."""
    parts = [status_line(status)]
    for name, value in extra:
        parts.append(name + b": " + value + b"\r\n")
    parts.append(b"Content-Type: " + content_type + b"\r\n")
    parts.append(b"Content-Length: %d\r\n" % len(body))
    if close:
        parts.append(b"Connection: close\r\n")
    parts.append(b"\r\n")
    parts.append(body)
    return b"".join(parts)


class Canned:
    """A response in its keep-alive and its closing form, both precomputed."""

    __slots__ = ("close", "head_close", "head_keep", "keep", "status")

    def __init__(
        self,
        status: int,
        body: bytes,
        content_type: bytes = b"text/plain; charset=utf-8",
        extra: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        self.status = status
        self.keep = canned(status, body, close=False, content_type=content_type, extra=extra)
        self.close = canned(status, body, close=True, content_type=content_type, extra=extra)
        # HEAD answers carry the same head without the body (RFC 9110 §9.3.2).
        self.head_keep = self.keep[: len(self.keep) - len(body)]
        self.head_close = self.close[: len(self.close) - len(body)]

    def pick(self, close: bool, head: bool) -> bytes:
        if head:
            return self.head_close if close else self.head_keep
        return self.close if close else self.keep


def error(status: int, cause: str, extra: tuple[tuple[bytes, bytes], ...] = ()) -> Canned:
    return Canned(status, f"{status} {HTTPStatus(status).phrase}: {cause}\n".encode(), extra=extra)


# Errors produced by the data plane itself, each with a short body naming the cause.
BAD_REQUEST = error(400, "malformed request")
NOT_FOUND = error(404, "no route matches this request")
URI_TOO_LONG = error(414, "request-target too long")
HEADERS_TOO_LARGE = error(431, "request header block too large")
REQUEST_TIMEOUT = error(408, "client did not send a complete request in time")
BODY_TOO_SLOW = error(408, "request body arrived slower than the minimum rate")
BODY_TOO_LARGE = error(413, "request body exceeds the route's max_body_size")
BAD_GATEWAY_REFUSED = error(502, "upstream refused the connection")
BAD_GATEWAY_RESET = error(502, "upstream closed the connection before answering")
BAD_GATEWAY_INVALID = error(502, "upstream sent an invalid response")
GATEWAY_TIMEOUT_CONNECT = error(504, "upstream connect timed out")
GATEWAY_TIMEOUT = error(504, "upstream did not answer in time")
NOT_IMPLEMENTED = error(501, "method or transfer coding not supported")
UNAVAILABLE_DRAINING = error(503, "gateway is shutting down")


# Compiled (mypyc), a byte loop over the path is the cheapest scan (a `bytes.find` call parses its
# arguments as a tuple: three of them were 9% of a proxied request's Python); interpreted, it is
# the slowest, so pure Python keeps the `find`s. Both are tested to agree.
COMPILED: Final = not __file__.endswith(".py")


def query_start(url: bytes) -> int:
    """Where the query of a request-target starts (its '?', or len(url)); -1 if it must be refused.

    Refused: a fragment ('#' is never part of a request-target) and a ".." segment in the path (a
    backend could resolve it above the route's prefix).
    """
    if not COMPILED:
        return query_start_find(url)
    n = len(url)
    q = n
    slash_dot = False
    prev = 0
    for i in range(n):
        c = url[i]
        if c == 63:  # '?': the query is only searched for '#'
            q = i
            break
        if c == 35:  # '#'
            return -1
        if c == 46 and prev == 47:  # "/.": maybe a dot segment
            slash_dot = True
        prev = c
    if q < n and url.find(b"#", q) >= 0:
        return -1
    if slash_dot and _dot_segment(url[:q]):
        return -1
    return q


def query_start_find(url: bytes) -> int:
    """`query_start` with `bytes.find` (find, not `in`: `bytes in bytes` first tries the operand as
    an int and formats a TypeError)."""
    q = url.find(b"?")
    if q < 0:
        q = len(url)
    if url.find(b"#") >= 0:
        return -1
    path = url[:q]
    if path.find(b"/..") >= 0 and _dot_segment(path):
        return -1
    return q


def _dot_segment(path: bytes) -> bool:
    return path.find(b"/../") >= 0 or path.endswith(b"/..")


def status_of(response: bytes) -> int:
    """The status code of a complete response we built ("HTTP/1.1 NNN ..."), without int(bytes)."""
    return (response[9] - 48) * 100 + (response[10] - 48) * 10 + response[11] - 48


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"


# What a Host field may contain (RFC 3986 reg-name or IP-literal, and ":" port); anything else is a 400.
HOST_CHARS: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=%:[]"


def route_host(host: bytes) -> bytes:
    """Host as routes match it: lower case, without the port."""
    host = host.lower()
    colon = host.rfind(b":")
    if colon > 0 and host[colon + 1 :].isdigit():
        host = host[:colon]
    return host
