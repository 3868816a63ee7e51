"""Rate-limit benchmarks: cost of the limiter, 429 answering rate vs nginx, accuracy with workers.

Three parts, each against the 12-byte nginx backend (`common.render_nginx_backend`), all loopback:

(a) **cost** — two gateways, identical except that one has a per-client-IP token bucket that never
    triggers (`rate: 1000000, burst: 1000000, key: client_ip`). `wrk -t1 -c50` alternates between
    them for `--rounds` rounds (order swapped every round, so drift hits both alike); reported:
    req/s of each (mean and best over rounds) and the difference in % (target: < 5 % lower).
(b) **429 rate** — a limit that always rejects (`rate: 1, per: 60s, burst: 1`, key client_ip; all
    wrk connections share 127.0.0.1) answered by the gateway (429) vs nginx
    `limit_req_zone ... rate=1r/m; limit_req zone=...;` (burst 0, answers 503 =
    `limit_req_status` default). nginx logs every rejection at `error` level by default; the main
    nginx row uses `limit_req_log_level info` (not written with `error_log ... warn`), since the
    gateway writes nothing per rejection either, and a second row keeps nginx's default logging.
    Ratio gateway / nginx (target >= 1.0).
(c) **accuracy with workers** — one route-wide bucket (`key: route`, `rate: 1000, burst: 100`)
    driven far above the limit by `wrk -t1 -c50` (keep-alive) for `--accuracy-duration` s, with
    `workers: 2` (buckets held by the master, workers ask over a Unix socket) and with
    `workers: 1` for reference. Admitted rate = 2xx count / wrk's measured duration; deviation from
    1000/s (target within +-10 %). The 1 s warm-up runs right before the measured run, so the
    bucket starts (nearly) empty; a full one would add at most `burst` requests (+100/duration
    req/s): `bound` = rate + burst / duration is the most a correct limiter can admit.

Each measurement is preceded by a bounded wait for a quiet machine (`--wait-quiet`), and records
the CPU used by other processes (`other_cores`; > 0.2 means the figure is noisy). Run under
`flock /tmp/gateway-bench.lock` on a shared machine:

    flock /tmp/gateway-bench.lock .venv/bin/python -m loadtest.bench_ratelimit --quick
    flock /tmp/gateway-bench.lock .venv/bin/python -m loadtest.bench_ratelimit \\
        --json loadtest/results/ratelimit.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from loadtest import common
from loadtest.bench_throughput import Target, measure, wait_quiet
from loadtest.common import HOST, HarnessError, Proc

NEVER = {"rate": 1000000, "burst": 1000000, "key": "client_ip"}
ALWAYS = {"rate": 1, "per": "60s", "burst": 1, "key": "client_ip"}
ROUTE_WIDE: dict[str, Any] = {"rate": 1000, "burst": 100, "key": "route"}


# --------------------------------------------------------------------------- processes


def start_gateway(
    tmp: Path, name: str, backend_port: int, rate_limit: dict[str, Any] | None, workers: int | None = None
) -> Proc:
    """A gateway proxying `/` to the backend, with an optional rate limit on its one route."""
    for attempt in range(3):
        gp, ghp, gap = common.free_ports(3)
        cfg = common.render_gateway_config(gp, [f"{HOST}:{backend_port}"], ghp, gap, workers=workers)
        if rate_limit is not None:
            cfg["routes"][0]["rate_limit"] = dict(rate_limit)
        try:
            return common.start_gateway(cfg, tmp / name, name=name)
        except HarnessError as e:  # a port taken meanwhile by someone else: pick others
            if "already in use" not in str(e) or attempt == 2:
                raise
    raise AssertionError("unreachable")


def render_nginx_limit_req(port: int, backend_port: int, tmpdir: Path, log_rejections: bool) -> str:
    """nginx reverse proxy (1 worker) with `limit_req` at 1r/m, burst 0 (rejections answer 503)."""
    level = "" if log_rejections else "        limit_req_log_level info;  # error_log is at warn\n"
    return (
        common._nginx_head(tmpdir, 1)
        + "http {\n"
        + common._nginx_http_common(tmpdir)
        + f"""    limit_req_zone $binary_remote_addr zone=rl:1m rate=1r/m;
    upstream backend {{
        server {HOST}:{backend_port};
        keepalive 64;
    }}
    server {{
        listen {HOST}:{port} reuseport backlog=4096;
        location / {{
            limit_req zone=rl;
{level}            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""
    )


def expect_status(url: str, wanted: int, tries: int = 3) -> int:
    """GET `url` (a few times: the first may be admitted by a fresh bucket) until `wanted` comes back."""
    status = 0
    for _ in range(tries):
        status, _ = common.http_get(url, timeout=3.0)
        if status == wanted:
            return status
    raise HarnessError(f"{url}: expected status {wanted}, got {status}")


# --------------------------------------------------------------------------- measurement


def one(
    name: str, proc: Proc | None, port: int, backend: Proc, args: argparse.Namespace, duration: float
) -> dict[str, Any]:
    t = Target(name, port, lambda: None)
    t.proc = proc
    quiet = wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else None
    ns = argparse.Namespace(
        warmup=args.warmup, connections=args.connections, wrk_threads=1, duration=duration
    )
    m = measure(t, backend, ns, warm=args.warmup > 0)
    m["load_before"] = None if quiet is None else round(quiet, 3)
    # wrk's own measured duration (requests / rps) rather than the nominal -d
    m["wall_s"] = round(m["requests"] / m["rps"], 4) if m["rps"] else float(duration)
    flag = " ⚠ noisy" if m["other_cores"] > 0.2 else ""
    print(
        f"  {name}: {m['rps']:,.0f} req/s, non-2xx {m['non_2xx_3xx']}, p99 {m['p99_ms']} ms, "
        f"target {m['target_cores']:.2f} cores, other {m['other_cores']:.2f}{flag}",
        file=sys.stderr,
    )
    return m


def pct(a: float, b: float) -> float:
    """(a / b - 1) in percent."""
    return round((a / b - 1.0) * 100.0, 2) if b else float("nan")


def part_cost(tmp: Path, backend: Proc, bport: int, args: argparse.Namespace) -> dict[str, Any]:
    print("(a) limiter cost: plain route vs never-triggering client_ip limit", file=sys.stderr)
    started: list[Proc] = []
    try:
        plain = start_gateway(tmp, "gw-plain", bport, None)
        started.append(plain)
        limited = start_gateway(tmp, "gw-limited", bport, NEVER)
        started.append(limited)
        for p in started:
            status, body = common.http_get(f"http://{HOST}:{p.port}/sanity", timeout=3.0)
            if status != 200 or body != common.BACKEND_BODY.encode():
                raise HarnessError(f"{p.name}: sanity GET returned {status} {body[:80]!r}")
        runs: dict[str, list[dict[str, Any]]] = {"plain": [], "limited": []}
        pairs = [("plain", plain), ("limited", limited)]
        for rnd in range(args.rounds):
            order = pairs if rnd % 2 == 0 else pairs[::-1]
            print(f" round {rnd + 1}/{args.rounds}", file=sys.stderr)
            for label, proc in order:
                runs[label].append(one(label, proc, proc.port or 0, backend, args, args.duration))
    finally:
        for p in reversed(started):
            p.stop()
    return cost_summary(runs)


def cost_summary(runs: dict[str, list[dict[str, Any]]], noisy: float = 0.3) -> dict[str, Any]:
    """Means, bests and % differences of the (a) rounds; `quiet` uses only rounds where neither run
    saw more than `noisy` cores of other load."""
    plain_rps = [m["rps"] for m in runs["plain"]]
    lim_rps = [m["rps"] for m in runs["limited"]]
    mean_p, mean_l = statistics.mean(plain_rps), statistics.mean(lim_rps)
    per_round = [pct(lr, pr) for pr, lr in zip(plain_rps, lim_rps, strict=True)]
    quiet = [
        i
        for i, (mp, ml) in enumerate(zip(runs["plain"], runs["limited"], strict=True))
        if mp["other_cores"] <= noisy and ml["other_cores"] <= noisy
    ]
    quiet_diff = (
        pct(statistics.mean(lim_rps[i] for i in quiet), statistics.mean(plain_rps[i] for i in quiet))
        if quiet
        else None
    )
    return {
        "plain_rps": plain_rps,
        "limited_rps": lim_rps,
        "plain_mean": round(mean_p, 1),
        "limited_mean": round(mean_l, 1),
        "plain_best": max(plain_rps),
        "limited_best": max(lim_rps),
        "diff_mean_pct": pct(mean_l, mean_p),
        "diff_best_pct": pct(max(lim_rps), max(plain_rps)),
        "diff_per_round_pct": per_round,
        "diff_median_round_pct": statistics.median(per_round),
        "quiet_rounds": [i + 1 for i in quiet],
        "diff_quiet_rounds_pct": quiet_diff,
        "target": "limited at most 5 % lower",
        "meets_target": (quiet_diff if quiet_diff is not None else pct(mean_l, mean_p)) > -5.0,
        "runs": runs,
    }


def part_reject(tmp: Path, backend: Proc, bport: int, args: argparse.Namespace) -> dict[str, Any]:
    print("(b) rejection rate: gateway 429 vs nginx limit_req 503", file=sys.stderr)
    started: list[Proc] = []
    try:
        gw = start_gateway(tmp, "gw-reject", bport, ALWAYS)
        started.append(gw)
        targets: list[tuple[str, Proc, int]] = [("gateway 429", gw, 429)]
        for label, log in (("nginx limit_req 503", False), ("nginx limit_req 503 (rejections logged)", True)):
            port = common.free_port()
            d = tmp / f"nginx-{int(log)}"
            proc = common.start_nginx(
                f"nginx-lr-{int(log)}", render_nginx_limit_req(port, bport, d, log), d, port
            )
            started.append(proc)
            targets.append((label, proc, 503))
        for _, proc, status in targets:
            expect_status(f"http://{HOST}:{proc.port}/", status)
        runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in targets}
        for rnd in range(args.rounds_reject):
            print(f" round {rnd + 1}/{args.rounds_reject}", file=sys.stderr)
            order = targets if rnd % 2 == 0 else targets[::-1]
            for label, proc, _status in order:
                m = one(label, proc, proc.port or 0, backend, args, args.duration)
                m["rejected_fraction"] = round(m["non_2xx_3xx"] / m["requests"], 6) if m["requests"] else 0
                runs[label].append(m)
            for _, proc, status in targets:
                expect_status(f"http://{HOST}:{proc.port}/", status, tries=2)
    finally:
        for p in reversed(started):
            p.stop()
    best = {label: max(m["rps"] for m in rs) for label, rs in runs.items()}
    mean = {label: round(statistics.mean(m["rps"] for m in rs), 1) for label, rs in runs.items()}
    g, n, nl = "gateway 429", "nginx limit_req 503", "nginx limit_req 503 (rejections logged)"
    return {
        "best_rps": best,
        "mean_rps": mean,
        "ratio_best": round(best[g] / best[n], 3),
        "ratio_mean": round(mean[g] / mean[n], 3),
        "ratio_best_vs_nginx_logging": round(best[g] / best[nl], 3),
        "target": "gateway / nginx >= 1.0",
        "meets_target": best[g] / best[n] >= 1.0,
        "runs": runs,
    }


def part_accuracy(tmp: Path, backend: Proc, bport: int, args: argparse.Namespace) -> dict[str, Any]:
    print("(c) route-wide 1000/s limit driven far above it, workers 2 and 1", file=sys.stderr)
    rate, burst = ROUTE_WIDE["rate"], ROUTE_WIDE["burst"]
    out: dict[str, Any] = {"limit": dict(ROUTE_WIDE), "rows": []}
    for workers in (2, 1):
        proc = start_gateway(tmp, f"gw-acc-w{workers}", bport, ROUTE_WIDE, workers=workers)
        try:
            url = f"http://{HOST}:{proc.port}/"
            status, _ = common.http_get(url, timeout=3.0)
            if status != 200:
                raise HarnessError(f"workers {workers}: sanity GET returned {status}")
            for rnd in range(args.rounds_accuracy):
                m = one(f"workers {workers}", proc, proc.port or 0, backend, args, args.accuracy_duration)
                admitted = m["requests"] - m["non_2xx_3xx"]
                wall = m["wall_s"]
                rate_adm = admitted / wall
                expected = rate + burst / wall  # most a correct limiter admits (full bucket at start)
                row = {
                    "workers": workers,
                    "round": rnd + 1,
                    "duration_s": wall,
                    "requests": m["requests"],
                    "offered_rps": round(m["rps"], 1),
                    "admitted": admitted,
                    "admitted_rps": round(rate_adm, 1),
                    "deviation_pct": pct(rate_adm, rate),
                    "bound_rps": round(expected, 1),
                    "meets_target": abs(pct(rate_adm, rate)) <= 10.0,
                    "gateway_cores": m["target_cores"],
                    "other_cores": m["other_cores"],
                }
                out["rows"].append(row)
                print(
                    f"   admitted {admitted} in {wall:.2f}s = {rate_adm:.1f}/s "
                    f"({row['deviation_pct']:+.1f}% vs {rate}/s; bound {expected:.1f}/s)",
                    file=sys.stderr,
                )
        finally:
            proc.stop()
    out["target"] = "admitted within +-10 % of 1000/s"
    return out


# --------------------------------------------------------------------------- report


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.1f} %"


def report(res: dict[str, Any]) -> str:
    lines: list[str] = []
    a = res.get("cost")
    if a:
        lines += [
            "(a) cost of a never-triggering limit (wrk -t1 -c50, alternating rounds)",
            "",
            "| gateway route | req/s per round | mean | best |",
            "|---|---|---:|---:|",
            f"| no limit | {', '.join(f'{x:,.0f}' for x in a['plain_rps'])} | {a['plain_mean']:,.0f} "
            f"| {a['plain_best']:,.0f} |",
            f"| client_ip limit, never triggers | {', '.join(f'{x:,.0f}' for x in a['limited_rps'])} "
            f"| {a['limited_mean']:,.0f} | {a['limited_best']:,.0f} |",
            "",
            f"difference: mean {a['diff_mean_pct']:+.1f} %, best {a['diff_best_pct']:+.1f} %, per round "
            f"{', '.join(f'{x:+.1f}' for x in a['diff_per_round_pct'])} %; over the rounds with other "
            f"load <= 0.3 cores ({a['quiet_rounds']}): {_pct(a['diff_quiet_rounds_pct'])} (target > -5 %: "
            f"{'met' if a['meets_target'] else 'NOT met'})",
            "",
        ]
    b = res.get("reject")
    if b:
        lines += [
            "(b) answering rejections (wrk -t1 -c50, every request rejected)",
            "",
            "| front | status | req/s best | req/s mean | ratio gateway / this |",
            "|---|---:|---:|---:|---:|",
        ]
        g = b["best_rps"]["gateway 429"]
        for label, best in b["best_rps"].items():
            status = 429 if label.startswith("gateway") else 503
            lines.append(
                f"| {label} | {status} | {best:,.0f} | {b['mean_rps'][label]:,.0f} | {g / best:.2f} |"
            )
        lines += [
            "",
            f"ratio gateway / nginx (best): {b['ratio_best']:.2f} (target >= 1.0: "
            f"{'met' if b['meets_target'] else 'NOT met'})",
            "",
        ]
    c = res.get("accuracy")
    if c:
        lines += [
            "(c) route-wide limit 1000/s burst 100 under wrk -t1 -c50 (keep-alive)",
            "",
            "| workers | offered req/s | admitted | duration | admitted/s | vs 1000/s "
            "| bound (rate + burst/duration) |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in c["rows"]:
            lines.append(
                f"| {r['workers']} | {r['offered_rps']:,.0f} | {r['admitted']:,} | {r['duration_s']:.2f} s | "
                f"{r['admitted_rps']:,.1f} | {r['deviation_pct']:+.1f} % | "
                f"{r['bound_rps']:,.1f} |"
            )
        lines.append("")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    common.raise_nofile_limit()
    res: dict[str, Any] = {}
    parts: dict[str, Callable[[Path, Proc, int, argparse.Namespace], dict[str, Any]]] = {
        "cost": part_cost,
        "reject": part_reject,
        "accuracy": part_accuracy,
    }
    with tempfile.TemporaryDirectory(prefix="loadtest-rl-") as tmpname:
        tmp = Path(tmpname)
        bport = common.free_port()
        backend = common.start_nginx(
            "backend", common.render_nginx_backend(bport, tmp / "backend"), tmp / "backend", bport
        )
        try:
            for name, fn in parts.items():
                if name in args.parts:
                    try:
                        res[name] = fn(tmp, backend, bport, args)
                    except HarnessError as e:
                        print(f"part {name} failed: {e}", file=sys.stderr)
                        res[name + "_error"] = str(e)
        finally:
            backend.stop()
    res["meta"] = common.run_meta(args)
    return res


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.bench_ratelimit", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--parts", default="cost,reject,accuracy", help="comma list of cost,reject,accuracy")
    p.add_argument("--duration", type=float, default=5.0, help="wrk seconds per measurement in (a), (b)")
    p.add_argument("--rounds", type=int, default=4, help="alternating rounds in (a) (default 4)")
    p.add_argument("--rounds-reject", type=int, default=2, help="alternating rounds in (b) (default 2)")
    p.add_argument("--accuracy-duration", type=float, default=10.0, help="wrk seconds in (c) (default 10)")
    p.add_argument("--rounds-accuracy", type=int, default=1, help="runs per worker count in (c)")
    p.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    p.add_argument("--warmup", type=float, default=2.0, help="wrk warm-up seconds before each run")
    p.add_argument("--wait-quiet", type=float, default=10.0, help="max wait for a quiet machine (s)")
    p.add_argument("--quick", action="store_true", help="3 s runs, 2 rounds, 5 s accuracy run, 1 s warm-up")
    p.add_argument("--json", metavar="FILE", help="save results as JSON")
    a = p.parse_args(argv)
    if a.quick:
        a.duration, a.rounds, a.rounds_reject, a.accuracy_duration, a.warmup = 3.0, 2, 1, 5.0, 1.0
        a.wait_quiet = min(a.wait_quiet, 5.0)
    a.parts = [x.strip() for x in a.parts.split(",") if x.strip()]
    if not set(a.parts) <= {"cost", "reject", "accuracy"}:
        p.error("--parts: cost, reject, accuracy")
    if not (1 <= a.duration <= 60 and 1 <= a.accuracy_duration <= 60 and 1 <= a.rounds <= 10):
        p.error("durations 1..60 s, rounds 1..10")
    if not (1 <= a.rounds_reject <= 10 and 1 <= a.rounds_accuracy <= 5 and 1 <= a.connections <= 2000):
        p.error("rounds-reject 1..10, rounds-accuracy 1..5, connections 1..2000")

    res = run(a)
    print()
    print(report(res))
    if a.json:
        common.save_json(res, a.json)
    return 1 if any(k.endswith("_error") for k in res) else 0


if __name__ == "__main__":
    sys.exit(main())
