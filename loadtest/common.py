"""Shared helpers for the load-test harness.

Everything here talks to 127.0.0.1 only and every wait is bounded by a deadline.

* ports:      `free_port`, `wait_port`
* processes:  `Proc` / `start_process` (subprocess with logs in a temp dir, SIGTERM → SIGKILL)
* nginx:      `render_nginx_backend` (the 12-byte "hello world\\n" backend), `render_nginx_proxy`,
              `start_nginx`
* haproxy:    `render_haproxy`, `start_haproxy`
* wrk:        `run_wrk` → `WrkResult` (req/s, p50/p75/p90/p99 from `--latency`)
* gateway:    `render_gateway_config`, `adapt_gateway_config`, `start_gateway`
* CPU usage:  `cpu_seconds` (process tree, from /proc)

No CPU pinning is done: on the 2-core reference machine wrk, the proxy under test and the backend
share both cores, exactly the same way for every target, so the ratios are comparable; absolute
figures are not comparable across machines.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

HOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = REPO_ROOT / ".venv" / "bin"
BACKEND_BODY = "hello world\n"  # 12 bytes


class HarnessError(RuntimeError):
    """A component of the benchmark could not be started or measured."""


# --------------------------------------------------------------------------- ports


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


_taken: set[int] = set()


def free_port(host: str = HOST) -> int:
    """A currently bindable TCP port *below* the ephemeral range.

    Ports handed out by `bind(port 0)` come from the ephemeral range, where the load generators'
    own outgoing connections (and TIME_WAIT sockets) also live, so a server started a moment later
    can hit EADDRINUSE; ports below the range (10000..range start) avoid that.
    """
    import random

    lo, hi = _ephemeral_range()
    start, stop = (10000, lo) if lo > 12000 else (hi + 1, 65536)
    if stop - start < 1000:  # no usable room outside the ephemeral range
        start, stop = 10000, 65536
    for _ in range(200):
        port = random.randrange(start, stop)
        if port in _taken:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _taken.add(port)
        return port
    raise HarnessError("no free port found")


def free_ports(n: int, host: str = HOST) -> list[int]:
    """`n` distinct free ports."""
    return [free_port(host) for _ in range(n)]


def port_open(port: int, host: str = HOST, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port(
    port: int, host: str = HOST, timeout: float = 10.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Wait until `host:port` accepts a TCP connection; raise if `proc` dies or the deadline passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise HarnessError(f"process exited with code {proc.returncode} before {host}:{port} opened")
        if port_open(port, host):
            return
        time.sleep(0.05)
    raise HarnessError(f"{host}:{port} did not accept connections within {timeout:.1f}s")


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """One GET (for sanity checks, not load). Returns (status, body); HTTP errors are returned too."""
    req = urllib.request.Request(url, headers={"Connection": "close"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read()


def http_post(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=b"", method="POST", headers={"Connection": "close"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read()


# --------------------------------------------------------------------------- processes


@dataclass
class Proc:
    """A started subprocess with its stdout/stderr captured to `log_path`."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    port: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 20) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM (to the whole process group), wait up to `timeout`, then SIGKILL."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=5.0)
        # children that outlived a clean leader exit (e.g. workers) share its process group
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        return self.popen.returncode

    def __enter__(self) -> Proc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_process(
    name: str,
    cmd: Sequence[str],
    log_dir: Path,
    port: int | None = None,
    timeout: float = 10.0,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    prefix: Sequence[str] = (),
) -> Proc:
    """Start `cmd` in its own process group; if `port` is given, wait (bounded) until it accepts.
    `prefix`: a command that runs `cmd` (e.g. valgrind), in the same process."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log:
        popen = subprocess.Popen(
            [*prefix, *cmd],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=str(cwd or REPO_ROOT),
            start_new_session=True,
        )
    proc = Proc(name=name, popen=popen, log_path=log_path, port=port)
    if port is not None:
        try:
            wait_port(port, timeout=timeout, proc=popen)
        except HarnessError as e:
            proc.stop()
            raise HarnessError(f"{name}: {e}\n--- {log_path} ---\n{proc.log_tail()}") from None
    return proc


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of `pid` and all its live descendants (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    user = system = 0.0
    for raw in _proc_texts(pid, "stat"):
        rest = raw[raw.rfind(")") + 2 :].split()  # after "(comm)": state(0) ppid(1) ... utime(11) stime(12)
        user += int(rest[11]) / tick
        system += int(rest[12]) / tick
    return user, system


def _descendants(pid: int) -> list[int]:
    """`pid` and its live descendants (Linux /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parents.setdefault(int(raw[raw.rfind(")") + 2 :].split()[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(parents.get(p, ()))
    return out


def _proc_texts(pid: int, name: str) -> Iterator[str]:
    """The text of /proc/P/`name` for `pid` and each of its live descendants (gone ones skipped)."""
    for p in _descendants(pid):
        try:
            yield Path(f"/proc/{p}/{name}").read_text()
        except OSError:
            continue


def context_switches(pid: int) -> tuple[int, int]:
    """(voluntary, involuntary) context switches of `pid` and its live descendants' main threads.

    Voluntary ones are an event loop going to sleep in epoll_wait with nothing to do: each costs
    a wake-up, paid in kernel time by whoever next writes to it. Involuntary ones are preemptions.
    """
    vol = invol = 0
    for text in _proc_texts(pid, "status"):
        for line in text.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                vol += int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches:"):
                invol += int(line.split()[1])
    return vol, invol


def cpu_seconds(pid: int) -> float:
    """user+system CPU seconds of `pid` and all its live descendants (Linux /proc)."""
    return sum(cpu_times(pid))


def raise_nofile_limit() -> int:
    """Raise RLIMIT_NOFILE soft limit to the hard limit (for thousands of sockets)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def which(tool: str) -> str:
    path = shutil.which(tool) or next(
        (p for p in (f"/usr/sbin/{tool}", f"/usr/bin/{tool}") if os.access(p, os.X_OK)), None
    )
    if path is None:
        raise HarnessError(f"{tool} not found (apt-get install -y nginx haproxy wrk)")
    return path


# --------------------------------------------------------------------------- nginx


def _nginx_head(tmpdir: Path, workers: int) -> str:
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""{user}worker_processes {workers};
error_log {tmpdir}/error.log warn;
pid {tmpdir}/nginx.pid;
worker_rlimit_nofile 65536;
events {{
    worker_connections 16384;
    multi_accept on;
}}
"""


def _nginx_http_common(tmpdir: Path) -> str:
    return f"""    access_log off;
    client_body_temp_path {tmpdir}/client_body;
    proxy_temp_path {tmpdir}/proxy;
    fastcgi_temp_path {tmpdir}/fastcgi;
    uwsgi_temp_path {tmpdir}/uwsgi;
    scgi_temp_path {tmpdir}/scgi;
    keepalive_timeout 65s;
    keepalive_requests 1000000;
"""


def render_nginx_backend(port: int, tmpdir: Path, workers: int = 1) -> str:
    """nginx answering every request with 200 "hello world\\n" (12 bytes), keep-alive on."""
    return (
        _nginx_head(tmpdir, workers)
        + "http {\n"
        + _nginx_http_common(tmpdir)
        + f"""    server {{
        listen {HOST}:{port} reuseport backlog=4096;
        location / {{
            default_type text/plain;
            return 200 "hello world\\n";
        }}
    }}
}}
"""
    )


# What the gateway adds to every proxied request by default; nginx adds none of them unless told.
NGINX_FORWARDED = """
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $http_host;"""


def render_nginx_proxy(
    port: int, backend_port: int, tmpdir: Path, workers: int = 1, forwarded: bool = False
) -> str:
    """nginx as a keep-alive reverse proxy to 127.0.0.1:`backend_port`.

    `forwarded`: also pass Host and set X-Forwarded-For/-Proto/-Host as the gateway does, so both
    proxies send the backend the same request (nginx's default sends `Host: backend` and no X-Forwarded-*).
    """
    return (
        _nginx_head(tmpdir, workers)
        + "http {\n"
        + _nginx_http_common(tmpdir)
        + f"""    upstream backend {{
        server {HOST}:{backend_port};
        keepalive 64;
        keepalive_requests 1000000;
        keepalive_timeout 60s;
    }}
    server {{
        listen {HOST}:{port} reuseport backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";{NGINX_FORWARDED if forwarded else ""}
        }}
    }}
}}
"""
    )


def start_minimal_forwarder(
    port: int, backend_port: int, tmpdir: Path, timeout: float = 10.0, prefix: Sequence[str] = ()
) -> Proc:
    """Run `loadtest.minimal_forwarder` (the throughput floor) on `port` in front of the backend."""
    cmd = [venv_python(), "-m", "loadtest.minimal_forwarder", "--port", str(port)]
    cmd += ["--upstream", f"{HOST}:{backend_port}"]
    return start_process("minimal", cmd, tmpdir, port, timeout, prefix=prefix)


def start_nginx(
    name: str,
    conf_text: str,
    tmpdir: Path,
    port: int,
    timeout: float = 10.0,
    prefix: Sequence[str] = (),
    single_process: bool = False,
) -> Proc:
    """Run nginx in the foreground (`daemon off`) with prefix and config in `tmpdir`.
    `single_process`: no master, the one worker is the process started (`master_process off`)."""
    tmpdir.mkdir(parents=True, exist_ok=True)
    conf = tmpdir / "nginx.conf"
    conf.write_text(conf_text)
    for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi", "logs"):
        (tmpdir / d).mkdir(exist_ok=True)
    directives = "daemon off; master_process off;" if single_process else "daemon off;"
    cmd = [which("nginx"), "-p", str(tmpdir), "-c", str(conf), "-g", directives]
    proc = start_process(name, cmd, tmpdir, port=port, timeout=timeout, prefix=prefix)
    proc.extra["conf"] = str(conf)
    return proc


# --------------------------------------------------------------------------- haproxy


def render_haproxy(port: int, backend_port: int, threads: int = 1) -> str:
    return f"""global
    nbthread {threads}
    maxconn 8000
    tune.maxaccept 64

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s

frontend fe
    bind {HOST}:{port}
    default_backend be

backend be
    server s1 {HOST}:{backend_port}
"""


def start_haproxy(name: str, conf_text: str, tmpdir: Path, port: int, timeout: float = 10.0) -> Proc:
    tmpdir.mkdir(parents=True, exist_ok=True)
    conf = tmpdir / "haproxy.cfg"
    conf.write_text(conf_text)
    cmd = [which("haproxy"), "-db", "-f", str(conf)]
    proc = start_process(name, cmd, tmpdir, port=port, timeout=timeout)
    proc.extra["conf"] = str(conf)
    return proc


# --------------------------------------------------------------------------- wrk


@dataclass
class WrkResult:
    url: str
    duration: float
    connections: int
    threads: int
    rps: float
    requests: int
    p50_ms: float | None
    p75_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    latency_avg_ms: float | None
    latency_max_ms: float | None
    non_2xx_3xx: int
    socket_errors: dict[str, int]
    raw: str

    def to_dict(self, raw: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not raw:
            d.pop("raw")
        return d


_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0, "h": 3600000.0}


def parse_duration_ms(text: str) -> float:
    """wrk latency like `361.00us`, `1.23ms`, `2.00s`, `1.00m` → milliseconds."""
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not m:
        raise ValueError(f"unparseable wrk duration {text!r}")
    return float(m.group(1)) * _UNIT_MS[m.group(2)]


def parse_wrk(
    output: str, url: str = "", duration: float = 0.0, connections: int = 0, threads: int = 0
) -> WrkResult:
    rps_m = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    if not rps_m:
        raise HarnessError(f"wrk output has no Requests/sec line:\n{output}")
    req_m = re.search(r"^\s*(\d+) requests in ([\d.]+\w+)", output, re.M)
    pct: dict[str, float] = {}
    dist = output.split("Latency Distribution", 1)
    if len(dist) == 2:
        for m in re.finditer(r"^\s*(\d+(?:\.\d+)?)%\s+([\d.]+(?:us|ms|s|m|h))\s*$", dist[1], re.M):
            pct[m.group(1)] = parse_duration_ms(m.group(2))
    lat_m = re.search(r"^\s*Latency\s+([\d.]+\w+)\s+([\d.]+\w+)\s+([\d.]+\w+)", output, re.M)
    non2xx_m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    sock_m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    socket_errors = (
        dict(zip(("connect", "read", "write", "timeout"), map(int, sock_m.groups()), strict=True))
        if sock_m
        else {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    )
    return WrkResult(
        url=url,
        duration=duration,
        connections=connections,
        threads=threads,
        rps=float(rps_m.group(1)),
        requests=int(req_m.group(1)) if req_m else 0,
        p50_ms=pct.get("50"),
        p75_ms=pct.get("75"),
        p90_ms=pct.get("90"),
        p99_ms=pct.get("99"),
        latency_avg_ms=parse_duration_ms(lat_m.group(1)) if lat_m else None,
        latency_max_ms=parse_duration_ms(lat_m.group(3)) if lat_m else None,
        non_2xx_3xx=int(non2xx_m.group(1)) if non2xx_m else 0,
        socket_errors=socket_errors,
        raw=output,
    )


VARY_HEADS: Final = str(Path(__file__).with_name("vary_heads.lua"))


def wrk_script(vary_heads: bool) -> str | None:
    """The wrk Lua script that makes every request's head different (`--vary-heads`), or none."""
    return VARY_HEADS if vary_heads else None


def run_wrk(
    url: str,
    duration: float,
    connections: int = 50,
    threads: int = 1,
    timeout_s: float = 5.0,
    script: str | None = None,
) -> WrkResult:
    """`wrk -tT -cN -dD --latency [-s SCRIPT] URL`, bounded by a hard subprocess timeout."""
    dur = max(1, round(duration))
    cmd = [
        which("wrk"),
        f"-t{threads}",
        f"-c{connections}",
        f"-d{dur}s",
        f"--timeout={max(1, round(timeout_s))}s",
        "--latency",
        *(["-s", script] if script else []),
        url,
    ]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=dur + 30, check=False)
    except subprocess.TimeoutExpired as e:
        raise HarnessError(f"wrk did not finish within {dur + 30}s") from e
    if out.returncode != 0:
        raise HarnessError(f"wrk failed ({out.returncode}): {out.stderr or out.stdout}")
    return parse_wrk(out.stdout, url=url, duration=dur, connections=connections, threads=threads)


# --------------------------------------------------------------------------- gateway


def venv_python() -> str:
    """The project venv's Python (what the scripts install into), else the one running this."""
    return str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable


def build_baseline(ref: str) -> Path:
    """The gateway as it was at git `ref`, built (compiled, like an install) into a directory of
    its own, for a same-run A/B against the working tree. Cached by commit in ~/.cache."""
    sha = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "rev-parse", "--verify", f"{ref}^{{commit}}"],
        capture_output=True,
        text=True,
        check=False,
    )
    if sha.returncode != 0:
        raise HarnessError(f"--baseline {ref}: not a commit of this repository")
    site = Path.home() / ".cache" / "gateway-baselines" / sha.stdout.strip()
    if (site / "gateway" / "__init__.py").exists():
        return site
    work = site.with_suffix(".build")
    shutil.rmtree(work, ignore_errors=True)
    (work / "src").mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "archive", sha.stdout.strip()], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(work / "src")], input=archive.stdout, check=True)
    python = venv_python()
    print(f"building the gateway at {ref} ({sha.stdout.strip()[:12]}) for the baseline …", file=sys.stderr)
    subprocess.run(
        [python, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(work / "wheel"), str(work / "src")],
        check=True,
    )
    wheel = next((work / "wheel").glob("*.whl"))
    subprocess.run([python, "-m", "zipfile", "-e", str(wheel), str(work / "site")], check=True)
    (work / "site").rename(site)
    shutil.rmtree(work, ignore_errors=True)
    return site


def gateway_command(config_path: Path) -> list[str]:
    exe = VENV_BIN / "gateway"
    if exe.exists():
        return [str(exe), "run", "--config", str(config_path)]
    python = venv_python()
    return [python, "-m", "gateway", "run", "--config", str(config_path)]


def render_gateway_config(
    port: int,
    backends: Sequence[str],
    health_port: int | None = None,
    admin_port: int | None = None,
    balance: str = "round_robin",
    keepalive: int = 64,
    workers: int | None = None,
) -> dict[str, Any]:
    """The minimal gateway config (as a dict; `yaml.safe_dump` it) proxying `/` to `backends`."""
    cfg: dict[str, Any] = {
        "listen": f"{HOST}:{port}",
        "health_listen": f"{HOST}:{health_port}" if health_port else None,
        "admin_listen": f"{HOST}:{admin_port}" if admin_port else None,
        "upstreams": {
            "api": {
                "balance": balance,
                "keepalive": keepalive,
                "targets": [{"address": b, "weight": 1} for b in backends],
            }
        },
        "routes": [{"name": "api", "match": {"path_prefix": "/"}, "upstream": "api"}],
    }
    if workers is not None:
        cfg["workers"] = workers
    return cfg


def adapt_gateway_config(
    cfg: dict[str, Any],
    port: int,
    health_port: int | None,
    admin_port: int | None,
    backends: Sequence[str] | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Take a user-supplied gateway config and point it at the benchmark's ports.

    Listeners are moved to the given free ports (a null listener stays disabled); when `backends`
    is given every upstream's targets are replaced by them (same weight 1), so a config written for
    production (rate limits, routes...) can be benchmarked against the 12-byte backend.
    """
    out = dict(cfg)
    out["listen"] = f"{HOST}:{port}"
    for key, p in (("health_listen", health_port), ("admin_listen", admin_port)):
        if out.get(key, "") is not None:
            out[key] = f"{HOST}:{p}" if p else None
    if backends is not None:
        ups = {}
        for name, up in (out.get("upstreams") or {}).items():
            up = dict(up)
            up["targets"] = [{"address": b, "weight": 1} for b in backends]
            ups[name] = up
        out["upstreams"] = ups
    if workers is not None:
        out["workers"] = workers
    return out


def start_gateway(
    cfg: dict[str, Any],
    tmpdir: Path,
    name: str = "gateway",
    timeout: float = 15.0,
    site: Path | None = None,
    prefix: Sequence[str] = (),
) -> Proc:
    """Write `cfg` as YAML and run the gateway; waits until its `listen` port accepts. `site`: run
    the build there (`build_baseline`) instead of the working tree's."""
    tmpdir.mkdir(parents=True, exist_ok=True)
    path = tmpdir / "gateway.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    port = int(str(cfg["listen"]).rsplit(":", 1)[1])
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    cmd, cwd = gateway_command(path), None
    if site is not None:  # `python -m` from inside `site`: its gateway package, not the repository's
        python = venv_python()
        cmd, cwd = [python, "-m", "gateway", "run", "--config", str(path)], site
        env["PYTHONPATH"] = str(site)
    proc = start_process(name, cmd, tmpdir, port=port, timeout=timeout, env=env, cwd=cwd, prefix=prefix)
    proc.extra["config"] = str(path)
    return proc


def tool_versions() -> dict[str, str]:
    """Versions of nginx / haproxy / wrk for result metadata (best effort)."""
    out: dict[str, str] = {}
    for tool, args in (("nginx", ["-v"]), ("haproxy", ["-v"]), ("wrk", ["-v"])):
        try:
            r = subprocess.run([which(tool), *args], capture_output=True, text=True, timeout=5, check=False)
            out[tool] = (r.stdout + r.stderr).strip().splitlines()[0]
        except (HarnessError, OSError, subprocess.TimeoutExpired, IndexError):
            out[tool] = "unavailable"
    return out


# --------------------------------------------------------------------------- sim_backend


def start_sim_backend(
    port: int,
    log_dir: Path,
    concurrency: int = 20,
    service_ms: float = 50.0,
    extra: Sequence[str] = (),
    name: str | None = None,
) -> Proc:
    """Run `python -m loadtest.sim_backend` as a subprocess (see that module for `extra` flags)."""
    python = venv_python()
    cmd = [
        python,
        "-m",
        "loadtest.sim_backend",
        "--port",
        str(port),
        "--concurrency",
        str(concurrency),
        "--service-ms",
        str(service_ms),
        *extra,
    ]
    return start_process(name or f"sim-{port}", cmd, log_dir, port=port, timeout=10.0)


def git_commit() -> str:
    """Short hash of the checkout being measured ("" outside git)."""
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=REPO_ROOT,
            check=False,
        )
        return out.stdout.strip()
    return ""


def run_meta(args: Any) -> dict[str, Any]:
    """What every result file records about its run: when, which code, which machine, which tools."""
    import datetime as dt

    return {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git": git_commit(),
        "cpus": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "tools": tool_versions(),
        "python": sys.version.split()[0],
        "args": vars(args) if not isinstance(args, dict) else args,
    }


def save_json(doc: Any, path: str | Path) -> Path:
    """Write a run's results as JSON (folders created) and say where; returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, default=str))
    print(f"\nsaved {out}")
    return out
