"""The fields parsed from a client's request head, apart from the progress of its forwarding.

The lowest pipeline module: the rate limiter (keys from fields, its answer's framing) and any
other stage that only reads the request import this, not the Exchange, so nothing the Exchange
refers to (routes, pools, connections) can form an import cycle through them.
"""

from __future__ import annotations


class Request:
    """Parsed request fields. No __slots__: defaults live on the class, so making one sets only
    what the parser found; `headers` is set by the Exchange's constructor."""

    headers: list[tuple[bytes, bytes]]  # as received, minus the fields handled apart (Host, framing …)
    method: bytes = b""
    url: bytes = b""
    host: bytes = b""
    forwarded_for: bytes | None = None
    conn_tokens: tuple[bytes, ...] | None = None  # Connection tokens, lower case (shared: immutable)
    te: bytes | None = None
    content_length: int | None = None
    chunked: bool = False
    expect_continue: bool = False
    upgrade: bytes | None = None
    keep_alive: bool = True
    http10: bool = False
    head_only: bool = False
    request_done: bool = False  # the whole request (head and body) has been read
    extra_headers: bytes | None = None  # response fields this request earned (RateLimit-*)
