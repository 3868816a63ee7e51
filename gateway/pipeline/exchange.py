"""One request/response exchange as it crosses the gateway, and the narrow view of the client
connection it came on that every later stage may use.

Below every other pipeline, cache, cluster and rate-limit module: they import this, it imports
none of them at run time, and the type-level imports point one way (a test fails on a cycle).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    import asyncio

    from gateway import http1
    from gateway.cluster.pool import Pool, Pooled, TargetState
    from gateway.pipeline.attempt import Attempt
    from gateway.pipeline.routing import CompiledRoute, Holder

# Why a client connection's reading is paused (Downstream.pause/resume take these as a bit set).
PAUSE_UPSTREAM: Final = 1  # the upstream's write buffer is full
PAUSE_PIPELINE: Final = 2  # too many pipelined requests queued
PAUSE_BUFFER: Final = 4  # body buffered while the upstream connection is being opened

# Where an exchange that waited continues (Downstream.resume_exchange; gateway.pipeline.phases).
AFTER_RATE_LIMIT: Final = 0  # a shared store allowed it: the cache phase
RATE_LIMITED: Final = 1  # a shared store refused it: `ex.canned` holds the rejection
AFTER_CACHE: Final = 2  # the cache fill it waited on ended (`ex.fill_entry`, `ex.fill_refill`)
ADMITTED: Final = 3  # the admission queue gave it a slot: pick a target
SHED_WAITER: Final = 4  # the admission queue shed it (timeout, displaced, CoDel)


class Downstream:
    """What the stages after parsing (cache, admission, the upstream connection, the pool) may use
    of the client connection an exchange came on. A compiled base class rather than a Protocol:
    compiled, calls through it are direct (vtable) calls and its fields are C fields; the client
    connection (gateway.client.connection) is the one implementation, and nothing below the
    client side imports that module."""

    __slots__ = ("active", "closed", "holder", "loop", "peer", "scheme", "tail", "tail_headers", "tail_host")

    def __init__(self, holder: Holder, loop: asyncio.AbstractEventLoop, scheme: bytes) -> None:
        self.holder = holder
        self.loop = loop
        self.scheme = scheme
        self.peer = b""
        self.closed = False
        self.active: Exchange | None = None  # the exchange that owns the response side
        # The upstream request head after the request line, for the last plain request's Host and
        # fields (UpstreamProtocol.send builds it once per change).
        self.tail = b""
        self.tail_host = b""
        self.tail_headers: list[tuple[bytes, bytes]] | None = None

    # ---- writing and flow control -----------------------------------------------------------
    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def pause(self, reason: int) -> None:
        raise NotImplementedError

    def resume(self, reason: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    # ---- where a waiting or failed exchange goes on ---------------------------------------------
    def resume_exchange(self, ex: Exchange, phase: int) -> None:
        """Continue `ex`, which waited, at `phase` (AFTER_RATE_LIMIT …), if it is still wanted."""
        raise NotImplementedError

    def forward(self, ex: Exchange) -> None:
        """Continue `ex` at the null/circuit/backup phase (after the cache)."""
        raise NotImplementedError

    def answer_local(self, ex: Exchange) -> None:
        """Write `ex.canned` as its answer and settle it."""
        raise NotImplementedError

    def resume_admitted(self, ex: Exchange) -> None:
        raise NotImplementedError

    def shed_waiter(self, ex: Exchange, pool: Pool) -> None:
        raise NotImplementedError

    def try_retry(self, ex: Exchange, cond: str, is_5xx: bool = False) -> bool:
        raise NotImplementedError

    def retry_fresh(self, ex: Exchange) -> None:
        raise NotImplementedError

    def upstream_failed(self, ex: Exchange, response: http1.Canned, reason: str) -> None:
        raise NotImplementedError

    def exchange_done(self, ex: Exchange, now: float = 0.0) -> None:
        raise NotImplementedError

    def start_tunnel(self, up: Pooled, ex: Exchange) -> None:
        raise NotImplementedError


class Exchange:
    """Request fields parsed from the client plus the progress of its forwarding.

    No __slots__ on purpose: defaults live on the class, so creating an exchange (once per
    request) sets only the few per-instance fields below — about 2.5x cheaper than filling
    forty slots.
    """

    priority: int = 1
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
    admitted: Pool | None = None  # holds an admission slot of this pool
    queued: Pool | None = None  # waiting in this pool's admission queue
    body_buf: list[bytes] | None = None
    body_bytes: int = 0
    discard: bool = False
    close_after: bool = False
    canned: bytes | None = None
    route: CompiledRoute | None = None
    target: TargetState | None = None
    pool: Pool | None = None
    cb: bool = False  # holds a circuit permit no attempt has taken yet
    attempt: Attempt | None = None  # the current upstream attempt (gateway.pipeline.attempt)
    attempts: int = 1  # tries counted against `retry.attempts` (retries of unreached targets are not)
    tried: list[TargetState] | None = None  # targets a connection failed to, after a first failure
    upstream: Pooled | None = None  # the upstream connection (UpstreamProtocol) serving it
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
    fill_entry: Any = None  # what the fill this exchange waited on stored (None: nothing)
    fill_refill: bool = False  # that fill's client left unanswered: this waiter takes over
    io_count: int = 0
    io_seen: int = 0
    held: list[bytes] | None = None  # bytes after an upgrade request, held until its answer (101 or not)
    head_raw: int = 0  # raw bytes of a head read over several reads (whitespace and unfinished fields count)
    chunks: int = 0  # chunk-size lines parsed (on_chunk_header)
    seen_chunks: int = -1  # chunks and body bytes at the last read checked for long chunk-size lines
    seen_body: int = 0
    line_run: int = 0  # unexplained chunked-body bytes since the last chunk-size line

    def __init__(
        self,
        started: float,
        client: Downstream | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self.started = started
        self.client = client
        # Shared with the connection's fast path (ClientProtocol.fast_headers): never mutated once parsed.
        self.headers: list[tuple[bytes, bytes]] = [] if headers is None else headers
        self.sent_at = started
        self.io_since = started

    def __repr__(self) -> str:
        return f"<Exchange {self.method.decode()} {self.url.decode(errors='replace')} status={self.status}>"
