"""Goodput under overload: one backend of fixed capacity C behind each front, open-loop at k x C.

Model (shared/BENCHMARKS.md): the backend (`loadtest.sim_backend`) serves 20 requests at once,
50 ms each (C = 400 req/s) and queues the rest in its own unbounded FIFO, like a thread pool; it
serves abandoned requests too. Load is open-loop (`loadtest.openloop`): arrivals at a fixed rate
whatever the latency, latency measured from the scheduled send time, a new connection whenever
all are busy, 5 s client timeout. Goodput = 2xx answered within 500 ms, as a share of C.

Fronts (all on the same kind of backend, in the same run):
  direct         the backend alone
  gw-adaptive    the gateway, `adaptive: {}` (Gradient2 finds the limit) + `queue: {mode: adaptive_lifo}`
                 (no hand-set number: library defaults only)
  gw-fifo        the gateway, `max_in_flight: 20` + FIFO `queue: {size: 100, timeout: 100ms}`
  gw-lifo        the gateway, `max_in_flight: 20` + `queue: {size: 100, timeout: 100ms, mode: adaptive_lifo}`
                 (same limit as gw-fifo: isolates FIFO vs adaptive LIFO)
  nginx          nginx 1 worker, plain keep-alive reverse proxy
  nginx-limit    nginx + `limit_req` with rate = C (400r/s), burst=20 nodelay, status 503
  haproxy        HAProxy 1 thread, `server … maxconn 20` + `timeout queue 100ms`
  gw-adaptive-i100  (optional) like gw-adaptive but starting from `initial: 100`

Every point gets a fresh backend and a fresh front (a backend left with a backlog of abandoned
work from the previous point would poison the next one), so the points are independent.
The first point, 0.1 x C, is the unloaded latency.

    python -m loadtest.scenario_overload --quick                  # 3 s per point, 0.1/2/4 x C
    python -m loadtest.scenario_overload                          # 8 s per point, 0.1/1/2/4/8 x C
    python -m loadtest.scenario_overload --fronts gw-adaptive,haproxy --multipliers 0.1,4

Writes loadtest/results/overload.json (+ overload.png via loadtest.plot) unless --json/--no-plot.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtest import common
from loadtest.common import HOST, HarnessError, Proc
from loadtest.openloop import OpenLoop, OpenLoopResult, new_event_loop

RESULTS = Path(__file__).resolve().parent / "results"
CONCURRENCY = 20
SERVICE_MS = 50.0
CAPACITY = CONCURRENCY * 1000.0 / SERVICE_MS  # 400 req/s
SLO_S = 0.5
CLIENT_TIMEOUT_S = 5.0

ALL_FRONTS = ("direct", "gw-adaptive", "gw-fifo", "gw-lifo", "nginx", "nginx-limit", "haproxy")
OPTIONAL_FRONTS = ("gw-adaptive-i100",)


# --------------------------------------------------------------------------- front configs


def nginx_conf(
    port: int,
    servers: Sequence[int],
    tmpdir: Path,
    server_opts: str = "",
    http_extra: str = "",
    location_extra: str = "",
) -> str:
    """nginx (1 worker) as a keep-alive reverse proxy to 127.0.0.1:`servers` (round robin)."""
    ups = "".join(
        f"        server {HOST}:{p}{(' ' + server_opts) if server_opts else ''};\n" for p in servers
    )
    return (
        common._nginx_head(tmpdir, 1)
        + "http {\n"
        + common._nginx_http_common(tmpdir)
        + http_extra
        + f"""    upstream backend {{
{ups}        keepalive 64;
        keepalive_requests 1000000;
        keepalive_timeout 60s;
    }}
    server {{
        listen {HOST}:{port} reuseport backlog=4096;
        location / {{
{location_extra}            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""
    )


def haproxy_conf(
    port: int,
    servers: Sequence[int],
    server_opts: str = "",
    backend_extra: str = "",
    defaults_extra: str = "",
) -> str:
    """HAProxy (1 thread) in front of 127.0.0.1:`servers` (round robin), keep-alive both sides."""
    lines = "".join(
        f"    server s{i} {HOST}:{p}{(' ' + server_opts) if server_opts else ''}\n"
        for i, p in enumerate(servers, 1)
    )
    return f"""global
    nbthread 1
    maxconn 8000

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
{defaults_extra}
frontend fe
    bind {HOST}:{port}
    default_backend be

backend be
    balance roundrobin
{backend_extra}{lines}"""


def gateway_conf(
    port: int, servers: Sequence[int], upstream_extra: dict[str, Any], admin_port: int
) -> dict[str, Any]:
    cfg = common.render_gateway_config(port, [f"{HOST}:{p}" for p in servers], admin_port=admin_port)
    cfg["upstreams"]["api"].update(upstream_extra)
    return cfg


def gateway_upstream(front: str) -> dict[str, Any]:
    if front == "gw-adaptive":
        return {"adaptive": {}, "queue": {"mode": "adaptive_lifo"}}
    if front == "gw-adaptive-i100":
        return {"adaptive": {"initial": 100}, "queue": {"mode": "adaptive_lifo"}}
    if front == "gw-fifo":
        return {"max_in_flight": CONCURRENCY, "queue": {"size": 100, "timeout": "100ms"}}
    if front == "gw-lifo":
        return {
            "max_in_flight": CONCURRENCY,
            "queue": {"size": 100, "timeout": "100ms", "mode": "adaptive_lifo"},
        }
    raise ValueError(front)


def describe(front: str) -> str:
    return {
        "direct": "backend alone",
        "gw-adaptive": "gateway adaptive: {} + queue {mode: adaptive_lifo} (defaults)",
        "gw-adaptive-i100": "gateway adaptive: {initial: 100} + queue {mode: adaptive_lifo}",
        "gw-fifo": "gateway max_in_flight 20 + FIFO queue {size 100, timeout 100ms}",
        "gw-lifo": "gateway max_in_flight 20 + adaptive_lifo queue {size 100, timeout 100ms}",
        "nginx": "nginx plain",
        "nginx-limit": "nginx limit_req rate=400r/s burst=20 nodelay",
        "haproxy": "HAProxy maxconn 20 + timeout queue 100ms",
    }.get(front, front)


def start_front(
    front: str, servers: Sequence[int], tmp: Path, tag: str
) -> tuple[Proc | None, int, int | None]:
    """Start `front` proxying to `servers`; returns (process or None for direct, port, admin port)."""
    if front == "direct":
        return None, servers[0], None
    port = common.free_port()
    d = tmp / f"{front}-{tag}"
    if front == "nginx":
        return common.start_nginx(front, nginx_conf(port, servers, d), d, port), port, None
    if front == "nginx-limit":
        http_extra = (
            '    map $uri $limit_all { default "all"; }\n'
            f"    limit_req_zone $limit_all zone=capacity:1m rate={int(CAPACITY)}r/s;\n"
            "    limit_req_status 503;\n"
        )
        loc = "            limit_req zone=capacity burst=20 nodelay;\n"
        conf = nginx_conf(port, servers, d, http_extra=http_extra, location_extra=loc)
        return common.start_nginx(front, conf, d, port), port, None
    if front == "haproxy":
        conf = haproxy_conf(
            port, servers, server_opts=f"maxconn {CONCURRENCY}", defaults_extra="    timeout queue 100ms\n"
        )
        return common.start_haproxy(front, conf, d, port), port, None
    if front.startswith("gw-"):
        admin = common.free_port()
        cfg = gateway_conf(port, servers, gateway_upstream(front), admin)
        return common.start_gateway(cfg, d, name=front), port, admin
    raise ValueError(f"unknown front {front!r}")


# --------------------------------------------------------------------------- measurement helpers


def gateway_shed(admin_port: int | None) -> dict[str, int]:
    """Shed counts by reason from the gateway's /metrics (empty if unavailable)."""
    if admin_port is None:
        return {}
    try:
        with urllib.request.urlopen(f"http://{HOST}:{admin_port}/metrics", timeout=2.0) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out: dict[str, int] = {}
    for m in re.finditer(
        r'^gateway_requests_shed_total\{[^}]*reason="([^"]+)"[^}]*\}\s+([\d.e+]+)', text, re.M
    ):
        out[m.group(1)] = out.get(m.group(1), 0) + int(float(m.group(2)))
    return out


def backend_stats(port: int) -> dict[str, Any]:
    try:
        _, body = common.http_get(f"http://{HOST}:{port}/admin/stats", timeout=2.0)
        return dict(json.loads(body))
    except (OSError, ValueError):
        return {}


def run_load(url: str, rate: float, duration: float, seed: int = 1) -> OpenLoopResult:
    """One open-loop run (constant arrivals) in a fresh uvloop."""
    gen = OpenLoop(url, [(duration, rate)], slo=SLO_S, timeout=CLIENT_TIMEOUT_S, seed=seed)
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(gen.run())


def summarize(res: OpenLoopResult, capacity: float) -> dict[str, Any]:
    c = res.counts
    shed = c["503"] + c["429"]
    return {
        "offered_rps": round(res.rate, 1),
        "goodput_rps": round(res.goodput, 1),
        "goodput_pct_of_C": round(100.0 * res.goodput / capacity, 1),
        "ok_pct_of_offered": round(100.0 * res.ok_fraction, 1),
        "p50_2xx_ms": res.p50_2xx_ms,
        "p99_2xx_ms": res.p99_2xx_ms,
        "p99_shed_ms": res.p99_shed_ms,
        "shed_pct": round(100.0 * shed / res.offered, 1) if res.offered else 0.0,
        "counts": c,
        "dispatch_lag_p99_ms": res.dispatch_lag_p99_ms,
        "max_connections_used": res.max_connections_used,
    }


def provenance() -> dict[str, str]:
    """Which commit and which gateway sources the gateway subprocesses import (PYTHONPATH may point
    them at a snapshot, e.g. `git archive HEAD gateway | tar -x -C /tmp/snap`)."""
    out = {"pythonpath": os.environ.get("PYTHONPATH", "")}
    try:
        out["git_head"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=common.REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        out["git_dirty_gateway"] = subprocess.run(
            ["git", "status", "--porcelain", "gateway"],
            cwd=common.REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        python = str(common.VENV_BIN / "python")
        out["gateway_module"] = subprocess.run(
            [python, "-c", "import gateway; print(gateway.__file__)"],
            cwd="/",
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def fmt_ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v / 1000:.2f} s" if v >= 1000 else f"{v:.1f} ms"


# --------------------------------------------------------------------------- the scenario


def run_point(front: str, mult: float, duration: float, tmp: Path, log: Any) -> dict[str, Any]:
    bport = common.free_port()
    tag = f"x{mult:g}"
    backend = common.start_sim_backend(
        bport, tmp / f"backend-{front}-{tag}", concurrency=CONCURRENCY, service_ms=SERVICE_MS
    )
    proc: Proc | None = None
    try:
        proc, port, admin = start_front(front, [bport], tmp, tag)
        url = f"http://{HOST}:{port}/work"
        status, body = common.http_get(url, timeout=5.0)
        if status != 200:
            raise HarnessError(f"{front}: sanity GET answered {status}: {body[:200]!r}")
        rate = mult * CAPACITY
        res = run_load(url, rate, duration)
        row = {"front": front, "multiplier": mult, **summarize(res, CAPACITY)}
        row["gateway_shed"] = gateway_shed(admin)
        row["backend"] = backend_stats(bport)
        row["per_second"] = res.per_second
        print(
            f"  {front:<17} {mult:>4g}xC  goodput {row['goodput_pct_of_C']:6.1f}% of C  "
            f"2xx p99 {fmt_ms(row['p99_2xx_ms']):>9}  shed p99 {fmt_ms(row['p99_shed_ms']):>9}  "
            f"shed {row['shed_pct']:5.1f}%  {' '.join(f'{k}={v}' for k, v in res.counts.items() if v)}"
            f"  lag p99 {fmt_ms(res.dispatch_lag_p99_ms)}",
            file=log,
            flush=True,
        )
        return row
    finally:
        if proc is not None:
            proc.stop()
        backend.stop()


def markdown(rows: list[dict[str, Any]], fronts: Sequence[str], mults: Sequence[float]) -> str:
    by = {(r["front"], r["multiplier"]): r for r in rows}
    loaded = [m for m in mults if m >= 1]
    out = []
    unl = [m for m in mults if m < 1]
    head = "| front | " + (f"unloaded p99 ({unl[0]:g}xC) | " if unl else "")
    head += " | ".join(f"goodput {m:g}x" for m in loaded)
    head += " | 2xx p99 " + " / ".join(f"{m:g}x" for m in loaded)
    head += " | shed p99 " + " / ".join(f"{m:g}x" for m in loaded)
    head += " | shed % " + " / ".join(f"{m:g}x" for m in loaded) + " |"
    out.append(head)
    out.append("|" + "---|" * (head.count("|") - 1))
    for f in fronts:
        cells = [describe(f)]
        if unl:
            r = by.get((f, unl[0]))
            cells.append(fmt_ms(r["p99_2xx_ms"]) if r else "-")
        for m in loaded:
            r = by.get((f, m))
            cells.append(f"{r['goodput_pct_of_C']:.1f}%" if r else "-")
        cells.append(" / ".join(fmt_ms(by[(f, m)]["p99_2xx_ms"]) if (f, m) in by else "-" for m in loaded))
        cells.append(" / ".join(fmt_ms(by[(f, m)]["p99_shed_ms"]) if (f, m) in by else "-" for m in loaded))
        cells.append(" / ".join(f"{by[(f, m)]['shed_pct']:.0f}" if (f, m) in by else "-" for m in loaded))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.scenario_overload", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--quick", action="store_true", help="3 s per point, multipliers 0.1,2,4")
    p.add_argument("--duration", type=float, default=None, help="seconds per point (default 8; quick 3)")
    p.add_argument(
        "--multipliers", default=None, help="comma list of k (offered = k x C); default 0.1,1,2,4,8"
    )
    p.add_argument(
        "--fronts", default=",".join(ALL_FRONTS), help=f"comma list of {ALL_FRONTS + OPTIONAL_FRONTS}"
    )
    p.add_argument("--json", default=None, help="result file (default loadtest/results/overload.json)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--logs", default=None, help="keep process logs and configs in this directory")
    a = p.parse_args(argv)
    duration = a.duration or (3.0 if a.quick else 8.0)
    mults = [float(x) for x in (a.multipliers or ("0.1,2,4" if a.quick else "0.1,1,2,4,8")).split(",")]
    fronts = [f.strip() for f in a.fronts.split(",") if f.strip()]
    for f in fronts:
        if f not in ALL_FRONTS + OPTIONAL_FRONTS:
            p.error(f"unknown front {f!r}")
    if duration * len(mults) * len(fronts) > 1200:
        p.error("more than 20 minutes of load requested")
    common.raise_nofile_limit()
    out_path = Path(a.json) if a.json else RESULTS / "overload.json"
    print(
        f"overload: backend C = {CONCURRENCY} x {SERVICE_MS:g} ms = {CAPACITY:.0f} req/s; "
        f"{duration:g} s per point; goodput = 2xx within {SLO_S * 1000:g} ms",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    t_start = time.monotonic()
    with contextlib.ExitStack() as stack:
        tmpdir = a.logs or stack.enter_context(tempfile.TemporaryDirectory(prefix="overload-"))
        tmp = Path(tmpdir)
        for front in fronts:
            print(f"{front}: {describe(front)}", flush=True)
            for m in mults:
                try:
                    rows.append(run_point(front, m, duration, tmp, sys.stdout))
                except HarnessError as e:
                    print(f"  {front} {m:g}xC failed: {e}", flush=True)
    table = markdown(rows, fronts, mults)
    print()
    print(table)
    doc = {
        "scenario": "overload",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "model": {
            "concurrency": CONCURRENCY,
            "service_ms": SERVICE_MS,
            "capacity_rps": CAPACITY,
            "slo_ms": SLO_S * 1000,
            "client_timeout_s": CLIENT_TIMEOUT_S,
            "duration_s": duration,
            "multipliers": mults,
        },
        "fronts": {f: describe(f) for f in fronts},
        "tools": common.tool_versions(),
        "provenance": provenance(),
        "wall_s": round(time.monotonic() - t_start, 1),
        "table_md": table,
        "runs": rows,
    }
    common.save_json(doc, out_path)
    if not a.no_plot:
        from loadtest import plot

        png = plot.plot_overload(doc, out_path.with_suffix(".png"))
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
