"""Reload under load: the gateway vs nginx, N reloads while 8 keep-alive clients run.

One run starts the 12-byte backend (nginx, 1 worker), then for each proxy in turn (nginx as a
keep-alive reverse proxy with 1 worker; the gateway with 1 worker), both in front of that same
backend: 8 keep-alive clients for `--duration` s while the proxy's configuration is changed and
reloaded `--reloads` times at even intervals:

* nginx: the config alternates (`keepalive_timeout` 65s/66s) and the master gets SIGHUP (what
  `nginx -s reload` sends); a reload is confirmed when a new worker process appears;
* the gateway: the YAML alternates between variants (route timeout changed, a rate limit that
  never triggers added, a route added) written atomically, then SIGHUP to the process; confirmed
  by the `gateway_config_reloads_total{result="success"}` counter.

Clients (`--client`):
* `wrk` — `wrk -t1 -c8 -dD`: failed = non-2xx/3xx + socket errors (connect, read, write, timeout);
  a connection closed under a request is a read or write error;
* `asyncio` — 8 raw HTTP/1.1 keep-alive connections (no retries, no pooling) counting precisely:
  ok, non-2xx, closed before the response (EOF / reset on a connection the server had kept open),
  connect errors, timeouts, and how often the server said `Connection: close`.

Everything talks to 127.0.0.1, every loop is bounded in time and count, every process is stopped.
The machine is shared: wrap runs in `flock /tmp/gateway-bench.lock ...` so benchmarks never overlap.

    flock /tmp/gateway-bench.lock .venv/bin/python -m loadtest.bench_reload \\
        --duration 20 --reloads 20 --json loadtest/results/reload.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from loadtest import common
from loadtest.common import HOST, HarnessError, Proc

CONNECTIONS = 8


# ---- machine load -------------------------------------------------------------------------------------
def busy_jiffies() -> int:
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return sum(fields) - fields[3] - fields[4]


def machine_cores(seconds: float = 1.0) -> float:
    """Cores busy on the whole machine over `seconds` (measured while our load is not running)."""
    b0 = busy_jiffies()
    time.sleep(seconds)
    return (busy_jiffies() - b0) / os.sysconf("SC_CLK_TCK") / seconds


# ---- reloaders ------------------------------------------------------------------------------------------
class Reloader:
    """Changes a proxy's configuration and asks it to reload; counts confirmed reloads."""

    name = ""

    def __init__(self, proc: Proc) -> None:
        self.proc = proc
        self.sent = 0
        self.times: list[float] = []

    async def reload(self, i: int) -> None:
        raise NotImplementedError

    async def confirmed(self) -> int:
        raise NotImplementedError


class NginxReloader(Reloader):
    name = "nginx"

    def __init__(self, proc: Proc, conf: Path) -> None:
        super().__init__(proc)
        self.conf = conf
        self.base = conf.read_text()
        self.seen_workers: set[int] = set(self.workers())
        self.new_workers = 0

    def workers(self) -> list[int]:
        out = subprocess.run(
            ["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True, timeout=5, check=False
        ).stdout
        return [int(p) for p in out.split()]

    async def reload(self, i: int) -> None:
        text = self.base.replace("keepalive_timeout 65s;", f"keepalive_timeout {65 + (i + 1) % 2}s;")
        tmp = self.conf.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.conf)
        os.kill(self.proc.pid, signal.SIGHUP)  # what `nginx -s reload` sends to the master
        self.sent += 1
        # Confirmed once a new worker appears (bounded wait; the old ones drain in the background).
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            fresh = set(self.workers()) - self.seen_workers
            if fresh:
                self.seen_workers |= fresh
                self.new_workers += 1
                return
            await asyncio.sleep(0.02)

    async def confirmed(self) -> int:
        return self.new_workers


def gateway_variant(base: dict[str, Any], i: int) -> dict[str, Any]:
    """Variant i % 4 of the gateway config: each differs from the one before it."""
    cfg: dict[str, Any] = json.loads(json.dumps(base))
    route = cfg["routes"][0]
    v = i % 4
    if v >= 1:
        route["timeouts"] = {"response": "7s"}
    if v >= 2:
        route["rate_limit"] = {"rate": 10_000_000, "per": "1s", "key": "route", "name": "never"}
    if v == 3:
        cfg["routes"].insert(0, {"name": "extra", "match": {"path_prefix": "/extra"}, "upstream": "api"})
    return cfg


class GatewayReloader(Reloader):
    name = "gateway"

    def __init__(self, proc: Proc, path: Path, base: dict[str, Any], admin_port: int) -> None:
        super().__init__(proc)
        self.path = path
        self.base = base
        self.admin_port = admin_port
        self.before = self.counter()

    def counter(self) -> tuple[float, float]:
        status, body = common.http_get(f"http://{HOST}:{self.admin_port}/metrics", timeout=5)
        if status != 200:
            raise HarnessError(f"gateway /metrics answered {status}")
        text = body.decode()

        def value(result: str) -> float:
            m = re.search(rf'^gateway_config_reloads_total\{{result="{result}"\}} ([\d.e+]+)$', text, re.M)
            return float(m.group(1)) if m else 0.0

        return value("success"), value("failure")

    async def reload(self, i: int) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(gateway_variant(self.base, i + 1), sort_keys=False))
        os.replace(tmp, self.path)
        os.kill(self.proc.pid, signal.SIGHUP)
        self.sent += 1

    async def confirmed(self) -> int:
        ok, failed = self.counter()
        if failed != self.before[1]:
            raise HarnessError(f"gateway rejected {failed - self.before[1]:.0f} reloads")
        return int(ok - self.before[0])


async def reload_loop(reloader: Reloader, count: int, duration: float, t0: float) -> None:
    """`count` reloads at even intervals over `duration` seconds from `t0` (loop time)."""
    loop = asyncio.get_running_loop()
    interval = duration / (count + 1)
    for i in range(count):
        delay = t0 + (i + 1) * interval - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        reloader.times.append(round(loop.time() - t0, 3))
        await reloader.reload(i)


# ---- clients --------------------------------------------------------------------------------------------
async def run_wrk(url: str, duration: float) -> dict[str, Any]:
    dur = max(1, round(duration))
    cmd = [common.which("wrk"), "-t1", f"-c{CONNECTIONS}", f"-d{dur}s", "--timeout=5s", "--latency", url]
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), dur + 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise HarnessError(f"wrk did not finish within {dur + 30}s") from None
    if proc.returncode != 0:
        raise HarnessError(f"wrk failed ({proc.returncode}): {err.decode()}")
    r = common.parse_wrk(out.decode(), url=url, duration=dur, connections=CONNECTIONS, threads=1)
    failed = r.non_2xx_3xx + sum(r.socket_errors.values())
    return {
        "client": "wrk",
        "command": " ".join(cmd[1:]),
        "requests": r.requests - r.non_2xx_3xx + failed,  # attempts: ok + failed
        "ok": r.requests - r.non_2xx_3xx,  # wrk's "requests" are the completed responses
        "failed": failed,
        "non_2xx_3xx": r.non_2xx_3xx,
        "socket_errors": r.socket_errors,
        "rps": r.rps,
        "p99_ms": r.p99_ms,
        "latency_max_ms": r.latency_max_ms,
    }


class Counts:
    def __init__(self) -> None:
        self.ok = 0
        self.non_2xx = 0
        self.closed_before_response = 0
        self.connect_errors = 0
        self.timeouts = 0
        self.connections = 0
        self.told_close = 0
        self.examples: list[str] = []

    def fail(self, kind: str, what: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.examples) < 10:
            self.examples.append(what)


REQUEST = f"GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """(status, server asked to close) of one response with a Content-Length body."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = 0
    close = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection":
            close = value.strip().lower() == b"close"
        elif name == b"transfer-encoding":
            raise ValueError("chunked response: the 12-byte backend always sends Content-Length")
    if length:
        await reader.readexactly(length)
    return status, close


async def keepalive_client(port: int, deadline: float, counts: Counts, max_requests: int) -> None:
    loop = asyncio.get_running_loop()
    writer: asyncio.StreamWriter | None = None
    reader: asyncio.StreamReader | None = None
    try:
        for _ in range(max_requests):
            if loop.time() >= deadline:
                return
            if writer is None:
                try:
                    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 5)
                except (OSError, TimeoutError) as e:
                    counts.fail("connect_errors", repr(e))
                    await asyncio.sleep(0.01)
                    continue
                counts.connections += 1
            assert reader is not None and writer is not None
            try:
                writer.write(REQUEST)
                status, close = await asyncio.wait_for(read_response(reader), 5)
            except TimeoutError:
                counts.fail("timeouts", "no response within 5 s")
                close = True
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
                counts.fail("closed_before_response", repr(e))
                close = True
            else:
                if 200 <= status < 300:
                    counts.ok += 1
                else:
                    counts.fail("non_2xx", f"status {status}")
                if close:
                    counts.told_close += 1
            if close:
                writer.close()
                writer = reader = None
    finally:
        if writer is not None:
            writer.close()


async def run_asyncio_clients(port: int, duration: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    counts = Counts()
    t0 = loop.time()
    deadline = t0 + duration
    await asyncio.gather(*(keepalive_client(port, deadline, counts, 10_000_000) for _ in range(CONNECTIONS)))
    wall = loop.time() - t0
    failed = counts.non_2xx + counts.closed_before_response + counts.connect_errors + counts.timeouts
    return {
        "client": "asyncio",
        "command": f"{CONNECTIONS} raw HTTP/1.1 keep-alive connections, no retries, {duration:g}s",
        "requests": counts.ok + failed,
        "ok": counts.ok,
        "failed": failed,
        "non_2xx": counts.non_2xx,
        "closed_before_response": counts.closed_before_response,
        "connect_errors": counts.connect_errors,
        "timeouts": counts.timeouts,
        "connections_opened": counts.connections,
        "told_connection_close": counts.told_close,
        "rps": round((counts.ok + failed) / wall, 1),
        "failure_examples": counts.examples,
    }


# ---- one measurement --------------------------------------------------------------------------------------
async def measure(
    reloader: Reloader, port: int, client: str, duration: float, reloads: int
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    url = f"http://{HOST}:{port}/"
    t0 = loop.time()
    load: Awaitable[dict[str, Any]] = (
        run_wrk(url, duration) if client == "wrk" else run_asyncio_clients(port, duration)
    )
    load_task = asyncio.ensure_future(load)
    await reload_loop(reloader, reloads, duration, t0)
    result = await load_task
    if not reloader.proc.alive():
        raise HarnessError(f"{reloader.name} died:\n{reloader.proc.log_tail()}")
    result["reloads_sent"] = reloader.sent
    result["reload_at_s"] = reloader.times
    return result


def sanity(port: int, name: str) -> None:
    status, body = common.http_get(f"http://{HOST}:{port}/sanity", timeout=3.0)
    if status != 200 or body != common.BACKEND_BODY.encode():
        raise HarnessError(f"{name}: sanity GET returned {status} {body[:80]!r}")


git_commit = common.git_commit


def git_dirty() -> list[str]:
    """Files of gateway/ that differ from the commit (the measured code is the work tree)."""
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        out = subprocess.run(
            ["git", "status", "--porcelain", "--", "gateway"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=common.REPO_ROOT,
            check=False,
        )
        return [line[3:] for line in out.stdout.splitlines()]
    return []


def gateway_module() -> str:
    """Where the measured gateway is imported from (PYTHONPATH may point at a clean snapshot)."""
    python = common.venv_python()
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        out = subprocess.run(
            [python, "-c", "import gateway; print(gateway.__file__)"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd="/",  # like the `gateway` console script: the work tree is not on sys.path by cwd
            check=False,
        )
        return out.stdout.strip()
    return ""


def start_target(name: str, tmp: Path, backend_port: int) -> tuple[Proc, Callable[[], Reloader], int]:
    port = common.free_port()
    if name == "nginx":
        d = tmp / "nginx"
        proc = common.start_nginx(
            "nginx", common.render_nginx_proxy(port, backend_port, d, workers=1), d, port
        )
        conf = Path(proc.extra["conf"])
        return proc, lambda: NginxReloader(proc, conf), port
    health, admin = common.free_port(), common.free_port()
    base = common.render_gateway_config(port, [f"{HOST}:{backend_port}"], health, admin, keepalive=64)
    proc = common.start_gateway(gateway_variant(base, 0), tmp / "gateway")
    path = Path(proc.extra["config"])
    return proc, lambda: GatewayReloader(proc, path, base, admin), port


async def run_async(args: argparse.Namespace) -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    started: list[Proc] = []
    with tempfile.TemporaryDirectory(prefix="loadtest-reload-") as tmpname:
        tmp = Path(tmpname)
        try:
            bport = common.free_port()
            backend = common.start_nginx(
                "backend", common.render_nginx_backend(bport, tmp / "backend"), tmp / "backend", bport
            )
            started.append(backend)
            sanity(bport, "backend")
            for name in args.targets:
                proc, make_reloader, port = start_target(name, tmp, bport)
                started.append(proc)
                sanity(port, name)
                for client in args.clients:
                    if args.warmup > 0:
                        await run_asyncio_clients(port, args.warmup)
                    other = machine_cores(1.0)
                    reloader = make_reloader()
                    row = await measure(reloader, port, client, args.duration, args.reloads)
                    row["reloads_confirmed"] = await reloader.confirmed()
                    row = {"target": name, **row, "other_cores_before": round(other, 2)}
                    results.append(row)
                    print(
                        f"[{name} / {client}] {row['ok']:,} ok, {row['failed']:,} failed, "
                        f"{row['rps']:,.0f} req/s, reloads {row['reloads_confirmed']}/{row['reloads_sent']}",
                        file=sys.stderr,
                    )
                proc.stop()
                if proc.popen.returncode not in (0, None):
                    print(f"[{name}] exit code {proc.popen.returncode}", file=sys.stderr)
        finally:
            for p in reversed(started):
                p.stop()
    return {
        "meta": {
            "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "git": git_commit(),
            "gateway_uncommitted": git_dirty(),
            "gateway_module": gateway_module(),
            "pythonpath": os.environ.get("PYTHONPATH", ""),
            **{k: v for k, v in common.run_meta(args).items() if k not in ("when", "git")},
            "command": "python -m loadtest.bench_reload " + " ".join(sys.argv[1:]),
            "scenario": (
                f"{CONNECTIONS} keep-alive clients, {args.duration:g}s, {args.reloads} reloads at even "
                "intervals; nginx 1 worker (SIGHUP to the master), gateway 1 worker (SIGHUP); "
                "both in front of the same 12-byte nginx backend"
            ),
        },
        "results": results,
    }


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| proxy | client | requests ok | failed | req/s | reloads confirmed | failures by kind |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r["client"] == "wrk":
            kinds = f"non-2xx {r['non_2xx_3xx']}, socket {r['socket_errors']}"
        else:
            kinds = (
                f"closed before response {r['closed_before_response']}, connect {r['connect_errors']}, "
                f"non-2xx {r['non_2xx']}, timeout {r['timeouts']}; connections opened "
                f"{r['connections_opened']}"
            )
        lines.append(
            f"| {r['target']} | {r['client']} | {r['ok']:,} | {r['failed']:,} | {r['rps']:,.0f} | "
            f"{r['reloads_confirmed']}/{r['reloads_sent']} | {kinds} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench_reload", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load per measurement (20)")
    p.add_argument("--reloads", type=int, default=20, help="reloads during each measurement (20)")
    p.add_argument(
        "--client",
        choices=["wrk", "asyncio", "both"],
        default="both",
        help="load generator: wrk, the precise asyncio client, or both in turn (default both)",
    )
    p.add_argument(
        "--targets", default="nginx,gateway", help="comma-separated, from nginx,gateway (default both)"
    )
    p.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds before each measurement (2)")
    p.add_argument("--json", metavar="FILE", help="save results and metadata as JSON")
    a = p.parse_args(argv)
    a.clients = ["wrk", "asyncio"] if a.client == "both" else [a.client]
    a.targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    if not (2 <= a.duration <= 300 and 1 <= a.reloads <= 200 and 0 <= a.warmup <= 30):
        p.error("duration 2..300 s, reloads 1..200, warmup 0..30 s")
    if not a.targets or any(t not in ("nginx", "gateway") for t in a.targets):
        p.error("--targets: nginx and/or gateway")
    common.raise_nofile_limit()
    try:
        import uvloop

        out = uvloop.run(run_async(a))
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"\n{CONNECTIONS} keep-alive clients, {a.duration:g} s, {a.reloads} reloads, {os.cpu_count()} CPUs\n"
    )
    print(table(out["results"]))
    if a.json:
        common.save_json(out, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
