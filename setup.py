"""Build hook: compile the data plane to C with mypyc when a C compiler and Python headers exist.

Why: the request path is plain typed Python (mypy-clean), and mypyc turns its classes into C structs
and its calls into C calls, which cuts its CPU per request by about 40% (`python -m
loadtest.microbench`). The same source runs uncompiled, with the same behaviour, when there is no
compiler or when GATEWAY_PURE=1 is set (e.g. while editing those modules: an in-place compiled
module would shadow the edited source until the next install).
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path

from setuptools import setup

# The modules every request runs through, and the state and policies they call into.
COMPILED = [
    "gateway/http1.py",
    "gateway/client/connection.py",
    "gateway/client/guards.py",
    "gateway/pipeline/exchange.py",
    "gateway/pipeline/routing.py",
    "gateway/pipeline/attempt.py",
    "gateway/pipeline/phases.py",
    "gateway/ratelimit/limiter.py",
    "gateway/ratelimit/admit.py",
    "gateway/ratelimit/coordinator.py",
    "gateway/cache/store.py",
    "gateway/cache/stage.py",
    "gateway/cluster/pool.py",
    "gateway/cluster/upstream_connection.py",
    "gateway/observe/stats.py",
    *sorted(str(p) for p in Path("gateway/policy").glob("[!_]*.py")),
]


def can_compile() -> bool:
    """A C compiler and Python.h: without both, installing pure Python beats failing the install."""
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    include = Path(sysconfig.get_paths()["include"]) / "Python.h"
    return shutil.which(cc) is not None and include.exists()


def pure(why: str) -> list[object]:
    print(f"gateway: {why}; installing the pure-Python data plane (slower)", file=sys.stderr)
    for old in Path("gateway").rglob("*.so"):  # an earlier in-place (editable) build would shadow it
        old.unlink()
    return []


def ext_modules() -> list[object]:
    if os.environ.get("GATEWAY_PURE") == "1":
        return pure("GATEWAY_PURE=1")
    if not can_compile():
        return pure("no C compiler or Python headers (Debian: apt-get install gcc python3-dev)")
    from mypyc.build import mypycify

    return list(mypycify(COMPILED, opt_level="3", group_name="gateway.dataplane"))


setup(ext_modules=ext_modules())
