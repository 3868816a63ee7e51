"""The client side of the data plane: an asyncio.Protocol fed by llhttp (httptools).

This module is the hot path: parsing, the request fast path, pipelining and writing. Where a
parsed request goes is decided by the phases it inherits (gateway.pipeline.phases), its slow-client
limits by its guards (gateway.client.guards). Rules it keeps:
- exactly one exchange owns the response side (`active`); pipelined requests wait in `queue`
  in arrival order, with their bodies buffered and reading paused past `max_pipelined`;
- every decision (route, size limit, null upstream, pick) is synchronous; the only await is
  opening a new upstream connection when no pooled one is idle;
- reading from the client pauses while the upstream's write buffer is full (back-pressure);
- every exchange is settled exactly once (`Pipeline.settle`): counters, in-flight, access log;
- a read that repeats the last plain GET/HEAD head byte for byte, only the target differing
  (visible ASCII), is served without llhttp from the fields llhttp gave that head (the request
  fast path); any other byte sequence is parsed, so both paths answer alike.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from time import monotonic
from typing import TYPE_CHECKING, Final

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser

from gateway import http1
from gateway.client.guards import BUSY, IDLE, READING_HEAD, GuardedConnection, Reject, parse_error_answer
from gateway.cluster.pool import Pooled
from gateway.observe import stats
from gateway.pipeline.exchange import PAUSE_BUFFER, PAUSE_PIPELINE, PAUSE_UPSTREAM, Exchange

if TYPE_CHECKING:
    from gateway.config.model import ClientLimits
    from gateway.pipeline.routing import Holder

# Final: compiled (mypyc), these are C statics instead of a module-dict lookup per use.
_now: Final = monotonic
BODY_HIGH_WATER: Final = 256 * 1024
LEARN_GAP_MAX: Final = 64  # most plain requests not learned from after a wasted request template


# A request target on the request fast path is visible ASCII (no space, no control byte): this
# table maps those bytes to themselves and every other byte to a space, so `translate` changes a
# target with any other byte (which then goes through llhttp).
_TARGET_TABLE: Final = bytes(b if 0x21 <= b <= 0x7E else 0x20 for b in range(256))

# The Connection values browsers and clients send, already split.
_CONNECTION_COMMON: Final[dict[bytes, tuple[bytes, ...]]] = {
    b"keep-alive": (b"keep-alive",),
    b"Keep-Alive": (b"keep-alive",),
    b"close": (b"close",),
    b"Close": (b"close",),
    b"Upgrade": (b"upgrade",),
    b"upgrade": (b"upgrade",),
}


class ClientProtocol(GuardedConnection):
    """One client connection: llhttp callbacks, the request fast path, pipelining and writing.
    The request path's phases it inherits from Pipeline (gateway.pipeline.phases), its
    slow-client guards from GuardedConnection (gateway.client.guards)."""

    __slots__ = (
        "_name",
        "fast_headers",
        "fast_hit",
        "fast_host",
        "fast_requests",
        "fast_tail",
        "fast_tokens",
        "fast_xff",
        "fresh",
        "get_method",
        "header_count",
        "last_chunked",
        "learn_gap",
        "learn_skip",
        "max_header_bytes",
        "max_headers",
        "max_requests",
        "max_url_bytes",
        "parser",
        "per_ip",
        "queue",
        "registry",
        "requests",
        "should_keep",
        "transport",
    )

    def __init__(
        self,
        holder: Holder,
        loop: asyncio.AbstractEventLoop,
        registry: set[ClientProtocol],
        limits: ClientLimits,
        scheme: bytes = b"http",
        per_ip: dict[bytes, int] | None = None,
    ) -> None:
        super().__init__(holder, loop, scheme, limits)
        self.registry = registry
        # The per-header limits as plain fields (read for every header; compiled, a C field read).
        self.max_header_bytes = limits.max_header_bytes
        self.max_headers = limits.max_headers
        self.max_url_bytes = limits.max_url_bytes
        self.max_requests = limits.max_requests_per_connection
        self.transport: asyncio.Transport | None = None
        self.parser = HttpRequestParser(self)
        # The parser's and the transport's per-request methods, bound once per connection: a call
        # through a bound method skips the method lookup on the type that `obj.method(...)` pays.
        self.feed = self.parser.feed_data
        self.get_method: Callable[[], bytes] = self.parser.get_method
        self.should_keep: Callable[[], bool] = self.parser.should_keep_alive
        self.queue: deque[Exchange] = deque()
        self.requests = 0
        self.header_count = 0
        self._name = b""
        # Open connections per client address, shared by the listener's connections (max_connections_per_ip).
        self.per_ip = per_ip if per_ip is not None else {}
        self.last_chunked: Exchange | None = None  # a chunked request completed by the current read
        # The request fast path: the raw head from the version on (" HTTP/1.1\r\n...") of the last
        # plain GET/HEAD that llhttp parsed alone in one read, and what llhttp made of it. A later
        # read that is a GET/HEAD and a target followed by exactly these bytes parses the same way.
        self.fresh: Exchange | None = None  # a plain request parsed in the current read
        self.fast_tail = b""
        self.fast_host = b""
        self.fast_headers: list[tuple[bytes, bytes]] = []
        self.fast_tokens: tuple[bytes, ...] | None = None
        self.fast_xff: bytes | None = None
        self.fast_requests = 0  # requests that took the fast path (tests read it)
        self.fast_hit = False  # the current template served a request
        self.learn_gap = 0  # back-off of learning (see _learn)
        self.learn_skip = 0  # plain requests still not to learn from

    # ---- connection -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop transports are not asyncio.Transport
        self.out = transport.write  # type: ignore[attr-defined]
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer_str = str(peer[0])
            self.peer = self.peer_str.encode()
        self.registry.add(self)
        g = stats.GLOBAL
        g.connections_accepted += 1
        g.connections_open += 1
        n = 0
        if self.peer:
            n = self.per_ip.get(self.peer, 0) + 1
            self.per_ip[self.peer] = n
        per_ip_cap = self.limits.max_connections_per_ip
        if g.connections_open > self.limits.max_connections or (per_ip_cap and n > per_ip_cap):
            self.closed = True
            self.transport.abort()  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is None:
            return
        self.closed = True
        self.registry.discard(self)
        stats.GLOBAL.connections_open -= 1
        if self.peer:
            n = self.per_ip.get(self.peer, 1) - 1
            if n > 0:
                self.per_ip[self.peer] = n
            else:
                self.per_ip.pop(self.peer, None)
        if self.tunnel is not None:
            self.tunnel.close()
            self.tunnel = None
        ex = self.active
        if ex is not None:
            self.active = None
            up = ex.upstream
            if up is not None:
                up.abandon()  # the client left: the upstream connection cannot be reused
            self.settle(ex, 499 if ex.status == 0 else ex.status)
        for q in self.queue:
            if not q.settled:
                q.settled = True
        self.queue.clear()

    def pause_writing(self) -> None:
        ex = self.active
        if ex is not None and ex.upstream is not None:
            ex.upstream.pause_reading()
        elif self.tunnel is not None:
            self.tunnel.pause_reading()

    def resume_writing(self) -> None:
        ex = self.active
        if ex is not None and ex.upstream is not None:
            ex.upstream.resume_reading()
        elif self.tunnel is not None:
            self.tunnel.resume_reading()

    def pause(self, reason: int) -> None:
        if not self.paused and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self.paused |= reason

    def resume(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused and self.transport is not None and not self.closed:
                self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.write_raw(data)
            return
        upgrading = self.upgrading
        if upgrading is not None and upgrading.held is not None:
            upgrading.held.append(data)  # not HTTP until the upgrade is answered: held, reading paused
            self.pause(PAUSE_BUFFER)
            return
        tail = self.fast_tail
        if tail and self.active is None and self.parsing is None and upgrading is None and not self.closed:
            # The fast path: a read that is `GET ` or `HEAD `, a target, then the last plain request's
            # head from its " HTTP/1.1" on, byte for byte, needs no parse. (Byte tests, not
            # startswith: compiled, an index is a C read, a method call costs a lookup.)
            end = len(data) - len(tail)
            if end >= 5 and data.endswith(tail):
                start = 0
                if data[0] == 71 and data[1] == 69 and data[2] == 84 and data[3] == 32:  # "GET "
                    start = 4
                elif data[0] == 72 and data[4] == 32 and data[:4] == b"HEAD":
                    start = 5
                if start and data[start] == 47:  # "/": origin form
                    url = data[start:end]
                    # Visible ASCII only (translate returns the object itself when nothing changes).
                    if len(url) <= self.max_url_bytes and url.translate(_TARGET_TABLE) is url:
                        self._fast_request(b"GET" if start == 4 else b"HEAD", url)
                        return
        before = self.parsing
        count = self.requests
        # One clock read per read: the requests it begins and sends share it (`read_now`), instead
        # of one read when a request begins and another when it is sent microseconds later.
        self.read_now = _now()
        self.fresh = None
        try:
            self.feed(data)
        except HttpParserUpgrade as e:
            self.after_upgrade(data[e.args[0] :])
            return
        except HttpParserError as e:
            self.fail_parse(parse_error_answer(e))
            return
        finally:
            self.read_now = 0.0
        ex = self.parsing
        # This read was one whole request alone: none begun before it, none left unfinished.
        alone = ex is None and before is None and self.requests == count + 1 and not self.closed
        fresh = self._take_fresh()
        if fresh is not None and alone:
            self._learn(fresh, data)
        if ex is not None and not self.closed:
            if ex.chunked:
                self.chunk_lines(ex, data, before is None and self.requests == count + 1)
            elif ex is before and not ex.method:
                # A head still unfinished after a whole read. llhttp keeps unfinished fields and skips
                # whitespace without bound, so the raw bytes count against the limits.
                ex.head_raw += len(data)
                if ex.head_raw > self.limits.max_header_bytes + self.limits.max_url_bytes:
                    self.fail_parse(http1.HEADERS_TOO_LARGE)
        done = self.last_chunked
        if done is not None:
            self.last_chunked = None
            if alone:
                self.chunk_lines(done, data, True)  # this read was one whole chunked request

    def _take_fresh(self) -> Exchange | None:
        """The plain request on_headers_complete saw during the feed. (A method: read in line after
        the `self.fresh = None` before the feed, mypy, and so mypyc, would take it for that None.)"""
        fresh = self.fresh
        self.fresh = None
        return fresh

    def _fast_request(self, method: bytes, url: bytes) -> None:
        """Serve a request the fast path recognised: the fields llhttp gave its head last time."""
        now = _now()
        ex = Exchange(now, self, self.fast_headers)
        ex.method = method
        ex.url = url
        ex.host = self.fast_host
        ex.conn_tokens = self.fast_tokens
        ex.forwarded_for = self.fast_xff
        if method == b"HEAD":
            ex.head_only = True
        ex.request_done = True
        self.requests += 1
        self.fast_requests += 1
        self.fast_hit = True
        ex.keep_alive = self.requests < self.max_requests and not self.holder.draining
        self.state = BUSY
        self.active = ex
        self.read_now = now
        try:
            self.dispatch(ex)
        except Reject as e:  # as llhttp's path answers a callback's Reject or other failure
            self.fail_parse(e.response)
        except Exception:
            self.fail_parse(http1.BAD_REQUEST)
        finally:
            self.read_now = 0.0

    def _learn(self, ex: Exchange, data: bytes) -> None:
        """Learn a parsed plain request's head as the template, backing off where heads vary.

        A template that never served a request was wasted work (learning costs a copy and a few
        compares, the failed match another): after two in a row, the next 1, 2, 4 ... 64 plain
        requests are not learned from, so traffic whose fields differ every request (a trace id, a
        sequence number) pays for one learn in about 65. A template that serves resets the back-off.
        """
        skip = self.learn_skip
        if skip:
            self.learn_skip = skip - 1
            return
        if self.fast_hit:
            self.learn_gap = 0
        elif self.fast_tail:
            gap = self.learn_gap
            self.learn_gap = min(2 * gap, LEARN_GAP_MAX) if gap else 1
            if gap:
                self.learn_skip = gap
                self.fast_tail = b""  # nothing to compare while skipping
                return
        self.fast_hit = False
        self._learn_head(ex, data)

    def _learn_head(self, ex: Exchange, data: bytes) -> None:
        """Keep the head of a plain request that was a whole read alone, for the fast path."""
        # The read must be exactly "METHOD TARGET HTTP/1.1\r\n...\r\n\r\n". Tested on the tail (kept
        # anyway) and one slice, no concatenation: bytes.startswith with an offset is a generic
        # method call (argument parsing, ~400 instructions), too dear for a head that varies each time.
        method = ex.method
        url = ex.url
        n = len(method)
        start = n + 1 + len(url)
        tail = data[start:]
        if (
            tail.startswith(b" HTTP/1.1\r\n")
            and tail.endswith(b"\r\n\r\n")
            and data[n] == 32
            and data.startswith(method)
            and data[n + 1 : start] == url
        ):
            self.fast_tail = tail
            self.fast_host = ex.host
            self.fast_headers = ex.headers
            self.fast_tokens = ex.conn_tokens
            self.fast_xff = ex.forwarded_for

    def eof_received(self) -> bool | None:
        # Half-close from the client: finish what is in flight, then close.
        ex = self.parsing
        if ex is not None and ex.method and not ex.request_done:
            self.fail_parse(http1.BAD_REQUEST)  # its body can never complete: not sent on, not waited on
        elif self.queue or self.active is not None:
            last = self.queue[-1] if self.queue else self.active
            assert last is not None
            last.keep_alive = False  # nothing more can come: close once the last answer is out
        return not self.closed and (self.active is not None or bool(self.queue))

    def fail_parse(self, response: http1.Canned) -> None:
        """A malformed request: answer (once prior responses are out) with an error and close."""
        stats.GLOBAL.bad_requests += 1
        ex = self.parsing
        self.parsing = None
        self.pause(PAUSE_PIPELINE)
        if ex is not None and ex.method and not ex.request_done:
            # The error is in the body of a request already dispatched or queued: a partial body never
            # goes (or waits) upstream.
            if ex.discard:
                self.close()  # it was answered already: nothing more to say
                return
            ex.request_done = True  # nothing more is read for it: answer, then close at once
            if ex is self.active:
                self.reject_body(ex, response)
                return
            if ex in self.queue:
                self.queue.remove(ex)
        bad = Exchange(_now())
        bad.canned = response.close
        bad.request_done = True
        bad.keep_alive = False
        if self.active is None:
            self.active = bad
            self.answer_local(bad)
        else:
            self.queue.append(bad)

    # ---- llhttp callbacks ---------------------------------------------------------------------
    def on_message_begin(self) -> None:
        ex = Exchange(self.read_now, self)  # llhttp calls back only from data_received: read_now is fresh
        self.parsing = ex
        self.header_bytes = 0
        self.header_count = 0
        if self.state == IDLE:
            self.state = READING_HEAD
            self.since = ex.started

    def on_url(self, url: bytes) -> None:
        ex = self.parsing
        assert ex is not None
        ex.url += url
        if len(ex.url) > self.max_url_bytes:
            raise Reject(http1.URI_TOO_LONG)

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self.parsing
        assert ex is not None
        self.header_count += 1
        self.header_bytes += len(name) + len(value) + 4
        if self.header_bytes > self.max_header_bytes or self.header_count > self.max_headers:
            raise Reject(http1.HEADERS_TOO_LARGE)
        if ex.method:
            return  # a trailer field (after a chunked body): counted, never merged into the header section
        if value and (value[-1] == 32 or value[-1] == 9):
            # Trailing OWS is not part of the value (RFC 9110 §5.5); llhttp already drops the leading.
            value = value.rstrip(b" \t")
        kind = http1.field_kind(name)
        if kind == http1.FIELD_PLAIN:
            ex.headers.append((name, value))
        elif kind == http1.FIELD_HOST:
            if ex.host:
                raise Reject(http1.BAD_REQUEST)  # twice (an empty one was refused already)
            if value != self.host_valid:
                if not value or value.translate(None, http1.HOST_CHARS):
                    raise Reject(http1.BAD_REQUEST)  # empty, or not a host
                self.host_valid = value
                self.host_key = http1.route_host(value)
            ex.host = value
        elif kind == http1.FIELD_CONTENT_LENGTH:
            if ex.content_length is not None:
                raise Reject(http1.BAD_REQUEST)  # duplicates are a smuggling vector, even when equal
            if not value.isdigit():
                raise Reject(http1.BAD_REQUEST)
            ex.content_length = int(value)
        elif kind == http1.FIELD_TRANSFER_ENCODING:
            ex.te = value if ex.te is None else ex.te + b"," + value
        elif kind == http1.FIELD_CONNECTION:
            tokens = _CONNECTION_COMMON.get(value)
            if tokens is None:
                tokens = tuple([t.strip().lower() for t in value.split(b",")])
            ex.conn_tokens = tokens if ex.conn_tokens is None else ex.conn_tokens + tokens
        elif kind == http1.FIELD_EXPECT:
            if value.lower() == b"100-continue":
                ex.expect_continue = True
            else:
                raise Reject(http1.error(417, "unsupported expectation"))
        elif kind == http1.FIELD_UPGRADE:
            ex.upgrade = value
        elif kind == http1.FIELD_FORWARDED_FOR:
            ex.forwarded_for = value if ex.forwarded_for is None else ex.forwarded_for + b", " + value
        elif kind == http1.FIELD_UNDERSCORED:
            raise Reject(http1.BAD_REQUEST)  # CGI-style backends would read it as a field we control
        # FIELD_DROPPED: keep-alive, proxy-*, te, trailer, x-forwarded-proto/-host (we set our own).

    def on_headers_complete(self) -> None:
        ex = self.parsing
        assert ex is not None
        if self.closed:
            return  # pipelined after a `Connection: close` answer: never served
        parser = self.parser
        self.requests += 1
        ex.method = self.get_method()
        keep = self.should_keep()
        tokens = ex.conn_tokens
        # HTTP/1.1 keeps alive unless told otherwise; only ask llhttp for the version (a string
        # format per call) when the answer could be 1.0: no keep-alive, or an explicit keep-alive token.
        if not keep or (tokens is not None and b"keep-alive" in tokens):
            version = parser.get_http_version()
            if version != "1.1":
                if version != "1.0":
                    raise Reject(http1.BAD_REQUEST)  # HTTP/0.9 and 2.0 (llhttp parses them): not served
                ex.http10 = True
        # While draining, every answer (proxied, cached or local) says `Connection: close`.
        ex.keep_alive = keep and self.requests < self.max_requests and not self.holder.draining
        if ex.te is not None:
            # RFC 9112 §6.1, §6.3: with Content-Length or in HTTP/1.0 the framing is faulty (a smuggling
            # attempt): 400. Chunked must be the final coding (else 400); other codings are not implemented.
            if ex.content_length is not None or ex.http10:
                raise Reject(http1.BAD_REQUEST)
            if ex.te.strip().lower() != b"chunked":
                codings = [c.strip() for c in ex.te.lower().split(b",")]
                final = codings[-1] == b"chunked" and all(c and c != b"chunked" for c in codings[:-1])
                raise Reject(http1.NOT_IMPLEMENTED if final else http1.BAD_REQUEST)
            ex.chunked = True
        if not ex.host and not ex.http10:
            raise Reject(http1.BAD_REQUEST)  # RFC 9112 §3.2: Host is required in HTTP/1.1
        if ex.method == b"HEAD":
            ex.head_only = True
        elif ex.method == b"CONNECT":
            raise Reject(
                http1.error(
                    405,
                    "CONNECT is not supported",
                    extra=((b"Allow", b"GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS"),),
                )
            )
        if ex.upgrade is not None:
            if not (ex.conn_tokens and b"upgrade" in ex.conn_tokens):
                ex.upgrade = None  # Upgrade without Connection: upgrade is not an upgrade request
            if parser.should_upgrade() != (ex.upgrade is not None):
                raise Reject(http1.BAD_REQUEST)  # llhttp would stop parsing where we would not, or go on
            if ex.upgrade is not None:
                if ex.chunked or ex.content_length:
                    raise Reject(http1.BAD_REQUEST)  # llhttp ends an upgrade request at its head: no body
                self.upgrading = ex
        if (
            keep
            and ex.te is None
            and ex.content_length is None
            and not ex.http10
            and not ex.expect_continue
            and ex.upgrade is None
            and (ex.method == b"GET" or ex.method == b"HEAD")
            and ex.url[:1] == b"/"
        ):
            self.fresh = ex  # a plain request: its head may serve the fast path (data_received)
        if not ex.chunked and not ex.content_length:
            ex.request_done = True  # no body: nothing more to read for this request
        else:
            self.rate_since = _now() + self.limits.body_rate_window  # the first window is grace
            self.rate_mark = 0
        self.state = BUSY
        if self.active is None:
            self.active = ex
            self.dispatch(ex)
        else:
            self.queue.append(ex)
            if len(self.queue) >= self.limits.max_pipelined:
                self.pause(PAUSE_PIPELINE)

    def on_body(self, data: bytes) -> None:
        ex = self.parsing
        if ex is None:
            return
        ex.body_bytes += len(data)  # counted even when dropped: the body-rate floor applies to drains too
        if ex.discard:
            return
        ex.io_count += 1
        route = ex.route
        if route is not None and ex.body_bytes > route.max_body_size:
            self._body_too_large(ex)
            return
        up = ex.upstream
        if up is not None and ex.sent_head:
            up.write_body(data, ex.chunked)
            return
        buf = ex.body_buf
        if buf is None:
            ex.body_buf = [data]
        else:
            buf.append(data)
        if ex.body_bytes > BODY_HIGH_WATER:
            self.pause(PAUSE_BUFFER)

    def on_chunk_header(self) -> None:
        ex = self.parsing
        if ex is not None:
            ex.chunks += 1

    def on_message_complete(self) -> None:
        ex = self.parsing
        self.parsing = None
        if ex is None:
            return
        ex.request_done = True
        if ex.chunked:
            self.last_chunked = ex
        if ex.discard:
            if not ex.keep_alive:
                self.close()  # answered with `Connection: close` and the body is drained: done
            elif self.active is None:
                self._next()
            return
        up = ex.upstream
        if up is not None and ex.sent_head and ex.chunked:
            up.write_raw(http1.LAST_CHUNK)

    # ---- dispatch -----------------------------------------------------------------------------
    # ---- local answers --------------------------------------------------------------------------
    def answer_local(self, ex: Exchange) -> None:
        """Write a precomputed answer; a body still on its way is read and dropped, then we go on."""
        assert self.transport is not None and ex.canned is not None
        if ex.status == 0:
            ex.status = http1.status_of(ex.canned)
        self.out(ex.canned)
        if not ex.request_done:
            ex.discard = True
            ex.keep_alive = False
        self.exchange_done(ex)

    def _body_too_large(self, ex: Exchange) -> None:
        self.reject_body(ex, http1.BODY_TOO_LARGE)

    def reject_body(self, ex: Exchange, response: http1.Canned) -> None:
        """Stop a request while its body is read: `response` and close if nothing was answered, else a cut."""
        ex.discard = True
        if ex.status == 0 and self.active is ex and (ex.upstream is None or not ex.upstream.head_written):
            up = ex.upstream
            if up is not None:
                up.abandon()  # a partial body went upstream: that connection is never reused
                ex.upstream = None
            self.local(ex, response, close=True)
        else:
            self.abort()

    # ---- completion ------------------------------------------------------------------------------
    def exchange_done(self, ex: Exchange, now: float = 0.0) -> None:
        """The response of `ex` is completely written: settle it and move to the next request.
        `now`: the caller's clock read, if it has one (0: read it here)."""
        self.settle(ex, ex.status, now)
        ex.upstream = None
        if self.active is ex:
            self.active = None
        if self.upgrading is ex:
            self.upgrading = None
            if ex.held:
                ex.keep_alive = False  # bytes sent after a refused upgrade are no HTTP we can trust
        self.resume(PAUSE_UPSTREAM)  # the upstream that was full is done with this client
        if self.closed:
            return
        transport = self.transport
        assert transport is not None
        if not ex.request_done and not ex.discard:
            ex.discard = True  # answered before the body was read (early response): read and drop the rest
        if not ex.keep_alive or ex.close_after or (self.holder.draining and not self.queue):
            if ex.discard and not ex.request_done:
                # Read and drop the rest of the body for a moment so the answer is not lost to a reset.
                self.loop.call_later(2.0, self.close)
                self.resume(PAUSE_BUFFER | PAUSE_PIPELINE)
                return
            self.close()
            return
        if ex.discard and not ex.request_done:
            return  # on_message_complete of this body calls _next()
        self._next(now)

    def _next(self, now: float = 0.0) -> None:
        if self.closed:
            return
        if self.queue:
            nxt = self.queue.popleft()
            self.active = nxt
            if len(self.queue) < self.limits.max_pipelined:
                self.resume(PAUSE_PIPELINE)
            self.dispatch(nxt)
            return
        self.resume(PAUSE_PIPELINE | PAUSE_BUFFER)
        if self.parsing is None:
            self.state = IDLE
            self.since = now or _now()
        else:
            self.state = READING_HEAD
            self.since = self.parsing.started

    def start_tunnel(self, up: Pooled, ex: Exchange) -> None:
        """After a 101: bytes flow both ways untouched until either side closes."""
        self.tunnel = up
        self.active = None
        self.state = BUSY
        self.settle(ex, 101)
        self.upgrading = None
        if ex.body_buf:
            for chunk in ex.body_buf:
                up.write_raw(chunk)
            ex.body_buf = None
        if ex.held:
            for chunk in ex.held:  # sent after the upgrade request, before the 101: the new protocol's
                up.write_raw(chunk)
        ex.held = None
        self.resume(PAUSE_BUFFER | PAUSE_PIPELINE | PAUSE_UPSTREAM)

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.out(data)

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.closed = True
            self.transport.abort()
