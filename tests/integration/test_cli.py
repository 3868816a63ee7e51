"""The command line as a subprocess: `check` and `run` (proxying, then SIGTERM → exit 0)."""

from __future__ import annotations

import asyncio
import functools
import signal
from pathlib import Path

import aiohttp

from tests.helpers import ROOT, Backend, free_port, gateway_cli, gateway_command, stop_process

VALID = """\
listen: 127.0.0.1:{port}
health_listen: {health}
admin_listen: null
drain_timeout: 2s
upstreams:
  api:
    targets:
      - address: {backend}
routes:
  - name: api
    match: {{path_prefix: /}}
    upstream: api
"""


gateway = functools.partial(gateway_cli, timeout=20.0)


def test_check_valid(tmp_path: Path) -> None:
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(VALID.format(port=8080, health="null", backend="127.0.0.1:9001"))
    p = gateway("check", "--config", str(cfg))
    assert p.returncode == 0, p.stderr
    assert "configuration OK" in p.stdout
    assert "Traceback" not in p.stdout + p.stderr


def test_check_invalid_names_file_line_key(tmp_path: Path) -> None:
    cfg = tmp_path / "broken.yaml"
    text = VALID.format(port=8080, health="null", backend="127.0.0.1:9001").replace(
        "    upstream: api", "    upstream: apii"
    )
    cfg.write_text(text)
    line = text.splitlines().index("    upstream: apii") + 1
    p = gateway("check", "-c", str(cfg))
    assert p.returncode != 0
    assert f"{cfg}:{line}: routes[0].upstream: unknown upstream 'apii'" in p.stderr
    assert "configuration OK" not in p.stdout
    assert "Traceback" not in p.stdout + p.stderr


def test_check_unknown_key_and_yaml_error(tmp_path: Path) -> None:
    cfg = tmp_path / "typo.yaml"
    cfg.write_text("listen: 127.0.0.1:8080\nclient:\n  header_read_timeot: 5s\n")
    p = gateway("check", "-c", str(cfg))
    assert p.returncode != 0
    assert f"{cfg}:3: client.header_read_timeot: unknown key" in p.stderr
    cfg.write_text("listen: 127.0.0.1:8080\nroutes: [\n")
    p = gateway("check", "-c", str(cfg))
    assert p.returncode != 0
    assert f"{cfg}:3: YAML syntax error" in p.stderr
    assert "Traceback" not in p.stderr


def test_check_missing_file(tmp_path: Path) -> None:
    p = gateway("check", "-c", str(tmp_path / "nope.yaml"))
    assert p.returncode != 0
    assert "nope.yaml" in p.stderr
    assert "Traceback" not in p.stderr


def test_run_invalid_config_does_not_start(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("listen: nowhere\n")
    p = gateway("run", "-c", str(cfg))
    assert p.returncode != 0
    assert f"{cfg}:1: listen:" in p.stderr


async def test_run_proxies_and_exits_0_on_sigterm(backend: Backend, tmp_path: Path) -> None:
    port, health = free_port(), free_port()
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(VALID.format(port=port, health=f"127.0.0.1:{health}", backend=backend.address))
    proc = await asyncio.create_subprocess_exec(
        *gateway_command("run", "--config", str(cfg)),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        try:
            banner = await asyncio.wait_for(proc.stdout.readline(), 15)
        except TimeoutError:
            raise AssertionError("the gateway did not report listening in time") from None
        assert f"gateway listening on http://127.0.0.1:{port}".encode() in banner, banner
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{port}/through/cli?x=1") as r:
                assert r.status == 200
                data = await r.json()
            assert data["path"] == "/through/cli?x=1"
            async with s.get(f"http://127.0.0.1:{health}/healthz") as r:
                assert r.status == 200
        assert len(backend.app["requests"]) == 1
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            rc, _, err = await stop_process(proc, signal.SIGTERM, 5)
        except TimeoutError:
            raise AssertionError("the gateway did not exit within 5 s of SIGTERM") from None
        assert rc == 0
        assert loop.time() - t0 < 5
        assert b"Traceback" not in err, err.decode(errors="replace")
    finally:
        if proc.returncode is None:
            await stop_process(proc, signal.SIGKILL, 10)


def test_version_prints_the_package_version() -> None:
    from gateway import __version__

    p = gateway("--version")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"gateway {__version__}"
    assert __version__ == "0.1.0"
