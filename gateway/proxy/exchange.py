"""One request/response exchange as it crosses the gateway; plain state, no behaviour.

Kept apart from the protocols so both sides can share it without import cycles.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.proxy.upstream import UpstreamProtocol
    from gateway.runtime import CompiledRoute
    from gateway.upstreams import Pool, TargetState


class Exchange:
    """Request fields parsed from the client plus the progress of its forwarding."""

    __slots__ = (
        "admitted",
        "attempts",
        "body_buf",
        "body_bytes",
        "canned",
        "cb",
        "chunked",
        "client",
        "close_after",
        "conn_tokens",
        "content_length",
        "discard",
        "expect_continue",
        "extra_headers",
        "forwarded_for",
        "head_only",
        "headers",
        "host",
        "http10",
        "io_count",
        "io_seen",
        "io_since",
        "keep_alive",
        "method",
        "pool",
        "priority",
        "queued",
        "replayable",
        "request_done",
        "response_bytes",
        "route",
        "sent_at",
        "sent_head",
        "settled",
        "shed_reason",
        "started",
        "status",
        "target",
        "te",
        "upgrade",
        "upstream",
        "url",
        "url_bytes",
    )

    def __init__(self, started: float, client: Any = None) -> None:
        self.started = started
        self.client = client
        self.priority = 1
        self.admitted: Pool | None = None  # holds an admission slot of this pool
        self.queued: Pool | None = None  # waiting in this pool's admission queue
        self.method = b""
        self.url = b""
        self.url_bytes = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.host = b""
        self.forwarded_for: bytes | None = None
        self.conn_tokens: list[bytes] | None = None
        self.te: bytes | None = None
        self.content_length: int | None = None
        self.chunked = False
        self.expect_continue = False
        self.upgrade: bytes | None = None
        self.keep_alive = True
        self.http10 = False
        self.head_only = False
        self.body_buf: list[bytes] | None = None
        self.body_bytes = 0
        self.request_done = False
        self.discard = False
        self.close_after = False
        self.canned: bytes | None = None
        self.extra_headers: bytes | None = None
        self.route: CompiledRoute | None = None
        self.target: TargetState | None = None
        self.pool: Pool | None = None
        self.cb = False
        self.attempts = 1
        self.sent_at = started
        self.upstream: UpstreamProtocol | None = None
        self.sent_head = False
        self.replayable = True
        self.status = 0
        self.response_bytes = 0
        self.settled = False
        self.shed_reason: str | None = None  # why a local answer shed it (access log)
        self.io_count = 0
        self.io_seen = 0
        self.io_since = started

    def __repr__(self) -> str:
        return f"<Exchange {self.method.decode()} {self.url.decode(errors='replace')} status={self.status}>"
