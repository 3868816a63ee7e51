"""The upstream side of the data plane: one keep-alive connection to a target, llhttp response parser.

Hot path, written inline for speed (see client.py). Rules it keeps:
- a connection serves one exchange at a time and returns to its target's idle pool only when the
  response was complete, the request fully sent and both sides agree to keep it alive;
- the response is re-framed for the client (Content-Length kept, chunked re-encoded, or
  close-delimited turned into chunked), never copied blindly: what the client sees is what we parsed;
- a pooled connection that dies before any response byte, for a request without a body already
  sent, is retried once on a fresh connection (nothing was lost, nothing is sent twice);
- ambiguous responses (Content-Length with Transfer-Encoding, differing Content-Lengths) are 502.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from time import monotonic
from typing import TYPE_CHECKING, Final

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

from gateway import http1
from gateway.cache import stage as cache_stage
from gateway.cache.store import Capture, start_capture
from gateway.cluster.pool import Pooled
from gateway.pipeline.exchange import PAUSE_BUFFER, PAUSE_UPSTREAM, Downstream, Exchange

if TYPE_CHECKING:
    from gateway.cluster.pool import TargetState

_now: Final = monotonic  # Final: a C static when compiled, not a module-dict lookup per call
_KEEP_TOKENS: Final = frozenset({b"keep-alive", b"close", b"upgrade", b""})
# Connection-level response fields (RFC 9110 §7.6.1) plus framing, at the start of a header line.
_SPECIAL_LINE: Final = re.compile(
    rb"\r\n(connection|keep-alive|proxy-connection|proxy-authenticate|proxy-authorization|te|trailer"
    rb"|transfer-encoding|upgrade|content-length)[ \t]*:"
)
# A line that may be one of the rarer special fields (keep-alive, proxy-*, te, trailer,
# transfer-encoding, upgrade): when there is none, only Content-Length/Connection need cutting.
_RARE_LINE: Final = re.compile(rb"\r\n[kptu]")
MAX_RESPONSE_HEAD: Final = 64 * 1024  # a response head not complete within this many bytes is garbage → 502


def request_head(ex: Exchange, peer: bytes, scheme: bytes, default_host: bytes) -> bytes:
    """Re-serialize the request for the upstream: origin-form, HTTP/1.1, hop-by-hop removed."""
    parts = [ex.method, b" ", ex.url, b" HTTP/1.1\r\nHost: ", ex.host or default_host, b"\r\n"]
    tokens = ex.conn_tokens
    drop = None
    if tokens is not None:
        drop = {t for t in tokens if t not in _KEEP_TOKENS}
    for name, value in ex.headers:
        if drop and name.lower() in drop:
            continue
        parts += (name, b": ", value, b"\r\n")
    xff = ex.forwarded_for + b", " + peer if ex.forwarded_for else peer
    parts += (b"X-Forwarded-For: ", xff, b"\r\nX-Forwarded-Proto: ", scheme, b"\r\n")
    if ex.host:
        parts += (b"X-Forwarded-Host: ", ex.host, b"\r\n")
    if ex.chunked:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    elif ex.content_length is not None:
        parts.append(b"Content-Length: %d\r\n" % ex.content_length)
    if ex.upgrade is not None:
        parts += (b"Connection: Upgrade\r\nUpgrade: ", ex.upgrade, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def _plain(ex: Exchange, client: Downstream) -> bool:
    """An exchange whose answer is the upstream's head as the proxy forwards it to anyone: kept
    alive, not HEAD, not HTTP/1.0, no cache fill, no added fields (rate-limit, cache label), not
    draining. A response head remembered from one plain exchange is answered the same to another."""
    return (
        ex.keep_alive
        and not ex.head_only
        and not ex.http10
        and not ex.cache_fill
        and ex.extra_headers is None
        and ex.cache_status is None
        and not client.holder.draining
    )


class UpstreamProtocol(Pooled):
    __slots__ = (
        "bad_framing",
        "capture",
        "chunked_out",
        "cl",
        "client",
        "conn_tokens",
        "ex",
        "feed",
        "finished",
        "got_bytes",
        "idle_pending",
        "keep",
        "loop",
        "out",
        "out_write",
        "parser",
        "paused",
        "raw",
        "raw_pos",
        "reused",
        "status",
        "target",
        "te",
        "timer",
        "transport",
        "tunnel",
        "until_close",
    )

    def __init__(self, target: TargetState, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.target = target
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = HttpResponseParser(self)
        # Bound once per connection (and per parser): no method lookup per call.
        self.feed: Callable[[bytes], object] = self.parser.feed_data
        self.out_write: Callable[[bytes], object] = http1.not_connected
        self.ex: Exchange | None = None
        self.client: Downstream | None = None
        self.reused = False
        self.timer: asyncio.TimerHandle | None = None
        self.paused = False
        self.tunnel = False
        self.out: list[bytes] | None = None
        self.finished = False  # a response ended within the current read
        # The response ended while its read was being parsed: the connection joins the idle pool only
        # once the whole read is parsed without surplus bytes (a waiter admitted by that response's
        # settle must not be handed a connection whose next "response" is already in the buffer).
        self.idle_pending = False
        self._reset_response()

    def _reset_response(self) -> None:
        self.status = 0
        self.head_written = False
        self.chunked_out = False
        self.until_close = False
        self.got_bytes = False
        self.keep = False
        self.cl: bytes | None = None
        self.te: bytes | None = None
        self.conn_tokens: list[bytes] | None = None
        self.bad_framing = False
        self.capture: Capture | None = None
        self.raw = b""
        self.raw_pos = 0

    def __repr__(self) -> str:
        return f"<Upstream {self.target.address} {'closed' if self.closed else 'open'} ex={self.ex!r}>"

    # ---- sending ------------------------------------------------------------------------------
    def send(self, ex: Exchange, client: Downstream, reused: bool, now: float = 0.0) -> None:
        """Write the request of `ex` on this connection. `now`: the caller's clock read, if any."""
        assert self.transport is not None
        self.ex = ex
        self.client = client
        self.reused = reused
        ex.upstream = self
        self._reset_response()
        target = self.target
        host = ex.host
        tokens = ex.conn_tokens
        if (
            host
            and (tokens is None or all(t in _KEEP_TOKENS for t in tokens))
            and ex.content_length is None
            and not ex.chunked
            and ex.upgrade is None
            and ex.forwarded_for is None
        ):
            # A plain request: everything after its request line depends only on Host and the
            # fields, which a connection's requests usually repeat; built once per change. (A
            # Connection field naming only keep-alive/close names no field to drop: still plain.)
            if host == client.tail_host and ex.headers == client.tail_headers:
                head = b"".join((ex.method, b" ", ex.url, client.tail))
            else:
                head = request_head(ex, client.peer, client.scheme, b"")
                client.tail = head[len(ex.method) + 1 + len(ex.url) :]
                client.tail_host = host
                client.tail_headers = ex.headers
        else:
            head = request_head(ex, client.peer, client.scheme, target.address.encode())
        buf = ex.body_buf
        if buf:
            ex.body_buf = None
            ex.replayable = False
            if ex.chunked:
                self.out_write(head + b"".join([http1.chunk(b) for b in buf]))
            else:
                self.out_write(head + b"".join(buf))
            client.resume(PAUSE_BUFFER)
        else:
            self.out_write(head)
        if ex.request_done and ex.chunked:
            self.out_write(http1.LAST_CHUNK)
        ex.sent_head = True
        # The response timeout is enforced by the server's sweeper from `sent_at` (no timer per
        # request): a 504 comes between `response` and `response` + one tick (≤ response / 10).
        ex.sent_at = now or _now()

    def write_body(self, data: bytes, chunked: bool) -> None:
        ex = self.ex
        if ex is not None:
            ex.replayable = False
        if self.transport is not None and not self.closed:
            self.out_write(http1.chunk(data) if chunked else data)

    def write_raw(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.out_write(data)

    # ---- connection -----------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop transports are not asyncio.Transport
        self.out_write = transport.write  # type: ignore[attr-defined]

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client.pause(PAUSE_UPSTREAM)

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.resume(PAUSE_UPSTREAM)

    def pause_reading(self) -> None:
        if not self.paused and self.transport is not None and not self.closed:
            self.paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def eof_received(self) -> bool | None:
        # The peer is done with this connection: never hand it out again, from this instant.
        self.closed = True
        if self.ex is None:
            self._leave_pool()
        return False

    def _leave_pool(self) -> None:
        """Drop this connection from its target's idle pool now, not at the next sweep or request."""
        idle = self.target.idle
        if self in idle:
            idle.remove(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.idle_pending = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        client = self.client
        if self.tunnel:
            if client is not None:
                client.close()
            return
        ex = self.ex
        if ex is None or client is None:
            self._leave_pool()
            return
        self.ex = None
        if self.head_written and self.until_close:
            if self.chunked_out:
                client.write(http1.LAST_CHUNK)
            self._account(ex, ex.status)
            client.exchange_done(ex)
        elif not self.got_bytes and self.reused and ex.replayable and ex.body_bytes == 0:
            client.retry_fresh(ex)
        elif not self.head_written:
            client.upstream_failed(ex, http1.BAD_GATEWAY_RESET, "reset")
        else:
            client.abort()  # mid-body: a clean cut is the only honest signal left

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abandon(self) -> None:
        """Give up on this connection mid-exchange (client gone, timeout): never reuse it."""
        self.ex = None
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.transport is not None:
            self.transport.abort()

    def response_timeout(self) -> None:
        self.timer = None
        ex = self.ex
        client = self.client
        if ex is None or client is None or self.head_written:
            return
        self.abandon()
        client.upstream_failed(ex, http1.GATEWAY_TIMEOUT, "response_timeout")

    # ---- receiving ------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.tunnel:
            if self.client is not None:
                self.client.write(data)
            return
        ex = self.ex
        if ex is None:
            self.close()  # bytes on an idle connection: the backend is confused; do not reuse
            self._leave_pool()
            return
        self.got_bytes = True
        self.finished = False
        if self.status == 0:  # reading a response head: keep its raw bytes for on_headers_complete
            raw = self.raw
            fast = self.target.fast_head
            if (
                fast is not None
                and not raw
                and len(data) == len(fast[0]) + fast[2]
                and data.startswith(fast[0])
                and self._answer_known(ex, fast, data)
            ):
                return
            self.raw = raw + data if raw else data
        # Output produced while parsing this read is written once at the end: head and body of a
        # small response leave in one syscall, as nginx's writev does.
        self.out = []
        try:
            self.feed(data)
        except HttpParserUpgrade as e:
            self._flush()
            self._start_tunnel(data[e.args[0] :])
        except HttpParserError:
            self._flush()
            self.idle_pending = False  # surplus bytes after a complete response, or garbage
            self._invalid()
        else:
            self._flush()
            if self.idle_pending:
                self.idle_pending = False
                if not self.closed:
                    self.target.put_idle(self, _now())
            elif self.status == 0 and self.ex is not None and len(self.raw) > MAX_RESPONSE_HEAD:
                self._invalid()  # a head that never ends (headers streamed forever)

    def _answer_known(self, ex: Exchange, fast: tuple[bytes, bytes, int, int], data: bytes) -> bool:
        """`data` is a whole response whose head is byte for byte one llhttp already accepted from this
        target, with its Content-Length: answer as that one was answered, without parsing it again.
        Only for an exchange the head was answered for unchanged (False: parse as usual)."""
        client = self.client
        status = fast[3]
        pool = ex.pool
        if client is None or not _plain(ex, client) or (pool is not None and pool.retries_status(status)):
            return False
        self.status = ex.status = status
        self.keep = True
        self.head_written = True
        n = fast[2]
        ex.response_bytes += n
        ex.io_count += 1
        client.write(fast[1] + data[len(data) - n :] if n else fast[1])
        self._finish(ex, client)
        return True

    def on_message_begin(self) -> None:
        if self.finished:
            # More bytes than the response declared, in the same read: another "response" the next
            # request on this connection would get. The connection is never reused.
            raise ValueError("bytes after the end of the response")

    def _flush(self) -> None:
        out = self.out
        self.out = None
        if out and self.client is not None:
            self.client.write(out[0] if len(out) == 1 else b"".join(out))

    def _invalid(self) -> None:
        ex = self.ex
        client = self.client
        self.abandon()
        if ex is not None and client is not None:
            if self.head_written:
                client.abort()
            elif self.reused and ex.replayable and ex.body_bytes == 0:
                # A pooled connection whose next bytes are no valid answer to this request: the late
                # surplus of an earlier answer, or a stream out of step. Nothing was answered: once more
                # on a fresh connection, as when a pooled connection dies before answering.
                client.retry_fresh(ex)
            else:
                client.upstream_failed(ex, http1.BAD_GATEWAY_INVALID, "invalid_response")

    def _headers(self, block: bytes) -> bytes:
        """End-to-end header lines of a response head; records framing and connection fields."""
        memo = self.target.head_memo
        if memo is not None and memo[0] == block:  # the same head as last time: the same result
            self.cl = memo[2]
            self.conn_tokens = memo[3]
            return memo[1]
        low = block.lower()
        if _RARE_LINE.search(low) is None:  # one scan instead of four `in` tests
            # Common case: at most one Content-Length and one Connection line to take out.
            fast = self._headers_fast(block, low)
            if fast is not None:
                self.target.head_memo = (block, fast, self.cl, self.conn_tokens)
                return fast
        cuts: list[tuple[int, int]] | None = None
        for m in _SPECIAL_LINE.finditer(low):
            name = m.group(1)
            line_end = low.find(b"\r\n", m.end())
            if line_end < 0:
                line_end = len(low)
            if name == b"upgrade":
                continue  # forwarded with a 101
            value = block[m.end() : line_end].strip()
            if name == b"content-length":
                if self.cl is not None and self.cl != value:
                    self.bad_framing = True
                self.cl = value
            elif name == b"transfer-encoding":
                self.te = value if self.te is None else self.te + b"," + value
            elif name == b"connection":
                named = [t.strip().lower() for t in value.split(b",")]
                self.conn_tokens = named if self.conn_tokens is None else self.conn_tokens + named
            if cuts is None:
                cuts = []
            cuts.append((m.start(), line_end))
        if cuts is not None:
            pieces = []
            pos = 0
            for a, b in cuts:
                pieces.append(block[pos:a])
                pos = b
            pieces.append(block[pos:])
            block = b"".join(pieces)
        tokens = self.conn_tokens
        if tokens is not None and any(t not in _KEEP_TOKENS for t in tokens):
            drop = {t for t in tokens if t not in _KEEP_TOKENS}
            lines = [h for h in block.split(b"\r\n") if h and h.split(b":", 1)[0].strip().lower() not in drop]
            return b"".join(h + b"\r\n" for h in lines)
        return block[2:] + b"\r\n" if block else b""

    def _headers_fast(self, block: bytes, low: bytes) -> bytes | None:
        """`_headers` for heads whose only special lines are one Content-Length and one Connection;
        None sends anything else (duplicates, other tokens) to the general path."""
        i = low.find(b"\r\ncontent-length:")
        j = low.find(b"\r\nconnection:")
        if (i >= 0 and low.find(b"\r\ncontent-length:", i + 17) >= 0) or (
            j >= 0 and low.find(b"\r\nconnection:", j + 13) >= 0
        ):
            return None
        if j >= 0:
            j_end = low.find(b"\r\n", j + 13)
            if j_end < 0:
                j_end = len(low)
            token = low[j + 13 : j_end].strip()
            if token not in _KEEP_TOKENS:
                return None  # may name other headers to drop
            self.conn_tokens = [token]
        if i >= 0:
            i_end = low.find(b"\r\n", i + 17)
            if i_end < 0:
                i_end = len(low)
            self.cl = block[i + 17 : i_end].strip()
        # Each cut starts at its line's leading CRLF, so what remains still starts with one.
        if i < 0 and j < 0:
            rest = block
        elif i < 0:
            rest = block[:j] + block[j_end:]
        elif j < 0:
            rest = block[:i] + block[i_end:]
        elif i < j:
            rest = block[:i] + block[i_end:j] + block[j_end:]
        else:
            rest = block[:j] + block[j_end:i] + block[i_end:]
        return rest[2:] + b"\r\n" if rest else b""

    def on_headers_complete(self) -> None:
        ex = self.ex
        client = self.client
        if ex is None or client is None:
            return
        parser = self.parser
        status = parser.get_status_code()
        # The head is taken from the raw bytes llhttp just validated (one regex pass finds the few
        # connection-level lines) rather than through a Python callback per header.
        raw = self.raw
        start = self.raw_pos
        end = raw.find(b"\r\n\r\n", start)
        if end < 0:
            raise ValueError("response head not found")
        self.raw_pos = end + 4
        if status < 200 and status != 101:
            return  # interim response (100, 102, 103): not forwarded
        block = raw[raw.find(b"\r\n", start) : end]  # "\r\nName: value" per header, or empty
        # Bytes after the head of a HEAD answer (a body it must not have): the client gets the head,
        # the connection is never pooled (a fresh parser next time would read them as a response).
        surplus = ex.head_only and len(raw) > self.raw_pos
        self.raw = b""
        headers = self._headers(block) if block else b""
        if self.bad_framing or (self.te is not None and self.cl is not None):
            raise ValueError("ambiguous response framing")
        pool = ex.pool
        if pool is not None and pool.retries_status(status) and client.try_retry(ex, str(status), True):
            return  # this connection was abandoned; the exchange went to another target
        # Before ex.status is set: serve_stale only answers an exchange that has not answered yet.
        if status >= 500 and cache_stage.can_serve_stale(client, ex):
            # stale-if-error answers (and abandons this connection); the 5xx still counts for the
            # circuit breaker and outlier ejection first, or an outage hidden by the cache would
            # never open the circuit and every miss would keep going to the failing backend.
            self._account(ex, status)
            cache_stage.serve_stale(client, ex, "5xx")
            return
        if status == 101 and ex.upgrade is None:
            raise ValueError("101 without an upgrade request")  # before ex.status: still a clean 502
        self.status = ex.status = status
        parts = [http1.status_line(status), headers]
        if ex.cache_fill:
            route = ex.route
            if route is not None and route.cache is not None:
                self.capture = start_capture(route.cache, ex, status, parts, self.cl)
        if status == 101:
            if ex.upgrade is None:
                raise ValueError("101 without an upgrade request")
            parts.append(b"Connection: Upgrade\r\n\r\n")
            self._emit(b"".join(parts))
            self.head_written = True
            return
        self.keep = parser.should_keep_alive() and not surplus
        no_body = ex.head_only or status == 204 or status == 304
        close = not ex.keep_alive or client.holder.draining
        if no_body:
            if self.cl is not None:
                parts.append(b"Content-Length: " + self.cl + b"\r\n")
        elif self.te is not None:
            if self.te.lower().rsplit(b",", 1)[-1].strip() == b"chunked":  # as llhttp: the final coding
                if ex.http10:
                    close = True
                else:
                    self.chunked_out = True
                    parts.append(b"Transfer-Encoding: chunked\r\n")
            else:
                self.until_close = True
        elif self.cl is not None:
            parts.append(b"Content-Length: " + self.cl + b"\r\n")
        else:
            self.until_close = True
        if self.until_close:
            self.keep = False
            if ex.http10:
                close = True
            else:
                self.chunked_out = True
                parts.append(b"Transfer-Encoding: chunked\r\n")
        if ex.extra_headers is not None:
            parts.append(ex.extra_headers)
        if ex.cache_status is not None:
            route = ex.route
            if route is not None and route.cache is not None and route.cache.label is not None:
                parts.append(route.cache.label + b": " + ex.cache_status.encode() + b"\r\n")
        if close:
            ex.close_after = True
            parts.append(b"Connection: close\r\n\r\n")
        elif ex.http10:
            parts.append(b"Connection: keep-alive\r\n\r\n")
        else:
            parts.append(b"\r\n")
        head = b"".join(parts)
        self._emit(head)
        self.head_written = True
        if (
            200 <= status < 300
            and status != 204
            and self.keep
            and self.te is None
            and self.cl is not None
            and self.cl.isdigit()
            and start == 0
            and _plain(ex, client)
        ):
            self.target.fast_head = (raw[: self.raw_pos], head, int(self.cl), status)
        if ex.head_only:
            # llhttp would wait for the body a HEAD answer never has: finish now, fresh parser next time.
            self.parser = HttpResponseParser(self)
            self.feed = self.parser.feed_data
            self._finish(ex, client)

    def on_body(self, data: bytes) -> None:
        ex = self.ex
        client = self.client
        if ex is None or client is None:
            return
        ex.response_bytes += len(data)
        ex.io_count += 1
        cap = self.capture
        if cap is not None and not cap.add(data):
            self.capture = None  # grew past max_object_bytes: stream through uncached
        self._emit(http1.chunk(data) if self.chunked_out else data)

    def _emit(self, data: bytes) -> None:
        out = self.out
        if out is not None:
            out.append(data)
        elif self.client is not None:
            self.client.write(data)

    def on_message_complete(self) -> None:
        ex = self.ex
        client = self.client
        if ex is None or client is None or self.status == 0 or self.status == 101:
            return
        if self.chunked_out:
            self._emit(http1.LAST_CHUNK)
        self._finish(ex, client)

    def _account(self, ex: Exchange, status: int, now: float = 0.0) -> None:
        """A response came: the attempt ends as answered (stats, ejection, circuit, adaptive)."""
        attempt = ex.attempt
        if attempt is not None and not attempt.ended:
            attempt.answered(status, (now or _now()) - ex.sent_at)

    def _finish(self, ex: Exchange, client: Downstream) -> None:
        parsing = self.out is not None  # called back from llhttp within data_received's feed
        self._flush()
        self.ex = None
        self.finished = True
        cap = self.capture
        if cap is not None:
            self.capture = None
            cap.store(ex)
        now = _now()  # one clock read for the stats, the pool and the client's bookkeeping
        self._account(ex, ex.status, now)
        if self.keep and ex.request_done and not self.closed and not self.until_close:
            self.client = None
            if self.paused:
                self.resume_reading()  # paused for that client's slow reading: the next user must read
            if parsing:
                self.idle_pending = True  # pooled once the rest of the read is parsed (data_received)
            else:
                self.target.put_idle(self, now)
        else:
            self.close()
        client.exchange_done(ex, now)

    def _start_tunnel(self, rest: bytes) -> None:
        ex = self.ex
        client = self.client
        if ex is None or client is None or self.status != 101:
            self._invalid()
            return
        self.tunnel = True
        self.ex = None
        if rest:
            client.write(rest)
        client.start_tunnel(self, ex)
