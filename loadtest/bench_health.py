"""Is `/healthz` on the health port still fast while the proxy port is saturated?

The incident the gateway was built for began with health checks queued behind saturated proxy
work. Here:

* a slow backend: `sim_backend` with effectively unlimited concurrency and `--service-ms` (50)
  per request, so nothing queues in the backend and every proxied request takes >= 50 ms;
* the gateway (`workers: 1` by default) proxying `/` to it, health listener on its own port;
* `wrk -t1 -c1500` (`--connections`) against the proxy port for the whole run (+ 2 s ramp-up),
  far more concurrent requests than the gateway can turn over (proxy latency grows from 50 ms to
  100-200 ms: requests queue in the gateway; its CPU is reported as `gateway_cores`);
* two probers in this process, each on a fixed 50 ms schedule (`--interval`), each probe a fresh
  TCP connection with `Connection: close` and a 1 s timeout (`--timeout`), like a load
  balancer's health checker: one `GET /healthz` on the health port, one `GET /` on the proxy port
  (for contrast: what the proxy port itself looks like under saturation, including the 50 ms
  backend time). A probe is a failure when it times out, errors, or returns a status other than
  200. Probes run from a thread pool so a slow probe does not delay the next one.
* a control prober against an idle nginx on the same machine (`return 200`), same cadence: the
  latency the saturated machine itself adds to any probe (`--no-control` to skip);
* before the load, the same probers run `--idle` seconds against the idle gateway (baseline).

With `workers: 1` the health listener is a thread of the process doing the proxy work (same GIL);
with `workers: N >= 2` the master serves `/healthz` and the workers do the proxying.

Latency is from connect start to the last byte of the response; `lag` is how late the probe
started vs its schedule (client-side scheduling on a busy 2-core machine: if it is large, the
prober itself was starved and the latencies are pessimistic).

    flock /tmp/gateway-bench.lock .venv/bin/python -m loadtest.bench_health --quick
    flock /tmp/gateway-bench.lock .venv/bin/python -m loadtest.bench_health --duration 60 \\
        --json loadtest/results/health.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest import common
from loadtest.bench_throughput import other_load
from loadtest.common import HOST, HarnessError, Proc
from loadtest.openloop import percentile

perf = time.perf_counter


@dataclass
class Probe:
    sched: float  # seconds from the prober's start
    lag: float = 0.0  # start - sched
    latency: float | None = None  # connect start → last byte
    status: int = 0
    error: str | None = None


def probe_once(port: int, path: str, timeout: float) -> tuple[int, str | None, float]:
    """One GET with a fresh connection; (status, error, seconds). error is None on a full response."""
    req = f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n".encode()
    t0 = perf()
    deadline = t0 + timeout
    status = 0
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.sendall(req)
            buf = b""
            need: int | None = None
            while True:
                left = deadline - perf()
                if left <= 0:
                    return status, "timeout", perf() - t0
                s.settimeout(left)
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
                if need is None and b"\r\n\r\n" in buf:
                    head, _, _ = buf.partition(b"\r\n\r\n")
                    lines = head.split(b"\r\n")
                    status = int(lines[0].split()[1])
                    need = len(head) + 4
                    for line in lines[1:]:
                        k, _, v = line.partition(b":")
                        if k.strip().lower() == b"content-length":
                            need += int(v)
                            break
                    else:
                        need = None if b"chunked" not in head.lower() else -1
                if need is not None and need >= 0 and len(buf) >= need:
                    break
                if need == -1 and buf.endswith(b"0\r\n\r\n"):
                    break
            if status == 0 and buf:
                status = int(buf.split(b"\r\n", 1)[0].split()[1])
    except TimeoutError:
        return status, "timeout", perf() - t0
    except (OSError, ValueError, IndexError) as e:
        return status, f"{type(e).__name__}: {e}", perf() - t0
    if status == 0:
        return 0, "empty response", perf() - t0
    return status, None, perf() - t0


@dataclass
class Prober:
    name: str
    port: int
    path: str
    interval: float
    timeout: float
    probes: list[Probe] = field(default_factory=list)

    def run(self, duration: float, offset: float = 0.0) -> list[Probe]:
        """Probe every `interval` for `duration` s (bounded: duration / interval probes)."""
        n = int(duration / self.interval)
        probes = [Probe(sched=offset + k * self.interval) for k in range(n)]
        workers = min(64, int(self.timeout / self.interval) + 4)
        t0 = perf()

        def task(p: Probe) -> None:
            p.lag = perf() - t0 - p.sched
            p.status, p.error, p.latency = probe_once(self.port, self.path, self.timeout)
            if p.error is None and p.status != 200:
                p.error = f"status {p.status}"

        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            for p in probes:
                delay = t0 + p.sched - perf()
                if delay > 0:
                    time.sleep(delay)
                pool.submit(task, p)
        self.probes = probes
        return probes


def summarize(probes: list[Probe], timeout: float) -> dict[str, Any]:
    ok = [p.latency for p in probes if p.error is None and p.latency is not None]
    every = [p.latency if p.latency is not None else timeout for p in probes]
    fails = [p for p in probes if p.error is not None]
    errors: dict[str, int] = {}
    for p in fails:
        key = (p.error or "").split(":", 1)[0]  # "timeout", "status 503", "ConnectionResetError", ...
        errors[key] = errors.get(key, 0) + 1

    def ms(x: float | None) -> float | None:
        return None if x is None else round(x * 1000.0, 3)

    return {
        "sent": len(probes),
        "ok": len(ok),
        "failures": len(fails),
        "timeouts": sum(1 for p in fails if p.error == "timeout"),
        "errors": errors,
        "p50_ms": ms(percentile(ok, 50)),
        "p99_ms": ms(percentile(ok, 99)),
        "max_ms": ms(max(ok) if ok else None),
        "p99_all_ms": ms(percentile(every, 99)),  # failures counted at their latency (timeouts at 1 s)
        "lag_p99_ms": ms(percentile([p.lag for p in probes], 99)),
        "lag_max_ms": ms(max((p.lag for p in probes), default=None)),
    }


def probe_all(probers: Sequence[Prober], duration: float) -> dict[str, dict[str, Any]]:
    """Run the probers side by side, each on its own thread, offset by a fraction of the interval."""
    threads = []
    for i, pr in enumerate(probers):
        offset = pr.interval * i / len(probers)
        t = threading.Thread(target=pr.run, args=(duration, offset), daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join(timeout=duration + 20)
    return {pr.name: summarize(pr.probes, pr.timeout) for pr in probers}


def run(args: argparse.Namespace) -> dict[str, Any]:
    common.raise_nofile_limit()
    started: list[Proc] = []
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="loadtest-health-") as tmpname:
        tmp = Path(tmpname)
        try:
            bport = common.free_port()
            backend = common.start_sim_backend(
                bport, tmp, concurrency=100000, service_ms=args.service_ms, name="slow-backend"
            )
            started.append(backend)
            gw: Proc | None = None
            for attempt in range(3):
                gp, ghp, gap = common.free_ports(3)
                cfg = common.render_gateway_config(gp, [f"{HOST}:{bport}"], ghp, gap, workers=args.workers)
                try:
                    gw = common.start_gateway(cfg, tmp / "gateway")
                    break
                except HarnessError as e:
                    if "already in use" not in str(e) or attempt == 2:
                        raise
            assert gw is not None
            started.append(gw)
            common.wait_port(ghp, timeout=10.0)
            for url in (f"http://{HOST}:{ghp}/healthz", f"http://{HOST}:{gp}/"):
                status, body = common.http_get(url, timeout=3.0)
                if status != 200:
                    raise HarnessError(f"sanity GET {url} returned {status} {body[:80]!r}")

            cport = common.free_port()
            if args.control:
                started.append(
                    common.start_nginx(
                        "control", common.render_nginx_backend(cport, tmp / "control"), tmp / "control", cport
                    )
                )

            def probers() -> list[Prober]:
                out = [
                    Prober("healthz (health port)", ghp, "/healthz", args.interval, args.timeout),
                    Prober("GET / (proxy port)", gp, "/", args.interval, args.timeout),
                ]
                if args.control:
                    out.append(Prober("control: idle nginx", cport, "/", args.interval, args.timeout))
                return out

            print(f"idle baseline: {args.idle:g} s of probes", file=sys.stderr)
            out["idle"] = probe_all(probers(), args.idle)
            out["idle_other_load_cores"] = round(other_load(0.5), 3)

            print(
                f"load: wrk -t1 -c{args.connections} on the proxy port, probing for {args.duration:g} s",
                file=sys.stderr,
            )
            wrk_res: list[Any] = []
            wrk_err: list[str] = []
            wrk_secs = args.duration + args.ramp + 2

            def drive() -> None:
                try:
                    wrk_res.append(
                        common.run_wrk(f"http://{HOST}:{gp}/", wrk_secs, args.connections, 1, timeout_s=5.0)
                    )
                except HarnessError as e:
                    wrk_err.append(str(e))

            wt = threading.Thread(target=drive, daemon=True)
            wt.start()
            time.sleep(args.ramp)
            cpu0 = {p.name: common.cpu_seconds(p.pid) for p in (gw, backend)}
            busy0 = _busy()
            t0 = time.monotonic()
            out["load"] = probe_all(probers(), args.duration)
            wall = time.monotonic() - t0
            cpu = {p.name: round((common.cpu_seconds(p.pid) - cpu0[p.name]) / wall, 3) for p in (gw, backend)}
            cpu["gateway"], cpu["backend"] = cpu[gw.name], cpu[backend.name]
            machine = round((_busy() - busy0) / os.sysconf("SC_CLK_TCK") / wall, 3)
            wt.join(timeout=wrk_secs + 40)
            if wrk_err:
                raise HarnessError(wrk_err[0])
            w = wrk_res[0]
            out["wrk"] = w.to_dict()
            out["cores"] = {
                "gateway": cpu["gateway"],
                "backend": cpu["backend"],
                "machine": machine,
                "rest (wrk, probers, others)": round(machine - cpu["gateway"] - cpu["backend"], 3),
            }
            out["gateway_alive"] = gw.alive()
            print(
                f"wrk: {w.rps:,.0f} req/s, p50 {w.p50_ms} ms, p99 {w.p99_ms} ms, "
                f"socket errors {w.socket_errors}; cores {out['cores']}",
                file=sys.stderr,
            )
        finally:
            for p in reversed(started):
                p.stop()
    out["meta"] = common.run_meta(args)
    return out


def _busy() -> int:
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return sum(fields) - fields[3] - fields[4]


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f} ms"


def report(res: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        f"probes every {args.interval * 1000:g} ms, fresh connection each, {args.timeout:g} s timeout; "
        f"backend {args.service_ms:g} ms per request; gateway workers: {args.workers}",
        "",
        "| phase | probe | sent | failures (timeouts) | p50 | p99 | max | probe start lag p99 |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for phase, label in (("idle", f"idle ({args.idle:g} s)"), ("load", f"saturated ({args.duration:g} s)")):
        for name, s in res.get(phase, {}).items():
            lines.append(
                f"| {label} | {name} | {s['sent']} | {s['failures']} ({s['timeouts']}) | "
                f"{_fmt(s['p50_ms'])} | {_fmt(s['p99_ms'])} | {_fmt(s['max_ms'])} | {_fmt(s['lag_p99_ms'])} |"
            )
    w = res.get("wrk")
    if w:
        c = res["cores"]
        lines += [
            "",
            f"load: wrk -t1 -c{w['connections']}: {w['rps']:,.0f} req/s, p50 {_fmt(w['p50_ms'])}, "
            f"p99 {_fmt(w['p99_ms'])}, socket errors {w['socket_errors']}; CPU cores: gateway "
            f"{c['gateway']:.2f}, backend {c['backend']:.2f}, whole machine {c['machine']:.2f} of "
            f"{os.cpu_count()}",
        ]
    h = res.get("load", {}).get("healthz (health port)")
    if h:
        met = h["failures"] == 0 and h["p99_ms"] is not None and h["p99_ms"] < 20.0
        lines.append(f"target (healthz p99 < 20 ms, 0 failures under load): {'met' if met else 'NOT met'}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench_health", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=60.0, help="probing seconds under load (default 60)")
    p.add_argument("--quick", action="store_true", help="15 s under load, 3 s idle")
    p.add_argument("--idle", type=float, default=5.0, help="idle-baseline probing seconds (default 5)")
    p.add_argument("--interval", type=float, default=0.05, help="probe interval in s (default 0.05)")
    p.add_argument("--timeout", type=float, default=1.0, help="probe timeout in s (default 1)")
    p.add_argument("--connections", type=int, default=1500, help="wrk connections (default 1500)")
    p.add_argument("--service-ms", type=float, default=50.0, help="backend time per request (default 50)")
    p.add_argument("--workers", type=int, default=1, help="gateway workers (default 1)")
    p.add_argument("--ramp", type=float, default=2.0, help="seconds of load before probing (default 2)")
    p.add_argument(
        "--no-control",
        dest="control",
        action="store_false",
        help="skip the control prober (an idle nginx on the same machine: latency the machine itself adds)",
    )
    p.add_argument("--json", metavar="FILE", help="save results as JSON")
    a = p.parse_args(argv)
    if a.quick:
        a.duration, a.idle = 15.0, 3.0
    if not (1 <= a.duration <= 300 and 0.5 <= a.idle <= 60 and 0.01 <= a.interval <= 1):
        p.error("duration 1..300 s, idle 0.5..60 s, interval 0.01..1 s")
    if not (0.05 <= a.timeout <= 5 and 1 <= a.connections <= 5000 and 1 <= a.workers <= 8):
        p.error("timeout 0.05..5 s, connections 1..5000, workers 1..8")
    res = run(a)
    print()
    print(report(res, a))
    if a.json:
        common.save_json(res, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
