"""Micro-cache benchmark: the gateway's cache beside nginx `proxy_cache`, on the same backends.

nginx is configured as the usual micro-cache (1 worker):

    proxy_cache_path … keys_zone=micro:10m inactive=10m;   proxy_cache micro;
    proxy_cache_lock on;  proxy_cache_valid 200 1s;  proxy_cache_background_update on;
    proxy_cache_use_stale error timeout updating http_500 http_502 http_503 http_504;

and the gateway (1 worker) with the equivalent route cache:
`cache: {ttl: 1s, stale_while_revalidate: 10s, stale_if_error: 60s}`.

(a) hit — cache-hit throughput: one hot key, `wrk -t1 -c50` against each front, in front of the
    12-byte nginx backend (`loadtest.common.render_nginx_backend`); a 2 s warm-up, then the
    measurement; with `--rounds R` the fronts are measured R times interleaved and each keeps its
    best round (other tenants only ever lower throughput). Plain proxies (no cache) are measured
    too for scale unless `--no-baselines`. Output: req/s, p50, p99, ratio gateway/nginx.

(b) surge — a backend of capacity C (`loadtest.sim_backend`, 20 in service x 50 ms = 400 req/s,
    the rest queued), 100 keys `/k/0…/k/99` with Zipf(1.0) popularity, offered 10 x C open-loop
    (`loadtest.openloop`, 4,000 req/s constant arrivals, latency from the scheduled time, 5 s
    client timeout, goodput = 2xx within 500 ms) for `--surge-duration` s (15). The backend's
    `/admin/stats` is polled twice a second: the requests that reached it per second must stay
    ≤ C. At `--kill-at` s (10) the backend is killed (SIGKILL): every request for a key that had
    been answered (2xx) before the kill should still get a 2xx (stale) — errors seen by clients
    for those keys are counted, target 0. Each front gets a fresh backend.

    python -m loadtest.bench_cache --quick                 # ~1 min: 3 s wrk, 8 s surge
    python -m loadtest.bench_cache --rounds 3              # writes loadtest/results/cache.json + .png
    python -m loadtest.bench_cache --only surge --fronts gateway

Everything runs on 127.0.0.1, every run is bounded in time, and every process started is
stopped at the end. Wrap runs in `flock /tmp/gateway-bench.lock …` on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import functools
import itertools
import json
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtest import common
from loadtest.bench_throughput import Target, measure, wait_quiet
from loadtest.common import HOST, HarnessError, Proc
from loadtest.openloop import OUTCOMES, OpenLoop, OpenLoopResult, new_event_loop, percentile, zipf_weights
from loadtest.scenario_overload import nginx_conf, provenance

RESULTS = Path(__file__).resolve().parent / "results"
CONCURRENCY = 20
SERVICE_MS = 50.0
CAPACITY = CONCURRENCY * 1000.0 / SERVICE_MS  # 400 req/s
SLO_S = 0.5
CLIENT_TIMEOUT_S = 5.0
GATEWAY_CACHE = {"ttl": "1s", "stale_while_revalidate": "10s", "stale_if_error": "60s"}
NGINX_CACHE_HTTP = (
    "    proxy_cache_path {cache} levels=1:2 keys_zone=micro:10m max_size=256m inactive=10m "
    "use_temp_path=off;\n"
)
NGINX_CACHE_LOCATION = """            proxy_cache micro;
            proxy_cache_lock on;
            proxy_cache_valid 200 1s;
            proxy_cache_use_stale error timeout updating http_500 http_502 http_503 http_504;
            proxy_cache_background_update on;
            add_header X-Cache $upstream_cache_status;
"""


# --------------------------------------------------------------------------- fronts


def start_nginx_front(port: int, backend_port: int, tmp: Path, cache: bool, name: str) -> Proc:
    d = tmp / name
    if cache:
        conf = nginx_conf(
            port,
            [backend_port],
            d,
            http_extra=NGINX_CACHE_HTTP.format(cache=d / "cache"),
            location_extra=NGINX_CACHE_LOCATION,
        )
    else:
        conf = nginx_conf(port, [backend_port], d)
    return common.start_nginx(name, conf, d, port)


def start_gateway_front(port: int, backend_port: int, tmp: Path, cache: bool, name: str) -> Proc:
    for attempt in range(3):
        admin = common.free_port()
        cfg = common.render_gateway_config(port, [f"{HOST}:{backend_port}"], admin_port=admin)
        if cache:
            cfg["routes"][0]["cache"] = dict(GATEWAY_CACHE)
        try:
            proc = common.start_gateway(cfg, tmp / name, name=name)
            proc.extra["admin_port"] = admin
            return proc
        except HarnessError as e:  # a port taken meanwhile by someone else: pick others
            if "already in use" not in str(e) or attempt == 2:
                raise
            port = common.free_port()
    raise AssertionError("unreachable")


def get(port: int, path: str, timeout: float = 3.0) -> tuple[int, dict[str, str], bytes]:
    """One GET with headers (urllib), for sanity checks."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"http://{HOST}:{port}{path}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return int(r.status), dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return int(e.code), dict(e.headers), e.read()


def check_cached(name: str, port: int, path: str) -> None:
    """Two GETs: both 200, the second a cache hit (X-Cache: HIT) — the cache is really on."""
    s1, _, _ = get(port, path)
    s2, h2, _ = get(port, path)
    if s1 != 200 or s2 != 200 or h2.get("X-Cache") != "HIT":
        raise HarnessError(f"{name}: expected 200 then a HIT on {path}, got {s1}, {s2} {h2.get('X-Cache')}")


# --------------------------------------------------------------------------- (a) hit throughput


def bench_hit(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    started: list[Proc] = []
    targets: list[tuple[Target, bool]] = []
    try:
        bport = common.free_port()
        backend = common.start_nginx(
            "backend", common.render_nginx_backend(bport, tmp / "backend"), tmp / "backend", bport
        )
        started.append(backend)
        kinds = [("nginx proxy_cache", "nginx", True), ("gateway cache", "gateway", True)]
        if not args.no_baselines:
            kinds += [
                ("nginx proxy (no cache)", "nginx", False),
                ("gateway proxy (no cache)", "gateway", False),
            ]
        for label, kind, cache in kinds:
            port = common.free_port()
            name = f"{kind}-{'cache' if cache else 'plain'}"
            start = start_nginx_front if kind == "nginx" else start_gateway_front
            t = Target(label, port, functools.partial(start, port, bport, tmp, cache, name))
            try:
                proc = start(port, bport, tmp, cache, name)
                t.proc = proc
                started.append(proc)
                t.port = proc.port or port
                if cache:
                    check_cached(label, t.port, "/")
                else:
                    st, _, body = get(t.port, "/")
                    if st != 200 or body != common.BACKEND_BODY.encode():
                        raise HarnessError(f"{label}: sanity GET answered {st} {body[:60]!r}")
            except HarnessError as e:
                t.error = str(e)
                print(f"[{label}] not measured: {e}", file=sys.stderr)
            targets.append((t, cache))
        for rnd in range(args.rounds):
            for t, _ in targets:
                if t.error:
                    continue
                quiet = wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else None
                try:
                    m = measure(t, backend, args, warm=True)
                except HarnessError as e:
                    t.error = str(e)
                    print(f"[{t.name}] failed: {e}", file=sys.stderr)
                    continue
                m["load_before"] = None if quiet is None else round(quiet, 3)
                t.rounds.append(m)
                print(
                    f"  [hit round {rnd + 1}/{args.rounds}] {t.name:<25} {m['rps']:>9,.0f} req/s  "
                    f"p50 {fmt(m['p50_ms'], ' ms')}  p99 {fmt(m['p99_ms'], ' ms')}  "
                    f"target {m['target_cores']:.2f} cores  "
                    f"backend {m['backend_cores']:.2f}  other {m['other_cores']:.2f}",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        for p in reversed(started):
            p.stop()
    rows = []
    for t, cache in targets:
        row: dict[str, Any] = {"target": t.name, "cache": cache}
        if not t.rounds:
            row["error"] = t.error
        else:
            best = max(t.rounds, key=lambda m: m["rps"])
            row.update(best)
            row["rounds_rps"] = [m["rps"] for m in t.rounds]
        rows.append(row)
    by = {r["target"]: r for r in rows}
    ratio = None
    if by.get("gateway cache", {}).get("rps") and by.get("nginx proxy_cache", {}).get("rps"):
        ratio = round(by["gateway cache"]["rps"] / by["nginx proxy_cache"]["rps"], 3)
    return {
        "wrk": f"wrk -t{args.wrk_threads} -c{args.connections} -d{args.duration:g}s --latency (one hot key)",
        "rows": rows,
        "ratio_gateway_to_nginx": ratio,
    }


# --------------------------------------------------------------------------- (b) surge


class SurgeRecorder:
    """Per-request outcomes by key and time (on_finish of OpenLoop), plus backend polling."""

    def __init__(self) -> None:
        self.events: list[tuple[int, str, float, float]] = []  # key, outcome, scheduled, finished
        self.kill_at: float | None = None  # seconds from the generator's t0
        self.polls: list[tuple[float, int]] = []  # (t from t0, backend served)

    def on_finish(self, key: int, outcome: str, sched: float, now: float) -> None:
        self.events.append((key, outcome, sched, now))


async def backend_served(port: int) -> int | None:
    """`served` from sim_backend's /admin/stats (raw asyncio HTTP/1.1, bounded); None if down."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 0.5)
    except (OSError, TimeoutError):
        return None
    try:
        writer.write(f"GET /admin/stats HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(-1), 1.0)
        return int(json.loads(data.split(b"\r\n\r\n", 1)[1])["served"])
    except (OSError, TimeoutError, ValueError, KeyError, IndexError):
        return None
    finally:
        writer.close()


async def surge_run(
    url: str, backend: Proc, bport: int, args: argparse.Namespace, rec: SurgeRecorder
) -> OpenLoopResult:
    paths = [f"/k/{i}" for i in range(args.keys)]
    gen = OpenLoop(
        url,
        [(args.surge_duration, args.rate)],
        slo=SLO_S,
        timeout=CLIENT_TIMEOUT_S,
        seed=args.seed,
        paths=paths,
        path_weights=zipf_weights(args.keys, args.zipf_s),
        on_finish=rec.on_finish,
    )

    async def killer_and_poller() -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10.0
        while gen.t0 == 0.0 and loop.time() < deadline:  # the generator sets t0 when it starts
            await asyncio.sleep(0.005)
        t0 = gen.t0
        end = t0 + args.surge_duration
        killed = False
        while time.monotonic() < end:
            now = time.monotonic()
            if not killed and args.kill_at > 0 and now - t0 >= args.kill_at:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(backend.pid, signal.SIGKILL)
                rec.kill_at = time.monotonic() - t0
                killed = True
            if not killed:
                served = await backend_served(bport)
                if served is not None:
                    rec.polls.append((time.monotonic() - t0, served))
            nxt = min(0.5, max(0.0, t0 + args.kill_at - time.monotonic()) if not killed else 0.5)
            await asyncio.sleep(max(0.01, nxt))

    task = asyncio.get_running_loop().create_task(killer_and_poller())
    try:
        return await gen.run()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def backend_rates(polls: Sequence[tuple[float, int]]) -> list[dict[str, float]]:
    """Requests served by the backend per second between consecutive polls."""
    out = []
    for (t0, s0), (t1, s1) in itertools.pairwise(polls):
        if t1 > t0:
            out.append({"t": round(t1, 2), "rps": round((s1 - s0) / (t1 - t0), 1)})
    return out


def surge_summary(res: OpenLoopResult, rec: SurgeRecorder, served_total: int | None) -> dict[str, Any]:
    kill = rec.kill_at
    rates = backend_rates(rec.polls)
    first_ok: dict[int, float] = {}
    for key, outcome, _sched, now in rec.events:
        if outcome in ("ok", "late") and (key not in first_ok or now < first_ok[key]):
            first_ok[key] = now
    out: dict[str, Any] = {
        "offered": res.offered,
        "offered_rps": round(res.rate, 1),
        "goodput_rps": round(res.goodput, 1),
        "ok_pct": round(100.0 * res.ok_fraction, 2),
        "p50_2xx_ms": res.p50_2xx_ms,
        "p99_2xx_ms": res.p99_2xx_ms,
        "counts": res.counts,
        "dispatch_lag_p99_ms": res.dispatch_lag_p99_ms,
        "max_connections_used": res.max_connections_used,
        "backend_rps_per_interval": rates,
        "backend_rps_max": max((r["rps"] for r in rates), default=None),
        "backend_rps_mean_before_kill": (
            round((rec.polls[-1][1] - rec.polls[0][1]) / (rec.polls[-1][0] - rec.polls[0][0]), 1)
            if len(rec.polls) > 1 and rec.polls[-1][0] > rec.polls[0][0]
            else None
        ),
        "backend_served_before_kill": rec.polls[-1][1] if rec.polls else served_total,
        "kill_at_s": None if kill is None else round(kill, 3),
        "keys_answered_before_kill": None,
    }
    if kill is not None:
        cached = {k for k, t in first_ok.items() if t < kill}
        before = [e for e in rec.events if e[2] < kill]
        after = [e for e in rec.events if e[2] >= kill]
        after_cached = Counter(o for k, o, _, _ in after if k in cached)
        after_uncached = Counter(o for k, o, _, _ in after if k not in cached)
        lat_after = [now - s for k, o, s, now in after if o in ("ok", "late")]
        dur_after = max(1e-9, float(res.duration) - kill)
        out.update(
            {
                "keys_answered_before_kill": len(cached),
                "before_kill": {
                    "requests": len(before),
                    "goodput_rps": round(sum(1 for e in before if e[1] == "ok") / kill, 1),
                    "counts": dict(Counter(o for _, o, _, _ in before)),
                },
                "after_kill": {
                    "requests": len(after),
                    "goodput_rps": round(sum(1 for e in after if e[1] == "ok") / dur_after, 1),
                    "p99_2xx_ms": None
                    if not lat_after
                    else round(1000 * (percentile(lat_after, 99) or 0.0), 3),
                    "cached_keys": {o: after_cached.get(o, 0) for o in OUTCOMES},
                    "uncached_keys": {o: after_uncached.get(o, 0) for o in OUTCOMES},
                    "errors_for_cached_keys": sum(
                        v for o, v in after_cached.items() if o not in ("ok", "late")
                    ),
                },
            }
        )
    return out


def bench_surge(front: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    bport = common.free_port()
    backend = common.start_sim_backend(
        bport, tmp / f"sim-{front}", concurrency=CONCURRENCY, service_ms=SERVICE_MS, name=f"sim-{front}"
    )
    proc: Proc | None = None
    try:
        port = common.free_port()
        if front == "nginx":
            proc = start_nginx_front(port, bport, tmp, True, "nginx-surge")
        else:
            proc = start_gateway_front(port, bport, tmp, True, "gateway-surge")
        port = proc.port or port
        st, _, _ = get(port, "/sanity")
        if st != 200:
            raise HarnessError(f"{front}: sanity GET answered {st}")
        rec = SurgeRecorder()
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            res = runner.run(surge_run(f"http://{HOST}:{port}/", backend, bport, args, rec))
        row = {"front": front, **surge_summary(res, rec, None)}
        row["per_second"] = res.per_second
        if front == "gateway":
            row["gateway_cache_metrics"] = gateway_cache_metrics(proc.extra.get("admin_port"))
        a = row.get("after_kill", {})
        print(
            f"  [surge] {front:<8} goodput {row['goodput_rps']:7.1f}/s ({row['ok_pct']:.2f}% ok)  "
            f"2xx p99 {row['p99_2xx_ms']} ms  backend max {row['backend_rps_max']}/s "
            f"mean {row['backend_rps_mean_before_kill']}/s  kill at {row['kill_at_s']} s: "
            f"errors for cached keys {a.get('errors_for_cached_keys')}  "
            f"{' '.join(f'{k}={v}' for k, v in res.counts.items() if v)}",
            file=sys.stderr,
            flush=True,
        )
        return row
    finally:
        if proc is not None:
            proc.stop()
        backend.stop()


def gateway_cache_metrics(admin_port: int | None) -> dict[str, float]:
    if admin_port is None:
        return {}
    import re
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{HOST}:{admin_port}/metrics", timeout=2.0) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for m in re.finditer(r"^(gateway_cache_\w+)\{([^}]*)\}\s+([\d.e+]+)", text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        extra = ",".join(f"{k}={v}" for k, v in labels.items() if k != "route")
        out[m.group(1) + (f"{{{extra}}}" if extra else "")] = float(m.group(3))
    return out


# --------------------------------------------------------------------------- output


def fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.2f}{unit}" if abs(v) < 10 else f"{v:,.1f}{unit}"
    return f"{v}{unit}"


def markdown(doc: dict[str, Any]) -> str:
    out = []
    hit = doc.get("hit")
    if hit:
        out.append(f"### (a) cache-hit throughput — {hit['wrk']}\n")
        out.append("| front | req/s | p50 | p99 | front CPU (cores) | other load (cores) | rounds req/s |")
        out.append("|---|---:|---:|---:|---:|---:|---|")
        for r in hit["rows"]:
            if r.get("error"):
                out.append(f"| {r['target']} | failed | | | | | |")
                continue
            rounds = ", ".join(f"{x:,.0f}" for x in r["rounds_rps"])
            out.append(
                f"| {r['target']} | {r['rps']:,.0f} | "
                f"{fmt(r['p50_ms'], ' ms')} | {fmt(r['p99_ms'], ' ms')} | "
                f"{r['target_cores']:.2f} | {r['other_cores']:.2f} | {rounds} |"
            )
        out.append(f"\nratio gateway cache / nginx proxy_cache: **{hit['ratio_gateway_to_nginx']}**\n")
    surge = doc.get("surge")
    if surge:
        m = doc["surge_model"]
        out.append(
            f"### (b) surge — {m['keys']} Zipf keys, {m['rate']:.0f} req/s offered "
            f"({m['rate'] / m['capacity_rps']:.0f}x C = {m['capacity_rps']:.0f}/s) "
            f"for {m['duration_s']:g} s, "
            f"backend killed at {m['kill_at_s']:g} s\n"
        )
        out.append(
            "| front | goodput | ok % | 2xx p99 | backend req/s max / mean (≤ C) | goodput after kill "
            "| errors for cached keys after kill | outcomes |"
        )
        out.append("|---|---:|---:|---:|---:|---:|---:|---|")
        for r in surge:
            if r.get("error"):
                out.append(f"| {r['front']} | failed: {r['error'][:80]} | | | | | | |")
                continue
            a = r.get("after_kill", {})
            counts = " ".join(f"{k}={v}" for k, v in r["counts"].items() if v)
            out.append(
                f"| {r['front']} | {r['goodput_rps']:,.1f}/s | {r['ok_pct']:.2f} % | "
                f"{fmt(r['p99_2xx_ms'], ' ms')} | "
                f"{fmt(r['backend_rps_max'])} / {fmt(r['backend_rps_mean_before_kill'])} | "
                f"{fmt(a.get('goodput_rps'), '/s')} | {a.get('errors_for_cached_keys', '-')} "
                f"(of {sum(a.get('cached_keys', {}).values())}) | {counts} |"
            )
    return "\n".join(out)


def plot(doc: dict[str, Any], out: Path) -> Path | None:
    surge = [r for r in doc.get("surge") or [] if not r.get("error")]
    if not surge:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from loadtest.plot import _stack

    fig, axes = plt.subplots(len(surge), 1, figsize=(12, 3.2 * len(surge) + 0.6), squeeze=False)
    for i, r in enumerate(surge):
        ax = axes[i][0]
        per = r["per_second"]
        xs = [b["t"] for b in per]
        _stack(ax, xs, per, legend=(i == 0))
        ax.set_ylabel("requests / s")
        ax2 = ax.twinx()
        br = r["backend_rps_per_interval"]
        ax2.plot([b["t"] for b in br], [b["rps"] for b in br], color="#9467bd", marker=".", lw=1.5)
        ax2.axhline(doc["surge_model"]["capacity_rps"], color="#9467bd", ls=":", lw=1)
        ax2.set_ylabel("backend req/s (dotted: C)", color="#9467bd")
        ax2.set_ylim(0, doc["surge_model"]["capacity_rps"] * 1.5)
        if r.get("kill_at_s") is not None:
            ax.axvline(r["kill_at_s"], color="k", lw=1.2)
            ax.text(
                r["kill_at_s"] + 0.1, 0.05, "backend killed", transform=ax.get_xaxis_transform(), fontsize=8
            )
        a = r.get("after_kill", {})
        ax.set_title(
            f"{r['front']}: goodput {r['goodput_rps']:.0f}/s, 2xx p99 {r['p99_2xx_ms']} ms, backend max "
            f"{r['backend_rps_max']}/s, errors for cached keys after kill: {a.get('errors_for_cached_keys')}",
            fontsize=9,
        )
        ax.set_xlabel("scheduled second")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench_cache", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="short runs: 3 s wrk, 1 round, 8 s surge killed at 5 s"
    )
    p.add_argument("--only", choices=("hit", "surge"), help="run only one part")
    p.add_argument("--fronts", default="gateway,nginx", help="surge fronts (default gateway,nginx)")
    p.add_argument("--duration", type=float, default=5.0, help="wrk seconds per front (default 5)")
    p.add_argument("--warmup", type=float, default=2.0, help="wrk warm-up seconds (default 2)")
    p.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    p.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (default 1)")
    p.add_argument("--rounds", type=int, default=1, help="interleaved wrk rounds, best kept (default 1)")
    p.add_argument("--no-baselines", action="store_true", help="skip the no-cache proxies in (a)")
    p.add_argument("--wait-quiet", type=float, default=10.0, help="wait up to S s for load < 0.2 cores")
    p.add_argument("--rate", type=float, default=10 * CAPACITY, help="surge arrivals/s (default 4000)")
    p.add_argument("--surge-duration", type=float, default=15.0, help="surge seconds (default 15)")
    p.add_argument("--kill-at", type=float, default=10.0, help="kill the backend at S s (0: never)")
    p.add_argument("--keys", type=int, default=100, help="distinct keys (default 100)")
    p.add_argument("--zipf-s", type=float, default=1.0, help="Zipf exponent (default 1.0)")
    p.add_argument("--seed", type=int, default=1, help="seed of the key choice")
    p.add_argument("--json", metavar="FILE", help="result file (default loadtest/results/cache[-quick].json)")
    p.add_argument("--no-plot", action="store_true", help="no PNG beside the JSON")
    a = p.parse_args(argv)
    if a.quick:
        a.duration, a.rounds, a.surge_duration, a.kill_at = 3.0, 1, 8.0, 5.0
    if not (1 <= a.duration <= 60 and 1 <= a.rounds <= 5 and 2 <= a.surge_duration <= 60):
        p.error("duration 1..60 s, rounds 1..5, surge-duration 2..60 s")
    if not (0 < a.rate <= 20000 and 1 <= a.keys <= 100000 and 0 <= a.kill_at < a.surge_duration):
        p.error("rate 0..20000, keys 1..100000, 0 <= kill-at < surge-duration")
    fronts = [f.strip() for f in a.fronts.split(",") if f.strip()]
    if any(f not in ("gateway", "nginx") for f in fronts):
        p.error("fronts: gateway, nginx")
    out_path = Path(a.json) if a.json else RESULTS / ("cache-quick.json" if a.quick else "cache.json")

    common.raise_nofile_limit()
    doc: dict[str, Any] = {
        "meta": {
            "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "cpus": os.cpu_count(),
            "loadavg_start": os.getloadavg(),
            "tools": common.tool_versions(),
            "python": sys.version.split()[0],
            "args": vars(a),
            "provenance": provenance(),
            "gateway_cache": GATEWAY_CACHE,
            "nginx_cache": NGINX_CACHE_LOCATION.strip().splitlines(),
        },
        "surge_model": {
            "capacity_rps": CAPACITY,
            "concurrency": CONCURRENCY,
            "service_ms": SERVICE_MS,
            "keys": a.keys,
            "zipf_s": a.zipf_s,
            "rate": a.rate,
            "duration_s": a.surge_duration,
            "kill_at_s": a.kill_at,
            "slo_ms": SLO_S * 1000,
            "client_timeout_s": CLIENT_TIMEOUT_S,
        },
    }
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="loadtest-cache-") as tmpname:
        tmp = Path(tmpname)
        if a.only in (None, "hit"):
            print("(a) cache-hit throughput", file=sys.stderr)
            doc["hit"] = bench_hit(a, tmp)
        if a.only in (None, "surge"):
            print("(b) surge", file=sys.stderr)
            rows = []
            for f in fronts:
                try:
                    rows.append(bench_surge(f, a, tmp))
                except HarnessError as e:
                    print(f"[surge {f}] failed: {e}", file=sys.stderr)
                    rows.append({"front": f, "error": str(e)})
            doc["surge"] = rows
    doc["meta"]["wall_s"] = round(time.monotonic() - t_start, 1)
    doc["meta"]["loadavg_end"] = os.getloadavg()
    print()
    print(markdown(doc))
    common.save_json(doc, out_path)
    if not a.no_plot:
        png = plot(doc, out_path.with_suffix(".png"))
        if png is not None:
            print(f"saved {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
