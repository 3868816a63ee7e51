"""User-space instructions per proxied request, counted by callgrind: a comparison free of noise.

Why: on a shared 2-core machine one throughput round of the same code varies by ±20% (see
`bench_throughput`'s per-round ratios), so req/s cannot show a 2% change without tens of rounds.
The instructions a proxy executes in user space per request, counted by valgrind's callgrind
over a fixed wrk load, repeat within about ±0.5% between runs. They are not time: nginx's C
retires more instructions per cycle than Python's object code, and the kernel's share (about
80% of a proxy's CPU here) is not counted. What they answer exactly is "what did this change do
to the user-space work of a request": the gateway against `--baseline REF` (the gateway built at
that commit), or against the bare forwarder (what our features cost).

Each target runs alone under `valgrind --tool=callgrind` against the 12-byte nginx backend: a
warm-up, counters zeroed (`callgrind_control -z`), `wrk -t1 -c50` for `--duration` seconds,
counters dumped; instructions over requests. Under valgrind a proxy runs about 50 times slower, so a few
seconds give tens of thousands of requests.

    python -m loadtest.instructions [--duration 5] [--baseline REF] [--no-nginx] [--json FILE]
"""

from __future__ import annotations

import argparse
import functools
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from loadtest import common
from loadtest.common import HOST, HarnessError, Proc

START_TIMEOUT = 180.0  # Python's start-up under valgrind takes tens of seconds


def valgrind_prefix(out_dir: Path) -> list[str]:
    return [
        common.which("valgrind"),
        "--tool=callgrind",
        f"--callgrind-out-file={out_dir}/callgrind.%p",
        "--dump-line=no",
    ]


def dumped_instructions(out_dir: Path, pid: int) -> int:
    """Instructions in the dump `callgrind_control -d` wrote (`callgrind.PID.1`)."""
    dump = out_dir / f"callgrind.{pid}.1"
    for line in dump.read_text(errors="replace").splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise HarnessError(f"no instruction total in {dump}")


def measure(
    name: str, start: Callable[[Path], Proc], port: int, tmp: Path, duration: float, script: str | None
) -> dict[str, Any]:
    out_dir = tmp / f"cg-{name.split()[0]}"
    out_dir.mkdir(parents=True, exist_ok=True)
    proc = start(out_dir)
    try:
        url = f"http://{HOST}:{port}/"
        common.run_wrk(url, 2, 50, script=script)  # warm-up: connections made, code paths and memos filled
        control = common.which("callgrind_control")
        subprocess.run([control, "-z", str(proc.pid)], capture_output=True, timeout=60, check=True)
        r = common.run_wrk(url, duration, 50, script=script)
        subprocess.run([control, "-d", str(proc.pid)], capture_output=True, timeout=60, check=True)
        deadline = time.monotonic() + 30
        while not (out_dir / f"callgrind.{proc.pid}.1").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        total = dumped_instructions(out_dir, proc.pid)
    finally:
        proc.stop()
    per = total / max(r.requests, 1)
    print(f"[{name}] {r.requests:,} requests, {per:,.0f} user instructions per request", file=sys.stderr)
    return {"target": name, "requests": r.requests, "instructions": total, "per_request": round(per)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    common.raise_nofile_limit()
    with tempfile.TemporaryDirectory(prefix="loadtest-instr-") as tmpname:
        tmp = Path(tmpname)
        bport = common.free_port()
        backend = common.start_nginx(
            "backend", common.render_nginx_backend(bport, tmp / "backend"), tmp / "backend", bport
        )
        results = []
        try:
            targets: list[tuple[str, Callable[[int, Path], Proc]]] = []
            if not args.no_nginx:

                def nginx(port: int, out: Path) -> Proc:
                    conf = common.render_nginx_proxy(port, bport, tmp / "nginx")
                    return common.start_nginx(
                        "nginx",
                        conf,
                        tmp / "nginx",
                        port,
                        START_TIMEOUT,
                        valgrind_prefix(out),
                        single_process=True,
                    )

                targets.append(("nginx (1 worker)", nginx))

            def floor(port: int, out: Path) -> Proc:
                return common.start_minimal_forwarder(
                    port, bport, tmp / "minimal", START_TIMEOUT, valgrind_prefix(out)
                )

            targets.append(("minimal forwarder (floor)", floor))

            def gateway(site: Path | None, label: str) -> Callable[[int, Path], Proc]:
                def start(port: int, out: Path) -> Proc:
                    cfg = common.render_gateway_config(port, [f"{HOST}:{bport}"])
                    return common.start_gateway(
                        cfg, tmp / label, label, START_TIMEOUT, site, valgrind_prefix(out)
                    )

                return start

            if args.baseline:
                site = common.build_baseline(args.baseline)
                targets.append((f"gateway @{args.baseline}", gateway(site, "baseline")))
            targets.append(("gateway", gateway(None, "gateway")))
            for name, start in targets:
                port = common.free_port()
                results.append(
                    measure(
                        name,
                        functools.partial(start, port),
                        port,
                        tmp,
                        args.duration,
                        common.wrk_script(args.vary_heads),
                    )
                )
        finally:
            backend.stop()
    ref = next((r for r in results if r["target"].startswith("nginx")), None)
    for r in results:
        if ref is not None:
            r["ratio_to_nginx"] = round(r["per_request"] / ref["per_request"], 3)
    return {"meta": common.run_meta(args), "results": results}


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| target | requests counted | user instructions per request | ratio to nginx |",
        "|---|---:|---:|---:|",
    ]
    for r in results:
        ratio = f"{r['ratio_to_nginx']:.2f}" if "ratio_to_nginx" in r else "-"
        lines.append(f"| {r['target']} | {r['requests']:,} | {r['per_request']:,} | {ratio} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.instructions", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=5.0, help="wrk seconds counted per target (default 5)")
    p.add_argument("--baseline", metavar="REF", help="also count the gateway built at git REF")
    p.add_argument("--no-nginx", action="store_true", help="skip nginx (only the gateway and the floor)")
    p.add_argument(
        "--vary-heads",
        action="store_true",
        help="every request carries a changing field (loadtest/vary_heads.lua): no head repeats",
    )
    p.add_argument("--json", metavar="FILE", help="save results and metadata as JSON")
    a = p.parse_args(argv)
    if not 1 <= a.duration <= 60:
        p.error("duration 1..60 s")
    out = run(a)
    print("\n" + table(out["results"]))
    if a.json:
        common.save_json(out, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
