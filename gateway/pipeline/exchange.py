"""One request/response exchange as it crosses the gateway; plain state, no behaviour.

Kept apart from the protocols so both sides can share it without import cycles.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.cluster.pool import Pool, TargetState
    from gateway.cluster.upstream_connection import UpstreamProtocol
    from gateway.pipeline.routing import CompiledRoute


class Exchange:
    """Request fields parsed from the client plus the progress of its forwarding.

    No __slots__ on purpose: defaults live on the class, so creating an exchange (once per
    request) sets only the few per-instance fields below — about 2.5x cheaper than filling
    forty slots.
    """

    priority: int = 1
    admitted: Pool | None = None  # holds an admission slot of this pool
    queued: Pool | None = None  # waiting in this pool's admission queue
    method: bytes = b""
    url: bytes = b""
    url_bytes: int = 0
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
    body_buf: list[bytes] | None = None
    body_bytes: int = 0
    request_done: bool = False
    discard: bool = False
    close_after: bool = False
    canned: bytes | None = None
    extra_headers: bytes | None = None
    route: CompiledRoute | None = None
    target: TargetState | None = None
    pool: Pool | None = None
    cb: bool = False
    attempts: int = 1  # tries counted against `retry.attempts` (retries of unreached targets are not)
    tried: list[TargetState] | None = None  # targets a connection failed to, after a first failure
    upstream: UpstreamProtocol | None = None
    sent_head: bool = False
    replayable: bool = True
    status: int = 0
    response_bytes: int = 0
    settled: bool = False
    shed_reason: str | None = None  # why a local answer shed it (access log)
    cache_status: str | None = None  # HIT / MISS / STALE / BYPASS (access log)
    cache_key: bytes | None = None
    cache_fill: bool = False  # this exchange is the one upstream request for its key
    cache_wait: Any = None  # the Fill this exchange waits on
    cache_wait_since: float = 0.0
    cache_entry: Any = None  # what this fill stored
    stale_entry: Any = None  # an entry usable if the upstream fails (stale-if-error)
    io_count: int = 0
    io_seen: int = 0
    held: list[bytes] | None = None  # bytes after an upgrade request, held until its answer (101 or not)
    head_raw: int = 0  # raw bytes of a head read over several reads (whitespace and unfinished fields count)
    chunks: int = 0  # chunk-size lines parsed (on_chunk_header)
    seen_chunks: int = -1  # chunks and body bytes at the last read checked for long chunk-size lines
    seen_body: int = 0
    line_run: int = 0  # unexplained chunked-body bytes since the last chunk-size line

    def __init__(
        self, started: float, client: Any = None, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        self.started = started
        self.client = client
        # Shared with the connection's fast path (ClientProtocol.fast_headers): never mutated once parsed.
        self.headers: list[tuple[bytes, bytes]] = [] if headers is None else headers
        self.sent_at = started
        self.io_since = started

    def __repr__(self) -> str:
        return f"<Exchange {self.method.decode()} {self.url.decode(errors='replace')} status={self.status}>"
