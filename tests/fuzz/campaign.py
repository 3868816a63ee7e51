"""Long fuzz campaign against the proxy socket, outside CI (not collected by pytest: no `test_` prefix).

    python -m tests.fuzz.campaign --examples 100000                  # atheris when installed
    python -m tests.fuzz.campaign --engine hypothesis --examples 20000 --minutes 30
    python -m tests.fuzz.campaign --engine hypothesis --examples 2000 --out /tmp/fuzz.json

Same harness (tests/helpers.py) and properties as tests/fuzz/test_fuzz_requests.py (a real gateway
in front of the byte-recording backend, one example = one client connection, then a canary request):

- atheris: coverage-guided (libFuzzer) over the gateway's Python code, seeded with the valid requests
  of SEEDS. An input is `n_cuts (1 B) + cut positions (2 B each) + the client's bytes`. A failing
  property raises, atheris stops and saves the input as crash-<sha1> in the working directory.
- hypothesis: the same mutation strategy as the CI test, in batches of 1000 examples with successive
  seeds until --examples or --minutes is reached; a failure is shrunk and printed.

A JSON summary (examples, requests forwarded, statuses, duration) goes to --out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _summary(engine: str, harness: Any, started: float, failure: str | None) -> dict[str, Any]:
    return {
        "engine": engine,
        "examples": harness.examples,
        "requests_forwarded": harness.forwarded,
        "final_statuses": {str(k): v for k, v in sorted(harness.statuses.items())},
        "duration_s": round(time.monotonic() - started, 1),
        "failure": failure,
    }


def _write(out: str | None, summary: dict[str, Any], echo: bool = True) -> None:
    text = json.dumps(summary, indent=2)
    if echo:
        print(text, flush=True)
    if out:
        Path(out).write_text(text + "\n", encoding="utf-8")


def split_input(data: bytes) -> list[bytes]:
    """atheris input → the reads the client makes: 1 B cut count, 2 B per cut, then the payload."""
    if not data:
        return [b""]
    n = data[0] % 3
    header, payload = data[1 : 1 + 2 * n], data[1 + 2 * n :]
    cuts = sorted(int.from_bytes(header[i : i + 2], "big") % (len(payload) + 1) for i in range(0, 2 * n, 2))
    bounds = [0, *cuts, len(payload)]
    return [payload[a:b] for a, b in itertools.pairwise(bounds) if b > a] or [b""]


def run_atheris(args: argparse.Namespace) -> None:
    import atheris

    with atheris.instrument_imports(include=["gateway"]):
        from tests.helpers import SEEDS, FuzzHarness

    harness = FuzzHarness().__enter__()
    started = time.monotonic()
    deadline = started + args.minutes * 60 if args.minutes else None

    def one(data: bytes) -> None:
        try:
            harness.run(split_input(data))
        except AssertionError as e:
            _write(args.out, _summary("atheris", harness, started, f"{e!r} for input {data[:300]!r}"))
            raise  # atheris reports it and saves the input
        n = harness.examples
        done = n >= args.examples or (deadline is not None and time.monotonic() > deadline)
        if done or n % 1000 == 0:
            _write(args.out, _summary("atheris", harness, started, None), echo=done)
        if done:
            os._exit(0)  # libFuzzer would not run Python's exit handlers

    corpus = Path(tempfile.mkdtemp(prefix="gateway-fuzz-corpus-"))
    for i, seed in enumerate(SEEDS):
        (corpus / f"seed-{i}").write_bytes(b"\x00" + seed)
    atheris.Setup(
        [
            sys.argv[0],
            f"-runs={args.examples + len(SEEDS)}",
            f"-seed={args.seed}",
            "-max_len=4096",
            str(corpus),
        ],
        one,
    )
    atheris.Fuzz()


def run_hypothesis(args: argparse.Namespace) -> None:
    from hypothesis import HealthCheck, given, seed, settings

    from tests.helpers import FuzzHarness, mutated_requests

    started = time.monotonic()
    failure = None
    with FuzzHarness() as harness:
        batch = 1000
        for i in range((args.examples + batch - 1) // batch):  # bounded by --examples
            if args.minutes and time.monotonic() - started > args.minutes * 60:
                break
            n = min(batch, args.examples - i * batch)

            @seed(args.seed * 1_000_003 + i)
            @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            @given(segments=mutated_requests())
            def one(segments: list[bytes]) -> None:
                harness.run(segments)

            try:
                one()
            except AssertionError as e:  # hypothesis re-raises the shrunk failure
                failure = repr(e)[:2000]
                break
            print(f"batch {i + 1}: {harness.examples} examples so far", file=sys.stderr)
        summary = _summary("hypothesis", harness, started, failure)
    _write(args.out, summary)
    if failure:
        raise SystemExit(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=100_000, help="inputs to run (default 100000)")
    p.add_argument("--engine", choices=["auto", "atheris", "hypothesis"], default="auto")
    p.add_argument("--minutes", type=float, default=0, help="stop after this long (0: no time limit)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", help="write the JSON summary here too")
    args = p.parse_args()
    if not 1 <= args.examples <= 10_000_000:
        p.error("--examples 1..10000000")
    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401
        except ImportError:
            engine = "hypothesis"
        else:
            engine = "atheris"
    if engine == "atheris":
        run_atheris(args)
    else:
        run_hypothesis(args)


if __name__ == "__main__":
    main()
