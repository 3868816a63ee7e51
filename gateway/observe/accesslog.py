"""Per-request access log: one JSON line per request, written off the hot path.

`record()` runs inside `Pipeline.settle` on every request, so it only does a sampling
check and appends one tuple to a list. Serializing (orjson) and writing happen on a timer on the
same loop (every 0.5 s, or at the next loop iteration once `buffer` records are waiting), as one
write per batch. With `access_log.enabled: false` no sink exists at all (`Holder.access_log` is
None) and the hot path pays one attribute check.

Fields: time (unix seconds, ms precision), client (socket peer), method, path (the request
target as received, query included), route, upstream, target, status, bytes (response bytes
sent), duration_s (arrival to settle), upstream_duration_s (request sent upstream to settle;
null when no target was used), shed_reason (null_upstream, circuit_open, no_healthy_target,
rate_limited, ... for local answers that shed load; else null).

Rotation: logrotate renames the file, then `SIGUSR1` → `reopen()`: what is buffered goes to
the old (renamed) file, later lines to a fresh file at `path`.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from time import monotonic as _now
from typing import TYPE_CHECKING, Any

import orjson

from gateway.observe import log

if TYPE_CHECKING:
    from gateway.config.model import AccessLogConfig

FLUSH_INTERVAL_S = 0.5
STDOUT = "stdout"

# (loop time, peer, method, url, route, upstream, target, status, bytes, duration, upstream duration, shed)
Record = tuple[
    float,
    bytes,
    bytes,
    bytes,
    str | None,
    str | None,
    str | None,
    int,
    int,
    float,
    float | None,
    str | None,
    str | None,
]


class AccessLog:
    """The `Holder.access_log` sink: buffered JSON lines to stdout or a file."""

    __slots__ = (
        "_closed",
        "_fd",
        "_flush_soon",
        "_records",
        "_seen",
        "_timer",
        "errors",
        "limit",
        "loop",
        "path",
        "sample",
        "settings",
        "written",
    )

    def __init__(
        self,
        settings: AccessLogConfig,
        loop: asyncio.AbstractEventLoop,
        interval_s: float = FLUSH_INTERVAL_S,
    ) -> None:
        self.settings = settings
        self.loop = loop
        self.path = settings.path
        self.sample = settings.sample
        self.limit = settings.buffer
        self.written = 0  # lines written so far
        self.errors = 0  # failed writes (their records are dropped)
        self._seen = 0
        self._records: list[Record] = []
        self._flush_soon = False
        self._closed = False
        self._fd: int | None = None if self.path == STDOUT else self._open()  # OSError: caller reports
        self._timer = loop.call_later(interval_s, self._tick, interval_s)

    def __repr__(self) -> str:
        return f"<AccessLog {self.path} sample={self.sample} buffered={len(self._records)}>"

    # ---- hot path ---------------------------------------------------------------------------
    def record(self, client: Any, ex: Any, status: int, duration_s: float) -> None:
        sample = self.sample
        if sample < 1.0:
            # Counter-based sampling, no random draw: after n requests floor(n * sample) are kept,
            # evenly spread (0.1 keeps exactly every tenth).
            n = self._seen + 1
            self._seen = n
            if int(n * sample) == int((n - 1) * sample):
                return
        # Both durations end at the settle instant (arrival + duration_s): one end, no second clock read.
        now = ex.started + duration_s
        route = ex.route
        pool = ex.pool
        target = ex.target
        records = self._records
        records.append(
            (
                now,
                client.peer,
                ex.method,
                ex.url,
                route.name if route is not None else None,
                pool.name if pool is not None else None,
                target.address if target is not None else None,
                status,
                ex.response_bytes,
                duration_s,
                now - ex.sent_at if target is not None else None,
                ex.shed_reason,
                ex.cache_status,
            )
        )
        if len(records) >= self.limit and not self._flush_soon:
            self._flush_soon = True
            self.loop.call_soon(self.flush)

    # ---- off the hot path ---------------------------------------------------------------------
    def _tick(self, interval_s: float) -> None:
        if self._closed:
            return
        self._timer = self.loop.call_later(interval_s, self._tick, interval_s)
        self.flush()

    def flush(self) -> None:
        """Serialize everything buffered and write it in one write."""
        self._flush_soon = False
        records = self._records
        if not records:
            return
        self._records = []
        offset = time.time() - _now()  # monotonic → wall clock
        dumps = orjson.dumps
        lines = [
            dumps(
                {
                    "time": round(t + offset, 3),
                    "client": peer.decode("latin-1"),
                    "method": method.decode("latin-1"),
                    "path": url.decode("utf-8", "backslashreplace"),
                    "route": route,
                    "upstream": upstream,
                    "target": target,
                    "status": status,
                    "bytes": nbytes,
                    "duration_s": round(duration, 6),
                    "upstream_duration_s": round(up_duration, 6) if up_duration is not None else None,
                    "shed_reason": shed,
                    "cache": cache,
                }
            )
            for (
                t,
                peer,
                method,
                url,
                route,
                upstream,
                target,
                status,
                nbytes,
                duration,
                up_duration,
                shed,
                cache,
            ) in records
        ]
        lines.append(b"")
        self._write(b"\n".join(lines), len(records))

    def _write(self, data: bytes, count: int) -> None:
        try:
            if self._fd is None:
                out = sys.stdout.buffer
                out.write(data)
                out.flush()
            else:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view) :]
        except (OSError, ValueError) as e:  # disk full, closed pipe, stdout closed
            self.errors += 1
            if self.errors == 1 or self.errors % 1000 == 0:
                log.event("access_log_write_failed", path=self.path, error=str(e), dropped=count)
            return
        self.written += count

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def reopen(self) -> None:
        """After rotation (SIGUSR1): flush to the old file, then write to a fresh one at `path`."""
        self.flush()
        if self._fd is None or self._closed:
            return
        try:
            fd = self._open()
        except OSError as e:
            log.event("access_log_reopen_failed", path=self.path, error=str(e))
            return  # keep writing to the old file rather than lose lines
        old, self._fd = self._fd, fd
        os.close(old)

    def close(self) -> None:
        """Flush what is buffered and release the file; the sink records nothing afterwards."""
        if self._closed:
            return
        self.flush()
        self._closed = True
        self.sample = 0.0  # a late record() (an exchange settling after close) is dropped
        self._timer.cancel()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
