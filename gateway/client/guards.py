"""The client side's guards against slow and hostile clients: the base class of a client connection.

What llhttp does not bound by itself (chunk-size lines, bytes after an upgrade request) and what
only time reveals (header read, keep-alive idle, body-rate floor, stalled streams, slow cache
fills) is checked here, apart from the hot forwarding path in gateway/client/connection.py. The
connection (ClientProtocol) derives from GuardedConnection: the guards see the fields they bound
and nothing else, and this module never imports the connection's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from time import monotonic
from typing import TYPE_CHECKING, Final

from httptools import HttpParserCallbackError, HttpParserError, HttpParserUpgrade

from gateway import http1
from gateway.observe import stats
from gateway.pipeline.exchange import PAUSE_BUFFER, Exchange
from gateway.pipeline.phases import Pipeline

if TYPE_CHECKING:
    from gateway.cluster.pool import Pooled
    from gateway.config.model import ClientLimits
    from gateway.pipeline.routing import Holder


class Reject(Exception):
    """Raised inside a parser callback to answer with a canned error and close."""

    def __init__(self, response: http1.Canned) -> None:
        super().__init__(response.status)
        self.response = response


def parse_error_answer(e: HttpParserError) -> http1.Canned:
    """The answer to a request llhttp refused: ours if a callback rejected it (Reject), else 400."""
    cause = e.__context__ if isinstance(e, HttpParserCallbackError) else None
    return cause.response if isinstance(cause, Reject) else http1.BAD_REQUEST


# Connection states the sweeper looks at.
IDLE: Final = 0
READING_HEAD: Final = 1
BUSY: Final = 2

# A chunk-size line (size, extensions, CRLF) may be this long; llhttp itself reads one without bound.
MAX_CHUNK_LINE: Final = 1024


class GuardedConnection(Pipeline):
    """A client connection's state that the guards bound (timers, body rate, upgrade hold) and the
    guards themselves; gateway.client.connection.ClientProtocol is the connection."""

    __slots__ = (
        "feed",
        "header_bytes",
        "limits",
        "parsing",
        "paused",
        "rate_mark",
        "rate_since",
        "since",
        "state",
        "tunnel",
        "upgrading",
    )

    def __init__(
        self, holder: Holder, loop: asyncio.AbstractEventLoop, scheme: bytes, limits: ClientLimits
    ) -> None:
        super().__init__(holder, loop, scheme)
        self.limits = limits
        self.feed: Callable[[bytes], object] = _no_parser  # the parser's feed_data, bound once
        self.parsing: Exchange | None = None  # the request being parsed
        self.upgrading: Exchange | None = None  # an upgrade request not answered yet
        self.tunnel: Pooled | None = None  # after a 101: the upstream connection bytes flow to
        self.paused = 0  # PAUSE_* reasons reading is paused for
        self.state = READING_HEAD
        self.since = monotonic()  # when the current state began
        self.header_bytes = 0  # of the head being parsed
        self.rate_since = 0.0  # body-rate window start (min_body_rate) and body bytes at that time
        self.rate_mark = 0

    def fail_parse(self, response: http1.Canned) -> None:
        """A malformed request: answer (once prior responses are out) with an error and close."""
        raise NotImplementedError

    def reject_body(self, ex: Exchange, response: http1.Canned) -> None:
        """Stop a request while its body is read: `response` and close, or a cut if answered."""
        raise NotImplementedError

    def after_upgrade(self, rest: bytes) -> None:
        """What follows an upgrade request in a read: held, or parsed on if the request was answered."""
        for _ in range(len(rest) + 1):  # bounded: a pass past an upgrade request consumes that request
            if not self.upgraded(rest) or not rest:
                return
            try:
                self.feed(rest)
            except HttpParserUpgrade as e:
                rest = rest[e.args[0] :]
                continue
            except HttpParserError as e:
                self.fail_parse(parse_error_answer(e))
            return

    def upgraded(self, rest: bytes) -> bool:
        """llhttp stopped after an upgrade request. True: go on parsing `rest` as HTTP (it was answered)."""
        ex = self.upgrading
        if ex is not None and not ex.settled:
            # Until its answer, what follows is not HTTP to us: held for a 101, else the connection closes.
            ex.held = [rest] if rest else []
            if rest:
                self.pause(PAUSE_BUFFER)
            return False
        self.upgrading = None  # answered locally already (no 101): the parser goes on, so do we
        return not self.closed

    def chunk_lines(self, ex: Exchange, data: bytes, fresh: bool) -> None:
        """Bound chunk-size lines (size, extensions, CRLF), which llhttp reads without limit.

        Bytes of this read that the head, the chunk data and their CRLFs do not explain are chunk-size
        lines: at most MAX_CHUNK_LINE for each line completed in this read plus one unfinished, and a line
        spanning reads accumulates. `fresh`: the request began with this read (its head counts too).
        """
        if ex.discard:
            return
        body = ex.body_bytes - ex.seen_body
        first = ex.seen_chunks < 0
        chunks = ex.chunks - (0 if first else ex.seen_chunks)
        ex.seen_body = ex.body_bytes
        ex.seen_chunks = ex.chunks
        extra = len(data) - body - 2 * chunks
        if first:
            if not fresh:
                return  # the head began in an earlier read, or after another request: not measurable
            extra -= len(ex.method) + len(ex.url) + 14 + self.header_bytes
        run = extra if chunks else ex.line_run + extra
        ex.line_run = run
        if run > MAX_CHUNK_LINE * (chunks + 1):
            stats.GLOBAL.bad_requests += 1
            self.reject_body(ex, http1.BAD_REQUEST)

    def sweep(self, now: float) -> None:
        """Called about once a second: header-read and keep-alive timeouts, stalled streams."""
        if self.closed or self.tunnel is not None:
            return
        state = self.state
        limits = self.limits
        ex = self.parsing
        if ex is not None and ex.method and limits.min_body_rate > 0:
            # Slow POST: after a grace window, each window must bring min_body_rate bytes/s. Time spent
            # paused by us (back-pressure) or waiting for our 100 Continue does not count.
            if now < self.rate_since or self.paused or (ex.expect_continue and ex.target is None):
                self.rate_since = max(self.rate_since, now)
                self.rate_mark = ex.body_bytes
            elif now - self.rate_since >= limits.body_rate_window:
                if ex.body_bytes - self.rate_mark < limits.min_body_rate * (now - self.rate_since):
                    self.reject_body(ex, http1.BODY_TOO_SLOW)
                    return
                self.rate_since = now
                self.rate_mark = ex.body_bytes
        if state == READING_HEAD and self.active is None:
            if now - self.since > limits.header_read_timeout:
                if self.parsing is None:
                    self.close()  # connected but sent nothing: close quietly, like nginx
                    return
                self.parsing = None
                bad = Exchange(now)
                bad.canned = http1.REQUEST_TIMEOUT.close
                bad.keep_alive = False
                bad.request_done = True
                self.active = bad
                self.answer_local(bad)
        elif state == IDLE:
            # Not on `draining`: idle connections are closed when the drain delay ends (app.py).
            if now - self.since > limits.keepalive_timeout:
                self.close()
        else:
            ex = self.active
            if ex is None or ex.route is None:
                return
            if ex.cache_wait is not None and ex.route.cache is not None:
                lock = ex.route.cache.config.lock_timeout or ex.route.response_timeout
                if now - ex.cache_wait_since > lock:
                    waiters = ex.cache_wait.waiters
                    if ex in waiters:
                        waiters.remove(ex)
                    ex.cache_wait = None
                    self.forward(ex)  # the fill is too slow: go upstream ourselves (proxy_cache_lock_timeout)
                return
            if ex.upstream is None:
                return
            up = ex.upstream
            if not up.head_written:
                if ex.sent_head and now - ex.sent_at > ex.route.response_timeout:
                    up.response_timeout()
                return
            if ex.io_count != ex.io_seen:
                ex.io_seen = ex.io_count
                ex.io_since = now
            elif ex.status != 0 and now - ex.io_since > ex.route.idle_timeout:
                ex.upstream.abandon()
                self.abort()


def _no_parser(data: bytes) -> object:
    raise RuntimeError("no parser yet")
