"""Userland cost of one proxied request, without sockets: the data plane driven by fake transports.

`python -m loadtest.microbench [--profile] [--ratelimit] [--reject] [--cache-hit] [--browser]` feeds a
keep-alive GET to a ClientProtocol and the backend's answer to the pooled UpstreamProtocol, N
times, and prints microseconds per request (`--reject`: 429 answers, `--cache-hit`: cache hits).
Kernel time (the four syscalls per request) is not included: compare with `cpu_us_per_req`
measured under wrk to see how the two split.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import time

import uvloop

from gateway.client.connection import ClientProtocol
from gateway.client.listener import ProxyServer
from gateway.cluster.upstream_connection import UpstreamProtocol
from gateway.config.parse import load_text
from gateway.process.app import tune_gc

CONFIG = """
listen: 127.0.0.1:0
health_listen: null
admin_listen: null
client: {max_requests_per_connection: 1000000000}
upstreams:
  api:
    targets: [{address: 127.0.0.1:9}]
routes:
  - name: api
    match: {path_prefix: /}
    upstream: api
"""

LIMIT = "    rate_limit: {rate: 1000000000, burst: 1000000000, key: client_ip}\n"
REJECT = "    rate_limit: {rate: 1, per: 1h, burst: 1, key: client_ip}\n"  # the first passes, then 429s
CACHE = "    cache: {ttl: 1h}\n"  # the first request fills, then hits

REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
# What a browser sends (--browser): the header fields, not the URL, are most of a real request's parsing.
BROWSER = (
    b"GET /api/v1/items?page=2 HTTP/1.1\r\nHost: shop.example.com\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n"
    b"Accept: application/json, text/plain, */*\r\nAccept-Language: en-US,en;q=0.5\r\n"
    b"Accept-Encoding: gzip, deflate, br\r\nReferer: https://shop.example.com/cart\r\n"
    b"Cookie: session=6f1c2a9e3b; theme=dark\r\nSec-Fetch-Dest: empty\r\nSec-Fetch-Mode: cors\r\n"
    b"Sec-Fetch-Site: same-origin\r\nConnection: keep-alive\r\n\r\n"
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Wed, 25 Nov 2026 12:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 12\r\nConnection: keep-alive\r\n\r\nhello world\n"
)


class FakeTransport:
    """Accepts writes and counts bytes; enough of a transport for the protocols."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...
    def is_closing(self) -> bool:
        return False


async def run(n: int, profile: bool, extra: str = "", local: bool = False, request: bytes = REQUEST) -> float:
    """µs per request. `local`: answered by the gateway itself (429, cache hit) after the first."""
    loop = asyncio.get_running_loop()
    server = ProxyServer(load_text(CONFIG + extra))
    pool = server.runtime.pools["api"]
    target = pool.targets[0]
    up = UpstreamProtocol(target, loop)
    up.connection_made(FakeTransport())  # type: ignore[arg-type]
    target.idle.append(up)
    client = ClientProtocol(server.holder, loop, server.clients, server.runtime.config.client)
    transport = FakeTransport()
    client.connection_made(transport)  # type: ignore[arg-type]
    client.data_received(request)
    up.data_received(RESPONSE)
    ok0 = target.stats.responses.get(200, 0)  # target stats outlive a server (they carry over reloads)
    tune_gc()  # as `gateway run` does: the cyclic collector tuned out of the request path
    prof = cProfile.Profile() if profile else None
    for _ in range(1000):  # warm up
        client.data_received(request)
        if not local:
            up.data_received(RESPONSE)
    if prof is not None:
        prof.enable()
    written = transport.written
    t0 = time.perf_counter()
    for _ in range(n):
        client.data_received(request)
        if not local:
            up.data_received(RESPONSE)
    dt = time.perf_counter() - t0
    if prof is not None:
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    if local:
        assert target.stats.responses.get(200, 0) == ok0 and transport.written >= written + n * 20
    else:
        assert target.stats.responses.get(200, 0) >= ok0 + n
    return dt / n * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("-n", type=int, default=200_000)
    p.add_argument("--profile", action="store_true")
    p.add_argument(
        "--ratelimit", action="store_true", help="also measure a route with a limit that never triggers"
    )
    p.add_argument(
        "--reject", action="store_true", help="also measure 429 answers of a limit that always triggers"
    )
    p.add_argument("--cache-hit", action="store_true", help="also measure micro-cache hits")
    p.add_argument("--browser", action="store_true", help="also measure a browser's request (10 fields)")
    args = p.parse_args()
    us = uvloop.run(run(args.n, args.profile))
    print(f"{us:.2f} µs of Python per proxied request (no syscalls)")
    if args.ratelimit:
        limited = uvloop.run(run(args.n, False, LIMIT))
        print(f"{limited:.2f} µs with a client_ip rate limit that never triggers (+{limited - us:.2f} µs)")
    if args.reject:
        print(f"{uvloop.run(run(args.n, False, REJECT, local=True)):.2f} µs per 429 answer")
    if args.browser:
        print(f"{uvloop.run(run(args.n, False, request=BROWSER)):.2f} µs per proxied browser request")
    if args.cache_hit:
        print(f"{uvloop.run(run(args.n, False, CACHE, local=True)):.2f} µs per cache hit")


if __name__ == "__main__":
    main()
