"""A tiny demo backend for the out-of-the-box run: `python -m gateway.demo --port 9001`."""

from __future__ import annotations

import argparse
import os

from aiohttp import web


async def hello(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "hello": "from the demo backend",
            "pid": os.getpid(),
            "path": request.path_qs,
            "x_forwarded_for": request.headers.get("X-Forwarded-For"),
        }
    )


async def health(_: web.Request) -> web.Response:
    return web.Response(text="ok\n")


def main() -> None:
    parser = argparse.ArgumentParser(description="demo backend")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001)
    args = parser.parse_args()
    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_route("*", "/{tail:.*}", hello)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
