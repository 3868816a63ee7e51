"""The restart storm (the incident, as a model; shared/BENCHMARKS.md).

Three instances of a service (`loadtest.sim_backend`: 20 in service x 50 ms = 400 req/s each at
full capacity, own unbounded FIFO queue) whose capacity warms up from 10 % to 100 % over 6 s after
start. An instance reports unhealthy on /health while its waiting queue has exceeded its current
capacity for more than a second. A supervisor (the auto-replacing load balancer) probes every
instance's /health every 0.5 s and kills (SIGKILL) an instance that answers 503 or does not answer
within 0.5 s, then starts a fresh one on the same port. Offered load: 0.8 x full capacity
(960 req/s), open-loop (`loadtest.openloop`), for 24 s. Goodput = 2xx within 500 ms.

All instances start together (the whole fleet was restarted); the front starts next; the load
and the supervisor start 1.0 s after the instances started, whatever the front, so every front
faces the same warm-up.

Fronts:
  gw-plain       the gateway: round robin, no slow start, no admission, no health checks
  gw-caps        the gateway: per-target max_in_flight 20 + queue + health checks, no slow start
  gw-slowstart   the gateway: slow_start {window: 6s} + per-target max_in_flight 20 + FIFO queue
                 {size 200, timeout 250ms} + health checks on /health (0.5 s)
  nginx          nginx plain (1 worker, keep-alive, default max_fails=1 fail_timeout=10s)
  haproxy        HAProxy `maxconn 20` + `option httpchk GET /health` (inter 500ms fall 2 rise 1)
  haproxy-ss     the same + `slowstart 6s`

Reported per front: instances killed (and killed after the first ramp, t > warm-up), time to
recover (the first second from which every second has goodput ≥ 95 % of offered and no instance
is killed any more), goodput over the last 10 s (half the run when shorter).

    python -m loadtest.scenario_restart_storm --quick             # 12 s runs
    python -m loadtest.scenario_restart_storm                     # 24 s runs, all fronts
    python -m loadtest.scenario_restart_storm --fronts gw-slowstart,nginx --duration 24

Writes loadtest/results/restart-storm.json (+ restart-storm.png via loadtest.plot).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import signal
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtest import common
from loadtest.common import HOST, HarnessError, Proc
from loadtest.openloop import OpenLoop, new_event_loop
from loadtest.scenario_overload import fmt_ms, gateway_shed, haproxy_conf, nginx_conf, provenance

RESULTS = Path(__file__).resolve().parent / "results"
INSTANCES = 3
CONCURRENCY = 20
SERVICE_MS = 50.0
WARMUP_S = 6.0
WARMUP_FROM = 0.1
FULL_CAPACITY = INSTANCES * CONCURRENCY * 1000.0 / SERVICE_MS  # 1200 req/s
LOAD_FACTOR = 0.8
SLO_S = 0.5
CLIENT_TIMEOUT_S = 5.0
PROBE_INTERVAL_S = 0.5
PROBE_TIMEOUT_S = 0.5
HEAD_START_S = 1.0
RECOVERED_OK_FRACTION = 0.95

ALL_FRONTS = ("gw-plain", "gw-caps", "gw-slowstart", "nginx", "haproxy", "haproxy-ss")
DEFAULT_FRONTS = ("gw-plain", "gw-slowstart", "nginx", "haproxy", "haproxy-ss")

DESCRIPTIONS = {
    "gw-plain": "gateway, no slow start",
    "gw-caps": "gateway, max_in_flight 20 + queue + health checks, no slow start",
    "gw-slowstart": "gateway, slow_start 6s + max_in_flight 20 + queue + health checks",
    "nginx": "nginx plain",
    "haproxy": "HAProxy maxconn 20 + health checks",
    "haproxy-ss": "HAProxy maxconn 20 + health checks + slowstart 6s",
}


# --------------------------------------------------------------------------- instances + supervisor


class Instance:
    """One service instance on a fixed port; `restart` kills it and starts a fresh one there."""

    def __init__(self, index: int, port: int, log_dir: Path) -> None:
        self.index = index
        self.port = port
        self.log_dir = log_dir
        self.proc: Proc | None = None
        self.started_at = 0.0
        self.generation = 0

    def start(self) -> None:
        self.generation += 1
        self.started_at = time.monotonic()
        self.proc = common.start_sim_backend(
            self.port,
            self.log_dir,
            concurrency=CONCURRENCY,
            service_ms=SERVICE_MS,
            extra=["--warmup-s", f"{WARMUP_S:g}", "--warmup-from", f"{WARMUP_FROM:g}"],
            name=f"instance{self.index}-gen{self.generation}",
        )

    def kill(self) -> None:
        proc = self.proc
        if proc is not None and proc.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.popen.wait(timeout=5.0)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(timeout=2.0)
            self.proc = None


def probe(port: int) -> str:
    """GET /health: '200', '503', 'timeout' or 'refused'/'error'."""
    req = urllib.request.Request(f"http://{HOST}:{port}/health", headers={"Connection": "close"})
    try:
        with urllib.request.urlopen(req, timeout=PROBE_TIMEOUT_S) as r:
            return str(r.status)
    except urllib.error.HTTPError as e:
        return str(e.code)
    except TimeoutError:
        return "timeout"
    except urllib.error.URLError as e:
        return "timeout" if isinstance(e.reason, TimeoutError) else "refused"
    except OSError:
        return "error"


class Supervisor(threading.Thread):
    """Probes every instance every PROBE_INTERVAL_S; replaces one that is not healthy."""

    def __init__(self, instances: list[Instance]) -> None:
        super().__init__(name="supervisor", daemon=True)
        self.instances = instances
        self.stop_event = threading.Event()
        self.kills: list[dict[str, Any]] = []  # monotonic time, instance, verdict
        self.probes: list[tuple[float, int, str]] = []
        self.errors: list[str] = []

    def run(self) -> None:
        next_round = time.monotonic()
        while not self.stop_event.is_set():
            for inst in self.instances:
                verdict = probe(inst.port)
                now = time.monotonic()
                self.probes.append((now, inst.index, verdict))
                if verdict != "200" and not self.stop_event.is_set():
                    self.kills.append(
                        {
                            "mono": now,
                            "instance": inst.index,
                            "verdict": verdict,
                            "age_s": now - inst.started_at,
                        }
                    )
                    inst.kill()
                    try:
                        inst.start()
                    except HarnessError as e:  # pragma: no cover - reported, the run goes on
                        self.errors.append(str(e))
            next_round += PROBE_INTERVAL_S
            self.stop_event.wait(max(0.0, next_round - time.monotonic()))


# --------------------------------------------------------------------------- fronts


def start_front(front: str, ports: Sequence[int], tmp: Path, window: float) -> tuple[Proc, int, int | None]:
    port = common.free_port()
    d = tmp / front
    if front == "nginx":
        return common.start_nginx(front, nginx_conf(port, ports, d), d, port), port, None
    if front in ("haproxy", "haproxy-ss"):
        opts = f"check inter {int(PROBE_INTERVAL_S * 1000)} fall 2 rise 1 maxconn {CONCURRENCY}"
        if front == "haproxy-ss":
            opts += f" slowstart {window:g}s"
        conf = haproxy_conf(port, ports, server_opts=opts, backend_extra="    option httpchk GET /health\n")
        return common.start_haproxy(front, conf, d, port), port, None
    admin = common.free_port()
    cfg = common.render_gateway_config(port, [f"{HOST}:{p}" for p in ports], admin_port=admin)
    up = cfg["upstreams"]["api"]
    health = {
        "path": "/health",
        "interval": f"{int(PROBE_INTERVAL_S * 1000)}ms",
        "timeout": "500ms",
        "unhealthy_threshold": 2,
        "healthy_threshold": 1,
    }
    if front == "gw-caps":
        up["targets"] = [{"address": f"{HOST}:{p}", "max_in_flight": CONCURRENCY} for p in ports]
        up["queue"] = {"size": 200, "timeout": "250ms"}
        up["health_check"] = health
    elif front == "gw-slowstart":
        up["targets"] = [{"address": f"{HOST}:{p}", "max_in_flight": CONCURRENCY} for p in ports]
        up["slow_start"] = {"window": f"{window:g}s", "aggression": 1.0, "min_weight_percent": 10}
        up["queue"] = {"size": 200, "timeout": "250ms"}
        up["health_check"] = health
    elif front != "gw-plain":
        raise ValueError(f"unknown front {front!r}")
    return common.start_gateway(cfg, d, name=front), port, admin


# --------------------------------------------------------------------------- one run


def analyse(per_second: list[dict[str, Any]], kills: list[dict[str, Any]], window: float) -> dict[str, Any]:
    n = len(per_second)
    last = min(10, max(1, n // 2))
    ok_last = sum(b["ok"] for b in per_second[-last:])
    off_last = sum(b["offered"] for b in per_second[-last:])
    last_kill = max((k["t"] for k in kills), default=None)
    recovered = None
    for s in range(n - 1, -1, -1):
        b = per_second[s]
        if b["offered"] and b["ok"] < RECOVERED_OK_FRACTION * b["offered"]:
            break
        if last_kill is not None and last_kill >= s:
            break
        recovered = s
    return {
        "killed": len(kills),
        "killed_after_ramp": sum(1 for k in kills if k["t"] > window),
        "recovered_at_s": recovered,
        "last_window_s": last,
        "goodput_last_pct": round(100.0 * ok_last / off_last, 1) if off_last else 0.0,
        "goodput_total_pct": round(
            100.0 * sum(b["ok"] for b in per_second) / max(1, sum(b["offered"] for b in per_second)), 1
        ),
    }


def run_front(front: str, duration: float, window: float, tmp: Path) -> dict[str, Any]:
    ports = common.free_ports(INSTANCES)
    instances = [Instance(i, p, tmp / f"{front}-instances") for i, p in enumerate(ports)]
    proc: Proc | None = None
    sup = Supervisor(instances)
    rate = LOAD_FACTOR * FULL_CAPACITY
    try:
        for inst in instances:
            inst.start()
        fleet_start = min(i.started_at for i in instances)
        proc, port, admin = start_front(front, ports, tmp, window)
        url = f"http://{HOST}:{port}/work"
        # No sanity request: it would be traffic before the common start line.
        delay = fleet_start + HEAD_START_S - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        gen = OpenLoop(url, [(duration, rate)], slo=SLO_S, timeout=CLIENT_TIMEOUT_S)
        sup.start()
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            res = runner.run(gen.run())
        sup.stop_event.set()
        sup.join(timeout=10.0)
        t0 = gen.t0
        kills = [
            {
                "t": round(k["mono"] - t0, 2),
                "instance": k["instance"],
                "verdict": k["verdict"],
                "age_s": round(k["age_s"], 2),
            }
            for k in sup.kills
        ]
        kills = [k for k in kills if k["t"] <= duration]
        row: dict[str, Any] = {
            "front": front,
            "description": DESCRIPTIONS[front],
            "head_start_s": round(t0 - fleet_start, 2),
            "offered_rps": round(res.rate, 1),
            "counts": res.counts,
            "p99_2xx_ms": res.p99_2xx_ms,
            "p99_shed_ms": res.p99_shed_ms,
            "dispatch_lag_p99_ms": res.dispatch_lag_p99_ms,
            "connections": {
                "max_used": res.max_connections_used,
                "opened": res.connections_opened,
                "connect_errors": res.connect_errors,
                "retries": res.retries,
            },
            "front_alive_after": proc.alive(),
            "kills": kills,
            "supervisor_errors": sup.errors,
            "gateway_shed": gateway_shed(admin),
            "per_second": res.per_second,
        }
        row.update(analyse(res.per_second, kills, window))
        rec = row["recovered_at_s"]
        print(
            f"  {front:<13} killed {row['killed']:>2} ({row['killed_after_ramp']} after the ramp)  "
            f"recovered {f'at {rec:2d} s' if rec is not None else 'never '}  "
            f"goodput last {row['last_window_s']} s {row['goodput_last_pct']:5.1f}%  "
            f"total {row['goodput_total_pct']:5.1f}%  2xx p99 {fmt_ms(res.p99_2xx_ms)}  "
            + " ".join(f"{k}={v}" for k, v in res.counts.items() if v),
            flush=True,
        )
        return row
    finally:
        sup.stop_event.set()
        if sup.is_alive():
            sup.join(timeout=10.0)
        if proc is not None:
            proc.stop()
        for inst in instances:
            inst.stop()


def markdown(rows: list[dict[str, Any]]) -> str:
    out = [
        "| in front | instances killed (after the first ramp) | time to recover "
        "| goodput in the last 10 s | goodput overall |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        rec = r["recovered_at_s"]
        out.append(
            f"| {r['description']} | {r['killed']} ({r['killed_after_ramp']}) | "
            f"{f'{rec} s' if rec is not None else 'never'} | {r['goodput_last_pct']:.1f}% "
            f"(last {r['last_window_s']} s) | {r['goodput_total_pct']:.1f}% |"
        )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.scenario_restart_storm", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--quick", action="store_true", help="12 s runs")
    p.add_argument("--duration", type=float, default=None, help="seconds of load per front (default 24)")
    p.add_argument("--window", type=float, default=WARMUP_S, help="slow-start window of the fronts (6)")
    p.add_argument("--fronts", default=",".join(DEFAULT_FRONTS), help=f"comma list of {ALL_FRONTS}")
    p.add_argument("--json", default=None, help="result file (default loadtest/results/restart-storm.json)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--logs", default=None, help="keep process logs and configs in this directory")
    a = p.parse_args(argv)
    duration = a.duration or (12.0 if a.quick else 24.0)
    fronts = [f.strip() for f in a.fronts.split(",") if f.strip()]
    for f in fronts:
        if f not in ALL_FRONTS:
            p.error(f"unknown front {f!r}")
    if duration > 120 or duration * len(fronts) > 900:
        p.error("too much load requested (120 s per front, 15 min in total at most)")
    common.raise_nofile_limit()
    out_path = Path(a.json) if a.json else RESULTS / "restart-storm.json"
    rate = LOAD_FACTOR * FULL_CAPACITY
    print(
        f"restart storm: {INSTANCES} instances x {CONCURRENCY / SERVICE_MS * 1000:.0f} req/s warming "
        f"{WARMUP_FROM:.0%}→100% over {WARMUP_S:g} s; offered {rate:.0f} req/s for {duration:g} s; "
        f"supervisor every {PROBE_INTERVAL_S:g} s",
        flush=True,
    )
    rows = []
    t_start = time.monotonic()
    with contextlib.ExitStack() as stack:
        tmpdir = a.logs or stack.enter_context(tempfile.TemporaryDirectory(prefix="storm-"))
        for front in fronts:
            try:
                rows.append(run_front(front, duration, a.window, Path(tmpdir)))
            except HarnessError as e:
                print(f"  {front} failed: {e}", flush=True)
    table = markdown(rows)
    print()
    print(table)
    doc = {
        "scenario": "restart_storm",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "model": {
            "instances": INSTANCES,
            "concurrency": CONCURRENCY,
            "service_ms": SERVICE_MS,
            "warmup_s": WARMUP_S,
            "warmup_from": WARMUP_FROM,
            "offered_rps": rate,
            "duration_s": duration,
            "slo_ms": SLO_S * 1000,
            "probe_interval_s": PROBE_INTERVAL_S,
            "probe_timeout_s": PROBE_TIMEOUT_S,
            "head_start_s": HEAD_START_S,
            "slow_start_window_s": a.window,
        },
        "tools": common.tool_versions(),
        "provenance": provenance(),
        "wall_s": round(time.monotonic() - t_start, 1),
        "table_md": table,
        "runs": rows,
    }
    common.save_json(doc, out_path)
    if not a.no_plot:
        from loadtest import plot

        print(f"wrote {plot.plot_restart_storm(doc, out_path.with_suffix('.png'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
