"""A signal sent the instant the gateway's first port accepts is handled, never fatal.

Config-management tools reload right after a start and logrotate signals at any time; the ports
accept before the gateway has finished starting. Each case starts the real CLI, polls its first
port as fast as it can and signals at the first accepted connection (to the gateway, to its
process group, or to the health process), then checks: HUP and USR1 leave every process alive
and serving (HUP as a reload once started), TERM and INT end it cleanly with exit code 0.
Every loop is bounded in count and time; every process group is killed at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from tests.helpers import ROOT, Backend, free_port, gateway_command, wait_for

HANDLED = (signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

CONFIG = """\
listen: 127.0.0.1:{proxy}
health_listen: 127.0.0.1:{health}
admin_listen: 127.0.0.1:{admin}
drain_timeout: 2s
workers: {workers}
upstreams:
  api:
    targets: [{{address: {backend}}}]
routes:
  - name: api
    match: {{path_prefix: /}}
    upstream: api
"""


class Gateway:
    """`gateway run` in its own session (so its process group can be signalled and killed)."""

    def __init__(self, tmp: Path, backend: Backend, workers: int) -> None:
        self.proxy, self.health, self.admin = free_port(), free_port(), free_port()
        self.cfg = tmp / "gw.yaml"
        self.cfg.write_text(
            CONFIG.format(
                proxy=self.proxy,
                health=self.health,
                admin=self.admin,
                workers=workers,
                backend=backend.address,
            )
        )
        self.out, self.err = tmp / "out.log", tmp / "err.log"
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.proc = subprocess.Popen(
                gateway_command("run", "--config", str(self.cfg)),
                cwd=ROOT,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def why(self) -> str:
        return f"exit code {self.proc.poll()}, stderr:\n{self.stderr()[-3000:]}"

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # the gateway, its workers and helpers
        self.proc.wait(10)


def signal_at_first_accept(gw: Gateway, port: int, send: Callable[[], None], timeout: float = 30.0) -> None:
    """Connect to `port` in a tight loop; call `send` the moment a connection is accepted."""
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as s:
            try:
                s.connect(("127.0.0.1", port))
            except ConnectionRefusedError:
                assert gw.proc.poll() is None, f"the gateway exited before accepting: {gw.why()}"
                assert time.monotonic() < deadline, "the port never accepted"
                continue
            send()
            return


def children(pid: int) -> list[int]:
    try:
        out = Path(f"/proc/{pid}/task/{pid}/children").read_text()  # fast enough for a tight loop
    except FileNotFoundError:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    except OSError:
        return []
    return [int(p) for p in out.split()]


def signal_at_children(
    gw: Gateway, want: Callable[[set[int]], bool], send: Callable[[], None], timeout: float = 30.0
) -> None:
    """Poll the gateway's child processes in a tight loop; call `send` the moment `want` them."""
    deadline = time.monotonic() + timeout
    while not want(set(children(gw.proc.pid))):
        assert gw.proc.poll() is None, f"the gateway exited: {gw.why()}"
        assert time.monotonic() < deadline, "no new child process"
    send()


def health_child(pid: int) -> int | None:
    """The health process of a single-process gateway (not multiprocessing's resource tracker)."""
    for child in children(pid):
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            if b"multiprocessing.spawn" in cmdline or b"spawn_main" in cmdline:
                return child
    return None


def signal_state(pid: int) -> tuple[bool, set[int]]:
    """(running, the handled signals still blocked or pending in `pid`'s main thread)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False, set()
    fields = dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)
    if fields.get("State", "Z").startswith(("Z", "X")):
        return False, set()
    bits = 0
    for name in ("SigBlk", "SigPnd", "ShdPnd"):
        bits |= int(fields[name], 16)
    return True, {int(s) for s in HANDLED if bits & (1 << (s - 1))}


async def settled(pid: int, what: str, gw: Gateway) -> None:
    """`pid` runs, with every handled signal unblocked and none left pending (all were handled)."""
    try:
        await wait_for(lambda: signal_state(pid) == (True, set()), timeout=20)
    except AssertionError:
        raise AssertionError(f"{what} {pid}: {signal_state(pid)}; {gw.why()}") from None


async def serves(gw: Gateway, health: bool = True) -> None:
    """The proxy answers 200 through the backend and (if `health`) /readyz is 200."""
    deadline = time.monotonic() + 20
    async with aiohttp.ClientSession() as s:
        while True:
            try:
                async with s.get(f"http://127.0.0.1:{gw.proxy}/x", headers={"Connection": "close"}) as r:
                    proxied = r.status
                ready = 200
                if health:
                    async with s.get(f"http://127.0.0.1:{gw.health}/readyz") as r:
                        ready = r.status
                if proxied == ready == 200:
                    return
            except aiohttp.ClientError:
                pass
            assert gw.proc.poll() is None, f"the gateway died: {gw.why()}"
            assert time.monotonic() < deadline, f"not serving: {gw.why()}"
            await asyncio.sleep(0.05)


async def stops_cleanly(gw: Gateway) -> None:
    gw.proc.send_signal(signal.SIGTERM)
    loop = asyncio.get_running_loop()
    rc = await loop.run_in_executor(None, gw.proc.wait, 20)
    assert rc == 0, gw.why()


async def accept_then(gw: Gateway, port: int, send: Callable[[], None]) -> None:
    await asyncio.get_running_loop().run_in_executor(None, signal_at_first_accept, gw, port, send)


# ---- a single process (with its health process) --------------------------------------------------
SINGLE = [("HUP", "gateway", 6), ("USR1", "gateway", 2), ("TERM", "gateway", 4), ("INT", "gateway", 2)]
SINGLE += [("HUP", "group", 2), ("USR1", "group", 2)]


@pytest.mark.parametrize(("name", "target", "rounds"), SINGLE, ids=[f"{n}-{t}" for n, t, _ in SINGLE])
async def test_single_process(name: str, target: str, rounds: int, tmp_path: Path, backend: Backend) -> None:
    """Signal the gateway (or its whole process group) when its proxy port first accepts."""
    sig = signal.Signals[f"SIG{name}"]
    for i in range(rounds):
        home = tmp_path / str(i)
        home.mkdir()
        gw = Gateway(home, backend, 1)
        try:
            pid = gw.proc.pid
            kill = os.killpg if target == "group" else os.kill
            await accept_then(gw, gw.proxy, lambda: kill(pid, sig))  # noqa: B023 (called at once)
            if sig in (signal.SIGTERM, signal.SIGINT):
                rc = await asyncio.get_running_loop().run_in_executor(None, gw.proc.wait, 20)
                assert rc == 0, f"round {i}: {gw.why()}"
                assert "Traceback" not in gw.stderr()
                continue
            await serves(gw)
            await settled(pid, "the gateway", gw)
            if target == "group":
                child = health_child(pid)
                assert child is not None, "the health process died"
                await settled(child, "the health process", gw)
            if sig == signal.SIGHUP:  # handled as a reload, once started
                await wait_for(lambda: '"event":"reloaded"' in gw.stderr(), timeout=10)  # noqa: B023
            await stops_cleanly(gw)
        finally:
            gw.kill()


@pytest.mark.parametrize("name", ["HUP", "USR1", "TERM"])
async def test_health_process(name: str, tmp_path: Path, backend: Backend) -> None:
    """Signal the health process when the health port it answers first accepts."""
    sig = signal.Signals[f"SIG{name}"]
    for i in range(2):
        home = tmp_path / str(i)
        home.mkdir()
        gw = Gateway(home, backend, 1)
        try:
            signalled: list[int] = []

            def to_health(gw: Gateway = gw, signalled: list[int] = signalled) -> None:
                child = health_child(gw.proc.pid)
                assert child is not None, "no health process"
                os.kill(child, sig)
                signalled.append(child)

            await accept_then(gw, gw.health, to_health)
            (child,) = signalled
            if sig == signal.SIGTERM:
                # It ends (cleanly: no "Terminated"); the gateway keeps serving its proxy port.
                await wait_for(lambda child=child: not signal_state(child)[0], timeout=10)
                await serves(gw, health=False)
            else:
                await settled(child, "the health process", gw)
                await serves(gw)  # /readyz: answered by that same process
            await stops_cleanly(gw)
        finally:
            gw.kill()


# ---- workers: 2 (a master and two workers) ---------------------------------------------------------
WORKERS = [("HUP", "master"), ("TERM", "master"), ("HUP", "group"), ("USR1", "group")]
WORKERS += [("HUP", "spawned"), ("HUP", "respawned")]


def restarts(metrics: str) -> float:
    lines = [line for line in metrics.splitlines() if line.startswith("gateway_worker_restarts_total{")]
    assert len(lines) == 2, metrics
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


@pytest.mark.parametrize(("name", "target"), WORKERS, ids=[f"{n}-{t}" for n, t in WORKERS])
async def test_workers(name: str, target: str, tmp_path: Path, backend: Backend) -> None:
    """Signal the master when its first port accepts, or its process group when the first worker
    accepts, when the second worker has just been spawned, or when a killed one is respawned."""
    sig = signal.Signals[f"SIG{name}"]
    gw = Gateway(tmp_path, backend, 2)
    loop = asyncio.get_running_loop()
    killed = 0
    try:
        pid = gw.proc.pid

        def to_group() -> None:
            os.killpg(pid, sig)

        if target == "master":
            # The master's health port accepts first, before any worker is spawned.
            await accept_then(gw, gw.health, lambda: os.kill(pid, sig))
        elif target == "group":
            await accept_then(gw, gw.proxy, to_group)
        elif target == "spawned":  # the second worker has just been exec'd
            await loop.run_in_executor(None, signal_at_children, gw, lambda kids: len(kids) == 2, to_group)
        else:  # its replacement has just been exec'd
            await serves(gw)
            before = set(children(pid))
            os.kill(min(before), signal.SIGKILL)
            killed = 1
            await loop.run_in_executor(
                None, signal_at_children, gw, lambda kids: bool(kids - before), to_group
            )
        if sig == signal.SIGTERM:
            rc = await loop.run_in_executor(None, gw.proc.wait, 60)
            assert rc == 0, gw.why()
            return
        await serves(gw)
        await settled(pid, "the master", gw)
        workers = children(pid)
        assert len(workers) == 2, workers
        for w in workers:
            await settled(w, "a worker", gw)
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{gw.admin}/metrics") as r:
            assert restarts(await r.text()) == killed  # no worker died of the signal
        if sig == signal.SIGHUP:
            await wait_for(lambda: '"event":"reloaded"' in gw.stderr(), timeout=10)
        await stops_cleanly(gw)
    finally:
        gw.kill()
