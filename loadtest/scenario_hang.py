"""A backend that starts hanging mid-run: who makes clients wait for timeouts, and for how long?

Topology (all loopback): target A = `sim_backend` (fast: 1000 slots x 2 ms), optionally a second
healthy target B (`--targets 2`). Open-loop load (`openloop`, constant `--rate` 200 req/s for
`--duration` s, latency from the scheduled send time, client timeout 3 s). At `--hang-at` s
A gets `POST /admin/hang` (every request to it, `/health` included, waits), at `--unhang-at` s
`POST /admin/unhang`. Fronts, each run in turn with fresh backends:

* `gw-cb`     — the gateway: `circuit_breaker {failure_ratio 0.5, min_requests 20, window 5s,
  open_for 2s, half_open_requests 3}`, `passive {consecutive_failures 3, ejection_time 10s}`
  (default `max_ejection_percent: 50`: a one-target pool is never ejected), route
  `timeouts {connect 1s, response 1s}`, `retry {attempts 2, on [connect_failure, timeout]}`;
* `gw-eject`  — the same with `max_ejection_percent: 100` (a lone target may be ejected too);
* `gw-hc`     — `gw-cb` plus an active `health_check {path /health, interval 1s, timeout 0.5s,
  unhealthy_threshold 2, healthy_threshold 2}`;
* `nginx`     — `server ... max_fails=3 fail_timeout=10s`, `proxy_next_upstream error timeout`,
  `proxy_connect_timeout 1s`, `proxy_read_timeout 1s`, keep-alive upstream (1 worker).
  (nginx ignores max_fails for a group of one server: that server is never marked down.)

Reported per front, for requests *scheduled* during the outage [hang_at, unhang_at):
client-visible p99 latency (timeouts counted at their latency), `waited` = latency >= 0.95 x the
1 s response timeout (the request sat out a timeout), `fast 503` = 503 in < 10 ms, 2xx count;
`fast-fail from` = scheduled offset of the first fast 503 (the client's view of "the circuit
opened" / "the target was ejected"), `waited after` = waited requests scheduled after that moment;
after the unhang: `first 200` = time from the unhang to the first 200 response, `all 2xx from` =
time from the unhang after which every request got 2xx. The gateway's own state changes
(circuit, ejection, health events from its JSON log) are listed with their offsets.

Results: JSON (with every request's scheduled offset, status, latency) and a PNG scatter plot
(latency by scheduled time, per front).

    flock /tmp/gateway-bench.lock .venv/bin/python -m loadtest.scenario_hang --quick
    flock /tmp/gateway-bench.lock .venv/bin/python -m loadtest.scenario_hang --targets 1 \\
        --json loadtest/results/hang.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtest import common
from loadtest.common import HOST, HarnessError, Proc
from loadtest.openloop import OUTCOMES, OpenLoop, _Req, new_event_loop, percentile

RESPONSE_TIMEOUT = 1.0
FAST_S = 0.010
FRONTS = ("gw-cb", "gw-eject", "gw-hc", "nginx")

CIRCUIT = {
    "failure_ratio": 0.5,
    "min_requests": 20,
    "window": "5s",
    "open_for": "2s",
    "half_open_requests": 3,
}
PASSIVE = {"consecutive_failures": 3, "ejection_time": "10s"}
HEALTH_CHECK = {
    "path": "/health",
    "interval": "1s",
    "timeout": "0.5s",
    "unhealthy_threshold": 2,
    "healthy_threshold": 2,
}


class RecordingOpenLoop(OpenLoop):
    """OpenLoop that also keeps every request as (scheduled offset, outcome, latency, status)."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.records: list[tuple[float, str, float, int]] = []
        self._status = 0

    def complete(self, req: _Req, status: int) -> None:
        self._status = status
        try:
            super().complete(req, status)
        finally:
            self._status = 0

    def finish(self, req: _Req, outcome: int, now: float) -> None:
        if not req.done:
            self.records.append((req.sched - self.t0, OUTCOMES[outcome], now - req.sched, self._status))
        super().finish(req, outcome, now)


# --------------------------------------------------------------------------- fronts


def gateway_config(
    front: str, port: int, health_port: int, admin_port: int, targets: list[str]
) -> dict[str, Any]:
    cfg = common.render_gateway_config(port, targets, health_port, admin_port)
    up = cfg["upstreams"]["api"]
    up["circuit_breaker"] = dict(CIRCUIT)
    up["passive"] = dict(PASSIVE)
    if front == "gw-eject":
        up["passive"]["max_ejection_percent"] = 100
    if front == "gw-hc":
        up["health_check"] = dict(HEALTH_CHECK)
    up["retry"] = {"attempts": 2, "on": ["connect_failure", "timeout"]}
    cfg["routes"][0]["timeouts"] = {"connect": "1s", "response": f"{RESPONSE_TIMEOUT:g}s"}
    return cfg


def render_nginx(port: int, targets: list[str], tmpdir: Path) -> str:
    servers = "".join(f"        server {t} max_fails=3 fail_timeout=10s;\n" for t in targets)
    return (
        common._nginx_head(tmpdir, 1)
        + "http {\n"
        + common._nginx_http_common(tmpdir)
        + f"""    upstream backend {{
{servers}        keepalive 64;
    }}
    server {{
        listen {HOST}:{port} reuseport backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_connect_timeout 1s;
            proxy_read_timeout {RESPONSE_TIMEOUT:g}s;
            proxy_next_upstream error timeout;
        }}
    }}
}}
"""
    )


def start_front(front: str, tmp: Path, targets: list[str]) -> Proc:
    d = tmp / front
    if front == "nginx":
        port = common.free_port()
        return common.start_nginx("nginx", render_nginx(port, targets, d), d, port)
    for attempt in range(3):
        gp, ghp, gap = common.free_ports(3)
        try:
            return common.start_gateway(gateway_config(front, gp, ghp, gap, targets), d, name=front)
        except HarnessError as e:
            if "already in use" not in str(e) or attempt == 2:
                raise
    raise AssertionError("unreachable")


def gateway_events(proc: Proc, wall_t0: float) -> list[dict[str, Any]]:
    """State-change events from the gateway's JSON log, with offsets from the load's start."""
    out: list[dict[str, Any]] = []
    try:
        text = proc.log_path.read_text(errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") in ("circuit", "ejected", "returned", "health", "unejected"):
            rec["t"] = round(float(rec.pop("time")) - wall_t0, 3)
            out.append(rec)
    return out


# --------------------------------------------------------------------------- one run


async def drive(
    url: str, hang_url: str, args: argparse.Namespace
) -> tuple[RecordingOpenLoop, dict[str, Any]]:
    gen = RecordingOpenLoop(url, [(args.duration, args.rate)], slo=0.5, timeout=args.client_timeout)
    loop = asyncio.get_running_loop()
    marks: dict[str, Any] = {}

    async def control() -> None:
        while gen.t0 == 0.0:
            await asyncio.sleep(0.001)
        marks["wall_t0"] = time.time() - (time.monotonic() - gen.t0)
        for what, at in (("hang", args.hang_at), ("unhang", args.unhang_at)):
            await asyncio.sleep(max(0.0, gen.t0 + at - time.monotonic()))
            sent = time.monotonic() - gen.t0
            status, _ = await loop.run_in_executor(None, common.http_post, f"{hang_url}/admin/{what}", 2.0)
            marks[what] = {"sent": round(sent, 4), "answered": round(time.monotonic() - gen.t0, 4)}
            if status != 200:
                raise HarnessError(f"POST /admin/{what} returned {status}")

    ctl = loop.create_task(control())
    res = await gen.run(preconnect=20)
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(ctl, 5.0)
    marks["result"] = res
    return gen, marks


def analyse(records: list[tuple[float, str, float, int]], hang: float, unhang: float) -> dict[str, Any]:
    outage = [r for r in records if hang <= r[0] < unhang]
    lat = [r[2] for r in outage]
    waited = [r for r in outage if r[2] >= 0.95 * RESPONSE_TIMEOUT]
    fast503 = [r for r in outage if r[3] == 503 and r[2] < FAST_S]
    fast_from = min((r[0] for r in fast503), default=None)
    status_counts: dict[str, int] = {}
    for r in outage:
        key = str(r[3]) if r[3] else r[1]
        status_counts[key] = status_counts.get(key, 0) + 1
    after = [r for r in records if r[3] == 200 and r[0] + r[2] >= unhang]
    first_200 = min((r[0] + r[2] for r in after), default=None)
    bad_after = [r[0] for r in records if r[0] >= unhang and not 200 <= r[3] < 300]
    all_ok_from = (max(bad_after) - unhang + 1.0 / 200) if bad_after else 0.0
    pre = [r[2] for r in records if r[0] < hang and 200 <= r[3] < 300]

    def ms(x: float | None) -> float | None:
        return None if x is None else round(x * 1000.0, 2)

    return {
        "requests_in_outage": len(outage),
        "p50_ms": ms(percentile(lat, 50)),
        "p99_ms": ms(percentile(lat, 99)),
        "max_ms": ms(max(lat) if lat else None),
        "waited_for_timeout": len(waited),
        "fast_503": len(fast503),
        "ok_2xx": sum(1 for r in outage if 200 <= r[3] < 300),
        "statuses": dict(sorted(status_counts.items())),
        "fast_fail_from_s": None if fast_from is None else round(fast_from, 3),
        "waited_after_fast_fail": (
            None if fast_from is None else sum(1 for r in waited if r[0] >= fast_from)
        ),
        "waited_after_fast_fail_offsets_s": (
            [] if fast_from is None else [round(r[0], 3) for r in waited if r[0] >= fast_from]
        ),
        "first_200_after_unhang_s": None if first_200 is None else round(first_200 - unhang, 3),
        "all_2xx_after_unhang_s": round(all_ok_from, 3) if bad_after or after else None,
        "pre_outage_p99_ms": ms(percentile(pre, 99)),
    }


def run_front(front: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    started: list[Proc] = []
    try:
        ports = common.free_ports(args.targets)
        backs = [
            common.start_sim_backend(p, tmp / front, concurrency=1000, service_ms=2.0, name=f"sim-{i}")
            for i, p in enumerate(ports)
        ]
        started.extend(backs)
        targets = [f"{HOST}:{p}" for p in ports]
        proc = start_front(front, tmp, targets)
        started.append(proc)
        url = f"http://{HOST}:{proc.port}/"
        for _ in range(5):
            status, body = common.http_get(url, timeout=3.0)
            if status != 200:
                raise HarnessError(f"{front}: sanity GET returned {status} {body[:80]!r}")
        time.sleep(0.5)
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            gen, marks = runner.run(drive(url, f"http://{HOST}:{ports[0]}", args))
        res = marks.pop("result")
        hang = marks.get("hang", {}).get("sent", args.hang_at)
        unhang = marks.get("unhang", {}).get("sent", args.unhang_at)
        out = {
            "front": front,
            "summary": res.summary(),
            "counts": res.counts,
            "marks": {k: v for k, v in marks.items() if k != "wall_t0"},
            "outage": analyse(gen.records, hang, unhang),
            "per_second": res.per_second,
            "dispatch_lag_p99_ms": res.dispatch_lag_p99_ms,
            "events": gateway_events(proc, marks["wall_t0"]) if front != "nginx" else [],
            "records": [[round(s, 4), o, round(lat, 5), st] for s, o, lat, st in gen.records],
            "front_alive": proc.alive(),
        }
        o = out["outage"]
        print(
            f"[{front}] outage: p99 {o['p99_ms']} ms, waited {o['waited_for_timeout']}, fast 503 "
            f"{o['fast_503']}, 2xx {o['ok_2xx']}, fast-fail from {o['fast_fail_from_s']} s, waited after "
            f"{o['waited_after_fast_fail']}; first 200 after unhang {o['first_200_after_unhang_s']} s, "
            f"all 2xx after {o['all_2xx_after_unhang_s']} s",
            file=sys.stderr,
        )
        for ev in out["events"]:
            print(f"    t={ev['t']:7.3f} {ev}", file=sys.stderr)
        return out
    finally:
        for p in reversed(started):
            p.stop()


# --------------------------------------------------------------------------- report


def _f(x: Any, unit: str = "") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.1f}{unit}" if abs(x) < 100 else f"{x:,.0f}{unit}"
    return f"{x}{unit}"


def report(res: dict[str, Any]) -> str:
    a = res["meta"]["args"]
    lines = [
        f"{a['targets']} target(s), {a['rate']:g} req/s for {a['duration']:g} s, target A hangs "
        f"{a['hang_at']:g}-{a['unhang_at']:g} s, response timeout {RESPONSE_TIMEOUT:g} s",
        "",
        "| front | outage reqs | p99 | waited >= 1 s | fast 503 (<10 ms) | 2xx | fast-fail from | "
        "waited after it | first 200 after unhang | all 2xx after unhang |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["fronts"]:
        if "error" in r:
            lines.append(f"| {r['front']} | failed: {r['error'][:80]} |")
            continue
        o = r["outage"]
        lines.append(
            f"| {r['front']} | {o['requests_in_outage']} | {_f(o['p99_ms'], ' ms')} | "
            f"{o['waited_for_timeout']} | "
            f"{o['fast_503']} | {o['ok_2xx']} | {_f(o['fast_fail_from_s'], ' s')} | "
            f"{_f(o['waited_after_fast_fail'])} | {_f(o['first_200_after_unhang_s'], ' s')} | "
            f"{_f(o['all_2xx_after_unhang_s'], ' s')} |"
        )
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fronts = [r for r in res["fronts"] if "records" in r]
    if not fronts:
        return
    a = res["meta"]["args"]
    fig, axes = plt.subplots(len(fronts), 1, figsize=(12, 2.4 * len(fronts)), sharex=True, squeeze=False)
    classes = (
        ("2xx", "#2ca02c", lambda s, lat: 200 <= s < 300),
        ("503 < 10 ms", "#d62728", lambda s, lat: s == 503 and lat < FAST_S),
        ("503 slow", "#ff7f0e", lambda s, lat: s == 503 and lat >= FAST_S),
        ("504/502", "#8c564b", lambda s, lat: s in (502, 504)),
        ("other / error / timeout", "#000000", lambda s, lat: not (200 <= s < 300 or s in (502, 503, 504))),
    )
    for ax, r in zip(axes[:, 0], fronts, strict=True):
        recs = r["records"]
        for label, color, pred in classes:
            xs = [x[0] for x in recs if pred(x[3], x[2])]
            ys = [max(x[2], 1e-4) * 1000 for x in recs if pred(x[3], x[2])]
            if xs:
                ax.scatter(xs, ys, s=3, c=color, label=f"{label} ({len(xs)})", linewidths=0)
        ax.axvspan(a["hang_at"], a["unhang_at"], color="#cccccc", alpha=0.35, lw=0)
        ax.axhline(RESPONSE_TIMEOUT * 1000, color="#888888", lw=0.6, ls="--")
        ax.set_yscale("log")
        ax.set_ylim(0.1, a["client_timeout"] * 1000 * 1.5)
        ax.set_ylabel("latency (ms)")
        o = r["outage"]
        ax.set_title(
            f"{r['front']}: outage p99 {_f(o['p99_ms'], ' ms')}, waited {o['waited_for_timeout']}, "
            f"fast 503 {o['fast_503']}, 2xx {o['ok_2xx']}",
            fontsize=9,
        )
        ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=7, markerscale=3)
    axes[-1, 0].set_xlabel("scheduled time (s); grey: target A hanging")
    fig.suptitle(
        f"backend hang, {a['targets']} target(s), {a['rate']:g} req/s open loop, response timeout "
        f"{RESPONSE_TIMEOUT:g} s",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.scenario_hang", description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", type=int, choices=(1, 2), default=1, help="1, or 2 (B stays healthy)")
    p.add_argument("--fronts", default=",".join(FRONTS), help=f"comma list of {', '.join(FRONTS)}")
    p.add_argument("--rate", type=float, default=200.0, help="open-loop req/s (default 200)")
    p.add_argument("--duration", type=float, default=25.0, help="seconds of load (default 25)")
    p.add_argument("--hang-at", type=float, default=5.0, help="A starts hanging at (s, default 5)")
    p.add_argument("--unhang-at", type=float, default=15.0, help="A stops hanging at (s, default 15)")
    p.add_argument("--client-timeout", type=float, default=3.0, help="client timeout (s, default 3)")
    p.add_argument("--quick", action="store_true", help="14 s of load, hang 3-9 s")
    p.add_argument("--json", metavar="FILE", help="save results as JSON (+ a PNG plot beside it)")
    a = p.parse_args(argv)
    if a.quick:
        a.duration, a.hang_at, a.unhang_at = 14.0, 3.0, 9.0
    fronts = [f.strip() for f in a.fronts.split(",") if f.strip()]
    if not set(fronts) <= set(FRONTS):
        p.error(f"--fronts: {', '.join(FRONTS)}")
    if not (1 <= a.rate <= 5000 and 2 <= a.duration <= 120 and 0 < a.hang_at < a.unhang_at <= a.duration):
        p.error("rate 1..5000, duration 2..120 s, 0 < hang-at < unhang-at <= duration")
    common.raise_nofile_limit()
    res: dict[str, Any] = {"fronts": []}
    with tempfile.TemporaryDirectory(prefix="loadtest-hang-") as tmpname:
        for front in fronts:
            try:
                res["fronts"].append(run_front(front, a, Path(tmpname)))
            except HarnessError as e:
                print(f"[{front}] failed: {e}", file=sys.stderr)
                res["fronts"].append({"front": front, "error": str(e)})
    res["meta"] = {
        **common.run_meta(a),
        "gateway": {"circuit_breaker": CIRCUIT, "passive": PASSIVE, "health_check (gw-hc)": HEALTH_CHECK},
        "record_format": "[scheduled offset s, outcome, latency s, status (0: none)]",
    }
    print()
    print(report(res))
    if a.json:
        path = common.save_json(res, a.json)
        try:
            plot(res, path.with_suffix(".png"))
            print(f"saved {path} and {path.with_suffix('.png')}")
        except Exception as e:  # the plot is a convenience; the JSON is the result
            print(f"saved {path}; plot failed: {e}")
    return 1 if any("error" in r for r in res["fronts"]) else 0


if __name__ == "__main__":
    sys.exit(main())
