"""Closed-loop throughput benchmark: the gateway vs nginx (vs HAProxy) vs the backend alone.

One run starts a 12-byte backend (nginx, 1 worker, `return 200 "hello world\\n"`), then nginx as
a keep-alive reverse proxy (1 worker), optionally HAProxy (1 thread, `http-reuse always`) and
the gateway (1 worker), all proxying to that same backend. For each target in turn: a sanity
GET, a warm-up (`wrk` for `--warmup` s), then `wrk -t1 -cN -dD --latency`. Prints a markdown
table (req/s, p50, p99, ratio to nginx) plus the CPU used by the target, and "other load": CPU
busy on the machine that was not the target, the backend or wrk (other tenants; results with
other load above ~0.2 cores are noisy and flagged).

No CPU pinning: wrk, the proxy and the backend share the machine's cores the same way for every
target, so the *ratios* are the meaningful output; absolute req/s depend on the machine.

    python -m loadtest.bench_throughput --duration 10 --connections 50
    python -m loadtest.bench_throughput --duration 5 --haproxy --json loadtest/results/throughput.json
    python -m loadtest.bench_throughput --gateway-config config/gateway.yaml   # targets rewritten
    python -m loadtest.bench_throughput --workers 2 --wrk-threads 2
    python -m loadtest.bench_throughput --rounds 3   # interleaved rounds (order rotated), best per target
    python -m loadtest.bench_throughput --minimal    # + the minimal Protocol+httptools forwarder
    python -m loadtest.bench_throughput --baseline HEAD~3   # + the gateway as it was 3 commits ago
    python -m loadtest.bench_throughput --nginx-forwarded   # + nginx adding X-Forwarded-* like the gateway
    python -m loadtest.bench_throughput --vary-heads   # no request head repeats: the parsed path

With several rounds, the ratio of each target to nginx is also given per round (same round, so
the same machine state) and its median; that is the figure to compare between runs, the best
round being the one to compare within a run.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from loadtest import common
from loadtest.common import HOST, HarnessError, Proc


def machine_busy_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies summed over all CPUs from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def other_load(seconds: float = 0.5) -> float:
    """Cores busy on the whole machine over `seconds` (call while nothing of ours runs)."""
    b0, _ = machine_busy_jiffies()
    time.sleep(seconds)
    b1, _ = machine_busy_jiffies()
    return (b1 - b0) / os.sysconf("SC_CLK_TCK") / seconds


def wait_quiet(max_wait: float, threshold: float = 0.2) -> float:
    """Wait (at most `max_wait` s) until the machine's busy cores drop below `threshold`."""
    deadline = time.monotonic() + max_wait
    load = other_load()
    while load > threshold and time.monotonic() < deadline:
        load = other_load(1.0)
    return load


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


class Target:
    def __init__(self, name: str, port: int, start: Callable[[], Proc | None]) -> None:
        self.name = name
        self.port = port
        self.start = start
        self.proc: Proc | None = None
        self.error: str | None = None
        self.rounds: list[dict[str, Any]] = []

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/"


def since(before: Sequence[float], now: Sequence[float]) -> tuple[float, ...]:
    """Counters read now minus the same counters read before, field by field."""
    return tuple(b - a for a, b in zip(before, now, strict=True))


def nginx_row(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The plain nginx row (the reference of every ratio), if it was measured."""
    return next((r for r in results if r["target"].startswith("nginx (") and not r.get("error")), None)


def measure(
    target: Target, backend: Proc, args: argparse.Namespace, warm: bool = True, script: str | None = None
) -> dict[str, Any]:
    """Warm up and run wrk once against `target` (with wrk Lua `script`), with CPU accounting."""
    if warm and args.warmup > 0:
        common.run_wrk(
            target.url,
            args.warmup,
            args.connections,
            args.wrk_threads,
            script=script,
        )
    pids = [p.pid for p in (target.proc, backend) if p is not None]
    cpu0 = {pid: common.cpu_times(pid) for pid in pids}
    sw0 = {pid: common.context_switches(pid) for pid in pids}
    busy0, _ = machine_busy_jiffies()
    wrk0 = children_cpu()
    t0 = time.monotonic()
    r = common.run_wrk(
        target.url,
        args.duration,
        args.connections,
        args.wrk_threads,
        script=script,
    )
    wall = time.monotonic() - t0
    wrk_cpu = children_cpu() - wrk0
    busy1, _ = machine_busy_jiffies()
    split = {pid: since(cpu0[pid], common.cpu_times(pid)) for pid in pids}
    cpu = {pid: sum(split[pid]) for pid in pids}
    sw = {pid: since(sw0[pid], common.context_switches(pid)) for pid in pids}
    machine = (busy1 - busy0) / os.sysconf("SC_CLK_TCK") / wall
    backend_cores = cpu[backend.pid] / wall
    # "backend alone": the backend is the target
    target_cores = cpu[target.proc.pid] / wall if target.proc is not None else backend_cores
    # CPU per request of the target, split: what the proxy's own code costs (user) against what the
    # kernel costs it (the four socket calls per request and the wake-ups of its peers).
    me = (target.proc or backend).pid
    user, system = split[me]
    per = 1e6 / max(r.requests, 1)
    # The backend's CPU per request moves with what the proxy sends it and when (its wake-ups):
    # on a shared machine that is CPU the proxy does not get.
    backend_us = cpu[backend.pid] * per
    kilo = 1000 / max(r.requests, 1)
    return {
        "rps": r.rps,
        "p50_ms": r.p50_ms,
        "p99_ms": r.p99_ms,
        "p90_ms": r.p90_ms,
        "latency_max_ms": r.latency_max_ms,
        "requests": r.requests,
        "non_2xx_3xx": r.non_2xx_3xx,
        "socket_errors": r.socket_errors,
        "target_cores": round(target_cores, 3),
        "target_user_us": round(user * per, 2),
        "target_sys_us": round(system * per, 2),
        "backend_cores": round(backend_cores, 3),
        "backend_us": round(backend_us, 2),
        # sleeps (voluntary switches) and preemptions per 1000 requests: each sleep is a wake-up
        # someone pays for, so they explain much of the CPU per request moving between rounds.
        "target_sleeps_per_k": round(sw[me][0] * kilo, 1),
        "target_preempted_per_k": round(sw[me][1] * kilo, 1),
        "backend_sleeps_per_k": round(sw[backend.pid][0] * kilo, 1),
        "wrk_cores": round(wrk_cpu / wall, 3),
        "machine_cores": round(machine, 3),
        "other_cores": round(
            max(0.0, machine - (target_cores if target.proc else 0.0) - backend_cores - wrk_cpu / wall), 3
        ),
    }


def sanity(target: Target) -> None:
    status, body = common.http_get(target.url + "sanity", timeout=3.0)
    if status != 200 or body != common.BACKEND_BODY.encode():
        raise HarnessError(f"{target.name}: sanity GET returned {status} {body[:80]!r}")


def build_targets(args: argparse.Namespace, tmp: Path, backend_port: int) -> list[Target]:
    targets = [Target("backend alone", backend_port, lambda: None)]
    workers = args.workers or 1

    nginx_port = common.free_port()
    targets.append(
        Target(
            f"nginx ({workers} worker{'s' if workers > 1 else ''})",
            nginx_port,
            lambda: common.start_nginx(
                "nginx-proxy",
                common.render_nginx_proxy(nginx_port, backend_port, tmp / "nginx", workers=workers),
                tmp / "nginx",
                nginx_port,
            ),
        )
    )
    if args.nginx_forwarded:
        fp = common.free_port()
        targets.append(
            Target(
                "nginx + X-Forwarded-*",
                fp,
                lambda: common.start_nginx(
                    "nginx-forwarded",
                    common.render_nginx_proxy(
                        fp, backend_port, tmp / "nginx-fwd", workers=workers, forwarded=True
                    ),
                    tmp / "nginx-fwd",
                    fp,
                ),
            )
        )
    if args.haproxy:
        hp = common.free_port()
        targets.append(
            Target(
                "haproxy (1 thread)",
                hp,
                lambda: common.start_haproxy(
                    "haproxy", common.render_haproxy(hp, backend_port, threads=1), tmp / "haproxy", hp
                ),
            )
        )
    if args.minimal:
        mp = common.free_port()
        targets.append(
            Target(
                "minimal forwarder (floor)",
                mp,
                lambda: common.start_minimal_forwarder(mp, backend_port, tmp / "minimal"),
            )
        )
    if not args.no_gateway:
        backends = [f"{HOST}:{backend_port}"]
        user_cfg = None
        if args.gateway_config:
            user_cfg = yaml.safe_load(Path(args.gateway_config).read_text()) or {}
        label = f"gateway ({Path(args.gateway_config).name})" if args.gateway_config else "gateway"
        label += f" ({workers} worker{'s' if workers > 1 else ''})"

        def start_gateway(site: Path | None = None, name: str = "gateway") -> Proc:
            for attempt in range(3):
                gp, ghp, gap = common.free_ports(3)
                if user_cfg is not None:
                    cfg = common.adapt_gateway_config(user_cfg, gp, ghp, gap, backends, workers=args.workers)
                else:
                    cfg = common.render_gateway_config(gp, backends, ghp, gap, workers=args.workers)
                try:
                    return common.start_gateway(cfg, tmp / name, name=name, site=site)
                except HarnessError as e:  # a port taken meanwhile by someone else: pick others
                    if "already in use" not in str(e) or attempt == 2:
                        raise
            raise AssertionError("unreachable")

        if args.baseline:
            site = common.build_baseline(args.baseline)
            base = label.replace("gateway", f"gateway @{args.baseline}", 1)
            targets.append(Target(base, 0, lambda: start_gateway(site, "baseline")))
        targets.append(Target(label, 0, start_gateway))
    return targets


def fmt_ms(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.2f} ms" if x < 10 else f"{x:.1f} ms"


def per_request(r: dict[str, Any]) -> str:
    if "target_user_us" not in r:
        return "-"
    user, system = r["target_user_us"], r["target_sys_us"]
    return f"{user:.1f} + {system:.1f} = {user + system:.1f}"


def table(results: list[dict[str, Any]]) -> str:
    nginx = nginx_row(results)
    lines = [
        "| target | req/s | p50 | p99 | ratio to nginx | median ratio (rounds) | target CPU (cores) |"
        " µs/request user + kernel | backend µs/request | sleeps per 1k req (target / backend) |"
        " other load (cores) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r.get("error"):
            lines.append(f"| {r['target']} | failed | - | - | - | - | - | - | - | - | - |")
            continue
        ratio = f"{r['rps'] / nginx['rps']:.2f}" if nginx else "-"
        med = f"{r['ratio_median']:.2f}" if "ratio_median" in r else "-"
        noisy = " ⚠" if r["other_cores"] > 0.2 else ""
        alone = r["target"] == "backend alone"
        backend = f"{r['backend_us']:.1f}" if "backend_us" in r and not alone else "-"
        sleeps = "-"
        if "target_sleeps_per_k" in r:
            sleeps = f"{r['target_sleeps_per_k']:.0f}" + (
                "" if alone else f" / {r['backend_sleeps_per_k']:.0f}"
            )
        lines.append(
            f"| {r['target']} | {r['rps']:,.0f} | {fmt_ms(r['p50_ms'])} | {fmt_ms(r['p99_ms'])} | {ratio} | "
            f"{med} | {r['target_cores']:.2f} | {per_request(r)} | {backend} | {sleeps} | "
            f"{r['other_cores']:.2f}{noisy} |"
        )
    return "\n".join(lines)


def paired_ratios(results: list[dict[str, Any]]) -> None:
    """Each target's req/s over nginx's in the same round, and their median (rounds > 1).

    Rounds are interleaved, so a round's ratio compares two targets under one machine state; the
    median of those is steadier than the ratio of two best rounds, which may come from different
    moments of a noisy machine.
    """
    nginx = nginx_row(results)
    if nginx is None or len(nginx["rounds_rps"]) < 2:
        return
    for r in results:
        rounds = r.get("rounds_rps")
        if not rounds or len(rounds) != len(nginx["rounds_rps"]):
            continue  # a failed round would pair rounds of different moments
        ratios = [a / b for a, b in zip(rounds, nginx["rounds_rps"], strict=True)]
        r["ratios_by_round"] = [round(x, 3) for x in ratios]
        r["ratio_median"] = round(statistics.median(ratios), 3)


git_commit = common.git_commit  # kept for the scripts importing it from here


def run(args: argparse.Namespace) -> dict[str, Any]:
    common.raise_nofile_limit()
    started: list[Proc] = []
    with tempfile.TemporaryDirectory(prefix="loadtest-tp-") as tmpname:
        tmp = Path(tmpname)
        try:
            bport = common.free_port()
            backend = common.start_nginx(
                "backend",
                common.render_nginx_backend(bport, tmp / "backend", workers=args.backend_workers),
                tmp / "backend",
                bport,
            )
            started.append(backend)
            targets = build_targets(args, tmp, bport)
            for t in targets:
                try:
                    t.proc = t.start()
                    if t.proc is not None:
                        started.append(t.proc)
                        t.port = t.proc.port or t.port
                    sanity(t)
                except HarnessError as e:
                    t.error = str(e)
                    print(f"[{t.name}] not measured: {e}", file=sys.stderr)
            for rnd in range(args.rounds):
                # Each round starts one target later, so no target always runs right after the same
                # one (or first, when the machine has just been quiet): position is not a bias.
                k = rnd % len(targets)
                for t in targets[k:] + targets[:k]:
                    if t.error:
                        continue
                    if t.proc is not None and not t.proc.alive():
                        t.error = f"exited with {t.proc.popen.returncode}:\n{t.proc.log_tail()}"
                        continue
                    quiet = wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else None
                    try:
                        m = measure(t, backend, args, warm=True, script=common.wrk_script(args.vary_heads))
                    except HarnessError as e:
                        t.error = str(e)
                        if t.proc is not None and not t.proc.alive():
                            t.error += (
                                f"\n{t.name} exited with {t.proc.popen.returncode}:\n{t.proc.log_tail()}"
                            )
                        print(f"[{t.name}] failed: {t.error}", file=sys.stderr)
                        continue
                    m["load_before"] = None if quiet is None else round(quiet, 3)
                    t.rounds.append(m)
                    print(
                        f"[round {rnd + 1}/{args.rounds}] {t.name}: {m['rps']:,.0f} req/s "
                        f"p50 {fmt_ms(m['p50_ms'])} p99 {fmt_ms(m['p99_ms'])} "
                        f"(target {m['target_cores']:.2f} cores, other {m['other_cores']:.2f})",
                        file=sys.stderr,
                    )
        finally:
            for p in reversed(started):
                p.stop()
        results = []
        for t in targets:
            row: dict[str, Any] = {"target": t.name, "url": t.url}
            if t.error and not t.rounds:
                row["error"] = t.error
            else:
                if t.error:
                    row["note"] = f"a later round failed: {t.error}"
                # best of rounds: interference from other tenants only ever lowers throughput
                best = max(t.rounds, key=lambda m: m["rps"])
                row.update(best)
                row["rounds_rps"] = [m["rps"] for m in t.rounds]
                if len(t.rounds) > 1:
                    row["rps_stdev"] = round(statistics.stdev(row["rounds_rps"]), 1)
            results.append(row)
    paired_ratios(results)
    return {
        "meta": {
            **common.run_meta(args),
            "wrk": f"wrk -t{args.wrk_threads} -c{args.connections} -d{args.duration}s --latency"
            + (" -s loadtest/vary_heads.lua" if args.vary_heads else ""),
        },
        "results": results,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.bench_throughput", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--duration", type=float, default=10.0, help="wrk seconds per target (default 10)")
    p.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    p.add_argument("--warmup", type=float, default=2.0, help="warm-up wrk seconds per target (default 2)")
    p.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (default 1)")
    p.add_argument("--haproxy", action="store_true", help="also measure HAProxy (1 thread)")
    p.add_argument(
        "--nginx-forwarded",
        action="store_true",
        help="also measure nginx setting Host and X-Forwarded-For/-Proto/-Host as the gateway does",
    )
    p.add_argument(
        "--minimal",
        action="store_true",
        help="also measure loadtest/minimal_forwarder.py (the least a Protocol+httptools proxy does)",
    )
    p.add_argument("--no-gateway", action="store_true", help="skip the gateway")
    p.add_argument("--gateway-config", help="gateway YAML to use (listeners and upstream targets rewritten)")
    p.add_argument("--workers", type=int, default=None, help="nginx worker_processes and gateway `workers:`")
    p.add_argument("--backend-workers", type=int, default=1, help="worker_processes of the backend nginx")
    p.add_argument(
        "--rounds", type=int, default=1, help="measure every target this many times (interleaved); best"
    )
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=20.0,
        help="before each measurement wait up to this many s for other load < 0.2 cores (0: don't)",
    )
    p.add_argument(
        "--baseline",
        metavar="REF",
        help="also measure the gateway as built at git REF (a same-run A/B; built once, cached)",
    )
    p.add_argument(
        "--vary-heads",
        action="store_true",
        help="every request carries a changing field (loadtest/vary_heads.lua): no head repeats",
    )
    p.add_argument("--json", metavar="FILE", help="save results and metadata as JSON")
    a = p.parse_args(argv)
    if not (1 <= a.duration <= 600 and 1 <= a.connections <= 10000 and 1 <= a.rounds <= 20):
        p.error("duration 1..600 s, connections 1..10000, rounds 1..20")
    if a.gateway_config and not Path(a.gateway_config).is_file():
        p.error(f"no such file: {a.gateway_config}")

    out = run(a)
    print(f"\nwrk -t{a.wrk_threads} -c{a.connections} -d{a.duration:g}s, {os.cpu_count()} CPUs, no pinning\n")
    print(table(out["results"]))
    for r in out["results"]:
        if r.get("error") or r.get("note"):
            print(f"\n{r['target']} failed:\n{r.get('error') or r.get('note')}")
        elif r["non_2xx_3xx"] or any(r["socket_errors"].values()):
            print(f"\n{r['target']}: non-2xx {r['non_2xx_3xx']}, socket errors {r['socket_errors']}")
    if a.json:
        common.save_json(out, a.json)
    return 0 if all(not r.get("error") for r in out["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
