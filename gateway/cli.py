"""Command line: `gateway run | check | reload` (also `python -m gateway ...`)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import urllib.error
import urllib.request

from gateway.config.model import Config
from gateway.config.parse import load_file
from gateway.config.schema import ConfigError
from gateway.process import orphan

DEFAULT_CONFIG = "config/gateway.yaml"


def _load(path: str, refusal: str | None) -> Config | None:
    """The validated config, or None after printing every error (and `refusal`, if given)."""
    try:
        return load_file(path)
    except ConfigError as e:
        for line in e.errors:
            print(line, file=sys.stderr)
        if refusal:
            print(refusal, file=sys.stderr)
        return None


def cmd_check(args: argparse.Namespace) -> int:
    if _load(args.config, "configuration invalid") is None:
        return 1
    print(f"{args.config}: configuration OK")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    orphan.hold_signals()  # before any socket or thread, until the handlers exist (gateway.process.orphan)
    config = _load(args.config, "configuration invalid: not starting")
    if config is None:
        return 1
    import uvloop

    from gateway.process.app import run
    from gateway.process.workers import run_master, worker_count

    if worker_count(config.workers) > 1:
        return uvloop.run(run_master(config, args.config))
    return uvloop.run(run(config, args.config))


def cmd_worker(args: argparse.Namespace) -> int:
    """One of `workers: N` (started by the master, not by hand)."""
    orphan.hold_signals()  # already held if the master spawned it; by hand, from here on
    config = _load(args.config, None)
    if config is None:
        return 1
    import uvloop

    from gateway.process.workers import run_worker

    return uvloop.run(run_worker(config, args.config, args.index, args.coordinator))


def cmd_reload(args: argparse.Namespace) -> int:
    """Ask the running gateway to reload: SIGHUP via `pid_file`, else POST /admin/reload."""
    config = _load(args.config, "configuration invalid: not reloading")
    if config is None:
        return 1
    if config.pid_file:
        try:
            pid = int(open(config.pid_file).read().strip())  # noqa: SIM115
            os.kill(pid, signal.SIGHUP)
        except (OSError, ValueError) as e:
            print(f"cannot signal the gateway via {config.pid_file}: {e}", file=sys.stderr)
            return 1
        print(f"sent SIGHUP to {pid}")
        return 0
    if config.admin_listen is None:
        print("set pid_file or admin_listen so `gateway reload` can reach the gateway", file=sys.stderr)
        return 1
    host, _, port = config.admin_listen.rpartition(":")
    host = "127.0.0.1" if host in ("0.0.0.0", "") else host.strip("[]")
    req = urllib.request.Request(f"http://{host}:{port}/admin/reload", method="POST", data=b"")
    token = config.admin_token or os.environ.get("GATEWAY_ADMIN_TOKEN")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            print(resp.read().decode().strip())
            return 0
    except urllib.error.HTTPError as e:
        print(e.read().decode().strip(), file=sys.stderr)
        return 1
    except OSError as e:
        print(f"cannot reach the admin API at {host}:{port}: {e}", file=sys.stderr)
        return 1


def version() -> str:
    """The installed package's version (its metadata), else the source tree's `__version__`."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("gateway")
    except PackageNotFoundError:
        from gateway import __version__

        return __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gateway", description="reverse-proxy load-shedding gateway")
    parser.add_argument("--version", action="version", version=f"gateway {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, text in (
        ("run", cmd_run, "run the gateway"),
        ("check", cmd_check, "validate the configuration (like nginx -t)"),
        ("reload", cmd_reload, "make the running gateway re-read its configuration"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", "-c", default=DEFAULT_CONFIG, help=f"YAML file (default {DEFAULT_CONFIG})")
        p.set_defaults(fn=fn)
    p = sub.add_parser("worker", help=argparse.SUPPRESS)
    p.add_argument("--config", "-c", default=DEFAULT_CONFIG)
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--coordinator", default=None)
    p.set_defaults(fn=cmd_worker)
    args = parser.parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
