"""Soak: mixed traffic against a gateway subprocess for a long time; does memory or fd count creep?

    flock /tmp/gateway-bench.lock python -m loadtest.soak                    # 120 s (CI-ish)
    flock /tmp/gateway-bench.lock python -m loadtest.soak --duration 1800    # the 30-minute soak

Everything runs on 127.0.0.1: the gateway (`gateway run`, one process) in front of two aiohttp
backends in their own processes (`--serve-backend`, this module): `a` stays up, `b` is stopped and
started again at 1/3 and 2/3 of the run (a backend restarted mid-run, with the gateway's pooled
connections to it going stale).

Traffic, from asyncio workers in this process, each a bounded loop until the end of the run:
  keepalive_get   GET /a/ok on a kept-alive connection
  close_get       GET /a/ok with `Connection: close` (a new connection each time)
  post_small      POST /a/echo, 1 KiB body (keep-alive)
  post_stream     POST /a/echo, 256 KiB chunked request body sent in 16 KiB pieces
  get_stream      GET /a/stream?kb=512: a chunked response streamed by the backend
  status_4xx      GET /a/status/404 (a 404 is the expected answer)
  status_5xx      GET /a/status/503 (a 503 is the expected answer)
  b_route         GET /b/ok (fails are expected only while b restarts)
  websocket       /a/ws: 10 echoed messages, then close
  abort_mid_body  GET /a/stream?kb=4096, read 64 KiB, then reset the connection

Every 2 s the gateway process's RSS (VmRSS, /proc/PID/status) and open fds (/proc/PID/fd) are
sampled. After a warm-up (20 % of the run, at least 10 s, at most 5 min) a least-squares slope is
fitted: KB/min and fds/min. Reported too: requests per kind, failed requests that should have
succeeded (by kind and reason), the expected failures during b's restarts, and the fds once the
clients are gone. Results: loadtest/results/soak.json (--out).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
SAMPLE_EVERY_S = 2.0
RESTART_DOWN_S = 1.0
RESTART_MARGIN_S = 2.0  # b_route failures this close to a restart are expected


# ---- the backend (runs in its own process: python -m loadtest.soak --serve-backend PORT) -------------


def serve_backend(port: int) -> None:
    import uvloop
    from aiohttp import WSMsgType, web

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def echo(request: web.Request) -> web.Response:
        n = 0
        async for chunk in request.content.iter_any():
            n += len(chunk)
        return web.Response(text=str(n))

    async def stream(request: web.Request) -> web.StreamResponse:
        kb = min(int(request.query.get("kb", "64")), 65536)
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        piece = b"s" * 16384
        for _ in range(max(1, kb // 16)):
            await resp.write(piece)
        await resp.write_eof()
        return resp

    async def status(request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]), text="status\n")

    async def ws(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        async for msg in sock:
            if msg.type == WSMsgType.TEXT:
                await sock.send_str(msg.data)
            else:
                break
        return sock

    app = web.Application(client_max_size=1 << 30)
    for prefix in ("/a", "/b"):
        app.router.add_get(prefix + "/ok", ok)
        app.router.add_post(prefix + "/echo", echo)
        app.router.add_get(prefix + "/stream", stream)
        app.router.add_get(prefix + "/status/{code}", status)
        app.router.add_get(prefix + "/ws", ws)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


# ---- measurements ------------------------------------------------------------------------------------


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def slope_per_min(points: list[tuple[float, float]]) -> dict[str, float | None]:
    """Least-squares slope (per minute) and R² of (t seconds, value) points."""
    n = len(points)
    if n < 3:
        return {"per_min": None, "r2": None}
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    stt = sum((t - mt) ** 2 for t, _ in points)
    stv = sum((t - mt) * (v - mv) for t, v in points)
    svv = sum((v - mv) ** 2 for _, v in points)
    if stt == 0:
        return {"per_min": None, "r2": None}
    b = stv / stt
    r2 = (stv * stv) / (stt * svv) if svv else 0.0
    return {"per_min": round(b * 60, 3), "r2": round(r2, 3)}


# ---- traffic -----------------------------------------------------------------------------------------


class Tally:
    def __init__(self) -> None:
        self.ok: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()
        self.expected: Counter[str] = Counter()
        self.restarts: list[tuple[float, float]] = []  # (down at, up again at or +inf), monotonic
        self.start = time.monotonic()
        self.failure_samples: list[tuple[float, str, str]] = []  # the first failures, for diagnosis

    def during_restart(self, t0: float, t1: float) -> bool:
        return any(
            t0 <= up + RESTART_MARGIN_S and t1 >= down - RESTART_MARGIN_S for down, up in self.restarts
        )

    def record(self, kind: str, ok: bool, reason: str, t0: float, in_restart: bool) -> None:
        if ok:
            self.ok[kind] += 1
        elif kind == "b_route" and in_restart:
            self.expected[kind] += 1
        else:
            self.failed[kind] += 1
            self.reasons[f"{kind}: {reason}"] += 1
            if len(self.failure_samples) < 50:
                self.failure_samples.append((round(t0 - self.start, 2), kind, reason))


async def _op(kind: str, session: Any, base: str, rng: random.Random) -> None:
    """One operation; raises on anything but the expected answer."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=15)
    if kind == "keepalive_get":
        async with session.get(base + "/a/ok", timeout=timeout) as r:
            assert r.status == 200 and await r.read() == b"ok", r.status
    elif kind == "close_get":
        async with session.get(base + "/a/ok", headers={"Connection": "close"}, timeout=timeout) as r:
            assert r.status == 200 and await r.read() == b"ok", r.status
    elif kind == "post_small":
        async with session.post(base + "/a/echo", data=b"p" * 1024, timeout=timeout) as r:
            assert r.status == 200 and await r.read() == b"1024", r.status
    elif kind == "post_stream":

        async def body() -> Any:
            for _ in range(16):
                yield b"q" * 16384
                await asyncio.sleep(0)

        async with session.post(base + "/a/echo", data=body(), timeout=timeout) as r:
            assert r.status == 200 and await r.read() == b"262144", r.status
    elif kind == "get_stream":
        async with session.get(base + "/a/stream?kb=512", timeout=timeout) as r:
            assert r.status == 200 and len(await r.read()) == 512 * 1024, r.status
    elif kind == "status_4xx":
        async with session.get(base + "/a/status/404", timeout=timeout) as r:
            assert r.status == 404, r.status
            await r.read()
    elif kind == "status_5xx":
        async with session.get(base + "/a/status/503", timeout=timeout) as r:
            assert r.status == 503, r.status
            await r.read()
    elif kind == "b_route":
        async with session.get(base + "/b/ok", timeout=timeout) as r:
            assert r.status == 200 and await r.read() == b"ok", r.status
    elif kind == "websocket":
        async with session.ws_connect(base + "/a/ws", timeout=aiohttp.ClientWSTimeout(ws_close=5)) as ws:
            for i in range(10):
                await ws.send_str(f"m{i}")
                msg = await asyncio.wait_for(ws.receive(), 10)
                assert msg.data == f"m{i}", msg
    else:
        raise ValueError(kind)


async def _abort_mid_body(host: str, port: int) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"GET /a/stream?kb=4096 HTTP/1.1\r\nHost: soak\r\n\r\n")
        got = b""
        for _ in range(10000):  # bounded: until 64 KiB arrived
            chunk = await asyncio.wait_for(reader.read(65536), 10)
            if not chunk:
                break
            got += chunk
            if len(got) >= 65536:
                break
        assert got.startswith(b"HTTP/1.1 200"), got[:40]
        assert len(got) >= 65536, len(got)
    finally:
        writer.transport.abort()  # a client gone mid-response (RST)


MIX = {
    "keepalive_get": 30,
    "close_get": 8,
    "post_small": 12,
    "post_stream": 4,
    "get_stream": 4,
    "status_4xx": 6,
    "status_5xx": 6,
    "b_route": 10,
}


async def http_worker(wid: int, base: str, end: float, tally: Tally, pause: float) -> None:
    import aiohttp

    rng = random.Random(wid)
    kinds, weights = zip(*MIX.items(), strict=True)
    connector = aiohttp.TCPConnector(limit=2, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(10_000_000):  # bounded; ends at `end`
            if time.monotonic() >= end:
                break
            kind = rng.choices(kinds, weights)[0]
            t0 = time.monotonic()
            try:
                await _op(kind, session, base, rng)
                ok, reason = True, ""
            except Exception as e:  # recorded, never fatal
                ok, reason = False, type(e).__name__ + (f" {e}" if isinstance(e, AssertionError) else "")
            tally.record(kind, ok, reason[:80], t0, tally.during_restart(t0, time.monotonic()))
            await asyncio.sleep(pause)


async def ws_worker(base: str, end: float, tally: Tally) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        for _ in range(10_000_000):
            if time.monotonic() >= end:
                break
            t0 = time.monotonic()
            try:
                await _op("websocket", session, base, random.Random())
                ok, reason = True, ""
            except Exception as e:
                ok, reason = False, type(e).__name__
            tally.record("websocket", ok, reason, t0, False)
            await asyncio.sleep(0.05)


async def abort_worker(host: str, port: int, end: float, tally: Tally) -> None:
    for _ in range(10_000_000):
        if time.monotonic() >= end:
            break
        t0 = time.monotonic()
        try:
            await _abort_mid_body(host, port)
            ok, reason = True, ""
        except Exception as e:
            ok, reason = False, type(e).__name__
        tally.record("abort_mid_body", ok, reason, t0, False)
        await asyncio.sleep(0.1)


# ---- orchestration ------------------------------------------------------------------------------------


def backend_command(port: int) -> list[str]:
    from loadtest import common

    python = common.venv_python()
    return [python, "-m", "loadtest.soak", "--serve-backend", str(port)]


async def restarter(
    proc_b: list[Any], port_b: int, logdir: Path, duration: float, start: float, tally: Tally
) -> None:
    from loadtest import common

    for frac in (1 / 3, 2 / 3):
        delay = start + duration * frac - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        down = time.monotonic()
        tally.restarts.append((down, float("inf")))  # failures from now on are expected, until up + margin
        await asyncio.to_thread(proc_b[0].stop)
        await asyncio.sleep(RESTART_DOWN_S)
        proc_b[0] = await asyncio.to_thread(
            common.start_process,
            f"backend-b-{len(tally.restarts) + 1}",
            backend_command(port_b),
            logdir,
            port_b,
        )
        tally.restarts[-1] = (down, time.monotonic())


async def sampler(pid: int, start: float, end: float, tally: Tally, samples: list[dict[str, Any]]) -> None:
    for _ in range(1_000_000):
        now = time.monotonic()
        if now > end:
            break
        samples.append(
            {
                "t_s": round(now - start, 2),
                "rss_kb": rss_kb(pid),
                "fds": open_fds(pid),
                "ok": sum(tally.ok.values()),
                "failed": sum(tally.failed.values()),
            }
        )
        await asyncio.sleep(SAMPLE_EVERY_S)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from loadtest import common

    common.raise_nofile_limit()
    logdir = Path(tempfile.mkdtemp(prefix="gateway-soak-"))
    port_gw, port_a, port_b = common.free_ports(3)
    procs: list[Any] = []
    try:
        proc_a = common.start_process("backend-a", backend_command(port_a), logdir, port_a)
        procs.append(proc_a)
        proc_b = [common.start_process("backend-b", backend_command(port_b), logdir, port_b)]
        timeouts = {"connect": "1s", "response": "10s", "idle": "10s"}
        cfg: dict[str, Any] = {
            "listen": f"127.0.0.1:{port_gw}",
            "health_listen": None,
            "admin_listen": None,
            "upstreams": {
                "a": {"targets": [{"address": f"127.0.0.1:{port_a}"}], "keepalive": 32},
                "b": {
                    "targets": [{"address": f"127.0.0.1:{port_b}"}],
                    "keepalive": 32,
                    "retry": {"attempts": 2, "on": ["connect_failure", "reset"]},
                },
            },
            "routes": [
                {"name": "a", "match": {"path_prefix": "/a/"}, "upstream": "a", "timeouts": timeouts},
                {"name": "b", "match": {"path_prefix": "/b/"}, "upstream": "b", "timeouts": timeouts},
            ],
            "client": {"keepalive_timeout": "30s"},
        }
        if args.access_log:
            cfg["access_log"] = {"enabled": True, "path": str(logdir / "access.log")}
            print(f"access log: {logdir / 'access.log'}", file=sys.stderr)
        gw = common.start_gateway(cfg, logdir)
        procs.append(gw)
        pid = gw.pid
        base = f"http://127.0.0.1:{port_gw}"
        await asyncio.sleep(1.0)
        idle_before = {"rss_kb": rss_kb(pid), "fds": open_fds(pid)}
        tally = Tally()
        samples: list[dict[str, Any]] = []
        start = tally.start = time.monotonic()
        end = start + args.duration
        tasks = [
            asyncio.ensure_future(http_worker(i, base, end, tally, args.pause)) for i in range(args.workers)
        ]
        tasks += [asyncio.ensure_future(ws_worker(base, end, tally)) for _ in range(2)]
        tasks.append(asyncio.ensure_future(abort_worker("127.0.0.1", port_gw, end, tally)))
        tasks.append(asyncio.ensure_future(restarter(proc_b, port_b, logdir, args.duration, start, tally)))
        tasks.append(asyncio.ensure_future(sampler(pid, start, end, tally, samples)))
        await asyncio.wait_for(asyncio.gather(*tasks), args.duration + 120)
        procs.append(proc_b[0])
        alive = gw.alive()
        await asyncio.sleep(3.0)  # clients gone: what stays open
        idle_after = {"rss_kb": rss_kb(pid), "fds": open_fds(pid)} if gw.alive() else None
    finally:
        for p in procs:
            with contextlib.suppress(Exception):
                p.stop()
    warmup = min(max(args.duration * 0.2, 10.0), 300.0)
    steady = [s for s in samples if s["t_s"] >= warmup]
    rss = slope_per_min([(s["t_s"], s["rss_kb"]) for s in steady])
    fds = slope_per_min([(s["t_s"], s["fds"]) for s in steady])
    total_ok = sum(tally.ok.values())
    return {
        "scenario": "soak",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "flock /tmp/gateway-bench.lock python -m loadtest.soak " + " ".join(sys.argv[1:]),
        "duration_s": args.duration,
        "workers": {"http": args.workers, "websocket": 2, "abort_mid_body": 1, "pause_s": args.pause},
        "mix_weights": MIX,
        "warmup_s": warmup,
        "gateway_alive_at_end": alive,
        "rss_kb_per_min": rss["per_min"],
        "rss_r2": rss["r2"],
        "fds_per_min": fds["per_min"],
        "fds_r2": fds["r2"],
        "rss_kb_steady": {
            "first": steady[0]["rss_kb"] if steady else None,
            "last": steady[-1]["rss_kb"] if steady else None,
            "min": min((s["rss_kb"] for s in steady), default=None),
            "max": max((s["rss_kb"] for s in steady), default=None),
        },
        "fds_steady": {
            "min": min((s["fds"] for s in steady), default=None),
            "max": max((s["fds"] for s in steady), default=None),
        },
        "idle_before": idle_before,
        "idle_after": idle_after,
        "requests_ok": total_ok,
        "requests_ok_by_kind": dict(sorted(tally.ok.items())),
        "requests_per_s": round(total_ok / args.duration, 1),
        "failed_should_have_succeeded": sum(tally.failed.values()),
        "failed_by_kind": dict(sorted(tally.failed.items())),
        "failed_reasons": dict(tally.reasons.most_common(20)),
        "expected_failures_during_backend_restart": dict(tally.expected),
        "backend_restarts": len(tally.restarts),
        "backend_restarts_at_s": [[round(d - start, 1), round(u - start, 1)] for d, u in tally.restarts],
        "failure_samples": tally.failure_samples,
        "samples": samples,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--duration", type=float, default=120.0, help="seconds of traffic (default 120; 1800 = 30 min)"
    )
    p.add_argument("--workers", type=int, default=8, help="HTTP client workers (default 8)")
    p.add_argument("--pause", type=float, default=0.005, help="pause between one worker's requests (s)")
    p.add_argument("--out", default=str(RESULTS / "soak.json"))
    p.add_argument("--access-log", action="store_true", help="gateway access log in the temp dir (diagnosis)")
    p.add_argument("--serve-backend", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_backend:
        serve_backend(args.serve_backend)
        return
    if not (10 <= args.duration <= 86400 and 1 <= args.workers <= 256 and 0 <= args.pause <= 10):
        p.error("duration 10..86400 s, workers 1..256, pause 0..10 s")
    import uvloop

    result = uvloop.run(run(args))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    brief = {k: v for k, v in result.items() if k != "samples"}
    print(json.dumps(brief, indent=2))


if __name__ == "__main__":
    main()
