"""`workers: N`: a master process supervising N worker processes on the same port (SO_REUSEPORT).

Why this shape: one Python process saturates one core; N processes bound with SO_REUSEPORT
share the port and the kernel spreads connections. The master keeps what must be host-wide:
- health: `/healthz` and `/readyz` are served by the master on its own thread; ready once every
  worker is ready, 503 while draining; alive while the master's loop runs and a worker lives;
- metrics: `/metrics` merges every worker's plain counters (fetched from each worker's private
  loopback admin port) into one exposition; admin writes are forwarded to every worker;
- rate limits: the master owns the buckets (gateway.ratelimit.coordinator) unless Redis is configured;
- supervision: a worker that dies is restarted (and counted); SIGHUP validates the file then
  reloads every worker and the master's buckets; SIGTERM drains every worker, then exits 0;
- signals: held from the start of every process until its handlers run (gateway.process.orphan); the
  master releases them once every worker is spawned, and spawns each worker held.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from gateway.config.model import Config, parse_address
from gateway.config.parse import load_file
from gateway.config.schema import ConfigError
from gateway.control import metrics
from gateway.control.liveness import HealthServer, Liveness
from gateway.observe import log
from gateway.process import orphan
from gateway.ratelimit.coordinator import CoordinatorServer

READY = "GATEWAY_WORKER_READY"


def worker_count(value: int | str) -> int:
    if value == "auto":
        return max(1, os.cpu_count() or 1)
    return max(1, int(value))


class Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: subprocess.Popen[bytes] | None = None
        self.admin_port = 0
        self.ready = False
        self.restarts = 0


class Master:
    def __init__(self, config: Config, config_path: str, count: int) -> None:
        self.config = config
        self.config_path = config_path
        self.workers = [Worker(i) for i in range(count)]
        self.liveness = Liveness(config.health.stall_threshold)
        self.health: HealthServer | None = None
        self.stopping = False
        self.tmp = tempfile.mkdtemp(prefix="gateway-")
        self.coordinator: CoordinatorServer | None = None
        self.session: aiohttp.ClientSession | None = None
        self.runner: web.AppRunner | None = None
        self.admin_port = 0
        self.reloads = 0
        self.reload_failures = 0

    # ---- lifecycle --------------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.liveness.beat_on(loop)
        self.session = aiohttp.ClientSession()
        if self.config.rate_limit_store is None:
            self.coordinator = CoordinatorServer(self.config, os.path.join(self.tmp, "ratelimit.sock"))
            await self.coordinator.start()
        if self.config.health_listen is not None:
            host, port = parse_address(self.config.health_listen, "health_listen")
            self.health = HealthServer(self.liveness, host, port)
            self.health.start()
        if self.config.admin_listen is not None:
            await self._start_admin()
        for w in self.workers:
            await self._spawn(w)
        self.liveness.ready = all(w.ready for w in self.workers)
        print(
            f"gateway master {os.getpid()}: {len(self.workers)} workers on http://{self.config.listen}"
            + (f", health on http://{self.config.health_listen}/healthz" if self.config.health_listen else "")
            + (f", admin on http://{self.config.admin_listen}/metrics" if self.config.admin_listen else ""),
            flush=True,
        )
        from gateway.process.app import write_pid_file

        write_pid_file(self.config.pid_file)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload()))
        loop.add_signal_handler(signal.SIGUSR1, lambda: self._signal_workers(signal.SIGUSR1))  # logrotate
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        orphan.release_signals()  # one received during start runs its handler now
        supervisors = [loop.create_task(self._supervise(w)) for w in self.workers]
        await stop.wait()
        await self.shutdown()
        for t in supervisors:
            t.cancel()
        return 0

    async def shutdown(self) -> None:
        self.stopping = True
        self.liveness.draining = True
        self._signal_workers(signal.SIGTERM)
        deadline = self.config.drain_delay + self.config.drain_timeout + 5
        for w in self.workers:
            if w.proc is not None:
                try:
                    await asyncio.wait_for(exited(w.proc), deadline)
                except TimeoutError:
                    w.proc.kill()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(exited(w.proc), 5)
        if self.runner is not None:
            await self.runner.cleanup()
        if self.coordinator is not None:
            await self.coordinator.close()
        if self.session is not None:
            await self.session.close()
        if self.health is not None:
            self.health.stop()
        self.liveness.stop()

    async def _spawn(self, w: Worker) -> None:
        env = dict(os.environ)
        cmd = [
            sys.executable,
            "-m",
            "gateway",
            "worker",
            "--config",
            self.config_path,
            "--index",
            str(w.index),
        ]
        if self.coordinator is not None:
            cmd += ["--coordinator", self.coordinator.path]
        w.ready = False
        # The worker reports readiness (and its private admin port) through a file, so its stdout
        # (access log, events) goes straight to ours without the master copying lines.
        ready_file = Path(self.tmp) / f"worker-{w.index}.ready"
        ready_file.unlink(missing_ok=True)
        env["GATEWAY_READY_FILE"] = str(ready_file)
        env["GATEWAY_MASTER_PID"] = str(os.getpid())
        # Started held (gateway.process.orphan): a HUP forwarded, or sent to the process group, while it
        # starts is a reload once it has started, not its death. Popen, not the loop's subprocess
        # API: libuv empties the child's signal mask and resets every handler before exec.
        with orphan.signals_held():
            w.proc = subprocess.Popen(cmd, env=env)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while loop.time() < deadline and w.proc.poll() is None:
            try:
                text = ready_file.read_text()
            except OSError:
                text = ""
            if text.startswith(READY) and text.endswith("\n"):
                w.admin_port = int(text.split()[1])
                w.ready = True
                break
            await asyncio.sleep(0.05)

    async def _supervise(self, w: Worker) -> None:
        while not self.stopping:
            proc = w.proc
            if proc is None:
                return
            code = await exited(proc)
            if self.stopping:
                return
            w.restarts += 1
            w.ready = False
            self.liveness.ready = False
            log.event("worker_died", worker=w.index, code=code, restarts=w.restarts)
            await asyncio.sleep(min(5.0, 0.1 * w.restarts))  # never a tight crash loop
            if self.stopping:
                return
            await self._spawn(w)
            self.liveness.ready = all(x.ready for x in self.workers)

    def _signal_workers(self, sig: signal.Signals) -> None:
        for w in self.workers:
            if w.proc is not None:
                w.proc.send_signal(sig)  # skips a worker already reaped

    async def reload(self) -> tuple[bool, list[str]]:
        try:
            config = load_file(self.config_path)
        except ConfigError as e:
            self.reload_failures += 1
            log.event("reload_failed", errors=e.errors)
            return False, e.errors
        self.config = config
        if self.coordinator is not None:
            self.coordinator.load(config)
        self._signal_workers(signal.SIGHUP)  # one still starting holds it until started
        self.reloads += 1
        log.event("reloaded", path=self.config_path, workers=len(self.workers))
        return True, []

    # ---- admin: merged metrics, forwarded writes ----------------------------------------------------
    async def _start_admin(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/admin/reload", self._reload)
        app.router.add_route("*", "/admin/{tail:.*}", self._forward)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self.runner.setup()
        assert self.config.admin_listen is not None
        host, port = parse_address(self.config.admin_listen, "admin_listen")
        site = web.TCPSite(self.runner, host, port, reuse_address=True)
        await site.start()

    async def _snapshots(self) -> list[dict[str, Any]]:
        assert self.session is not None
        snaps: list[dict[str, Any]] = []
        for w in self.workers:
            if not w.ready:
                continue
            try:
                async with self.session.get(
                    f"http://127.0.0.1:{w.admin_port}/admin/_snapshot", timeout=aiohttp.ClientTimeout(total=2)
                ) as r:
                    snaps.append(orjson.loads(await r.read()))
            except (aiohttp.ClientError, TimeoutError, ValueError):
                continue
        return snaps

    async def _metrics(self, request: web.Request) -> web.Response:
        snaps = await self._snapshots()
        snaps.append(
            {
                "version": metrics.SNAPSHOT_VERSION,
                "worker": "master",
                "families": [f.to_dict() for f in self._master_families()],
            }
        )
        body, content_type = metrics.render(snaps, request.headers.get("Accept"))
        return web.Response(body=body, headers={"Content-Type": content_type})

    def _master_families(self) -> list[metrics.Family]:
        restarts = metrics.Family(
            "gateway_worker_restarts_total",
            "counter",
            "Worker processes restarted by the master.",
            ("worker",),
            "sum",
        )
        for w in self.workers:
            restarts.add((str(w.index),), float(w.restarts))
        workers = metrics.Family("gateway_workers", "gauge", "Worker processes ready.", (), "sum")
        workers.add((), float(sum(w.ready for w in self.workers)))
        reloads = metrics.Family(
            "gateway_master_reloads_total", "counter", "Reloads handled by the master.", ("result",), "sum"
        )
        reloads.add(("ok",), float(self.reloads))
        reloads.add(("failed",), float(self.reload_failures))
        return [restarts, workers, reloads]

    async def _reload(self, _: web.Request) -> web.Response:
        ok, errors = await self.reload()
        return web.json_response({"ok": ok, "errors": errors}, status=200 if ok else 400)

    async def _forward(self, request: web.Request) -> web.Response:
        """GETs answer from worker 0; writes go to every worker (the answer is worker 0's)."""
        assert self.session is not None
        body = await request.read()
        targets = [w for w in self.workers if w.ready]
        if request.method in ("GET", "HEAD"):
            targets = targets[:1]
        first: web.Response | None = None
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() in ("authorization", "content-type", "accept")
        }
        for w in targets:
            url = f"http://127.0.0.1:{w.admin_port}{request.rel_url}"
            try:
                async with self.session.request(request.method, url, data=body, headers=headers) as r:
                    payload = await r.read()
                    if first is None:
                        first = web.Response(body=payload, status=r.status, content_type=r.content_type)
            except aiohttp.ClientError:
                continue
        return first or web.json_response({"error": "no worker answered"}, status=503)


async def exited(proc: subprocess.Popen[bytes]) -> int:
    """Wait for `proc` to exit, without a thread: its pidfd turns readable then (Linux 5.3+);
    elsewhere poll. Only this loop reaps it, so its pid cannot be reused before the pidfd opens."""
    if proc.poll() is not None:
        return proc.returncode
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        while proc.poll() is None:
            await asyncio.sleep(0.1)
        return proc.returncode
    loop = asyncio.get_running_loop()
    try:
        done: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not done.done():
                done.set_result(None)

        loop.add_reader(fd, readable)
        try:
            await done
        finally:
            loop.remove_reader(fd)
    finally:
        os.close(fd)
    return proc.wait()


async def run_master(config: Config, config_path: str) -> int:
    master = Master(config, config_path, worker_count(config.workers))
    try:
        return await master.run()
    finally:
        with contextlib.suppress(OSError):
            for p in Path(master.tmp).iterdir():
                p.unlink()
            Path(master.tmp).rmdir()


async def run_worker(config: Config, config_path: str, index: int, coordinator: str | None) -> int:
    from gateway.process.app import App, WorkerRole, tune_gc

    app = App(config, config_path)
    app.worker = WorkerRole(index, coordinator)
    await app.start()
    tune_gc()
    master = int(os.environ.get("GATEWAY_MASTER_PID", "0"))
    if master:
        _background.add(asyncio.get_running_loop().create_task(stop_when_orphaned(master)))
    admin = app.admin
    port = admin.port if admin is not None else 0
    ready_file = os.environ.get("GATEWAY_READY_FILE")
    if ready_file:
        tmp = ready_file + ".tmp"
        Path(tmp).write_text(f"{READY} {port}\n")
        os.replace(tmp, ready_file)
    await app.serve_forever()
    return 0


_background: set[asyncio.Task[None]] = set()  # tasks kept referenced for the worker's lifetime


async def stop_when_orphaned(master: int, interval_s: float = 1.0) -> None:
    """A worker whose master is gone drains and exits, as on SIGTERM.

    Why: beside the workers of the next master (SO_REUSEPORT shares the port) it would serve a
    stale configuration. The kernel's parent-death signal ends it at once on Linux; polling the
    parent pid is the portable fallback (and covers a master that died before the signal was armed).
    """
    orphan.signal_on_parent_death(signal.SIGTERM)
    await orphan.until_orphaned(master, interval_s)
    os.kill(os.getpid(), signal.SIGTERM)
