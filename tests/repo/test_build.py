"""The install compiles the data plane (setup.py, mypyc) wherever it can, and says which it runs."""

from __future__ import annotations

import importlib
import os
import shutil
import sysconfig
from pathlib import Path

import pytest

import gateway
from gateway.client import connection
from gateway.cluster import upstream_connection
from gateway.ratelimit import coordinator


def test_data_plane_is_compiled_where_a_compiler_exists() -> None:
    if os.environ.get("GATEWAY_PURE") == "1":
        pytest.skip("installed pure on purpose (GATEWAY_PURE=1)")
    has_cc = shutil.which("cc") is not None
    has_headers = (Path(sysconfig.get_paths()["include"]) / "Python.h").exists()
    if not (has_cc and has_headers):
        pytest.skip("no C compiler or Python headers: the install is pure Python")
    assert gateway.compiled()
    for name in (
        "gateway.client.connection",
        "gateway.cluster.upstream_connection",
        "gateway.http1",
        "gateway.ratelimit.coordinator",
        "gateway.cache.store",
        "gateway.ratelimit.limiter",
        "gateway.pipeline.routing",
        "gateway.observe.stats",
        "gateway.cluster.pool",
        "gateway.policy.token_bucket",
        "gateway.policy.admission",
    ):
        module = importlib.import_module(name)
        assert not (module.__file__ or "").endswith(".py"), name


def test_protocols_are_plain_classes_the_loop_accepts() -> None:
    """Compiled classes cannot derive from asyncio.Protocol; the loop needs only the methods."""
    for cls in (
        connection.ClientProtocol,
        upstream_connection.UpstreamProtocol,
        coordinator._MasterConn,
        coordinator._WorkerConn,
    ):
        for method in (
            "connection_made",
            "data_received",
            "eof_received",
            "connection_lost",
            "pause_writing",
            "resume_writing",
        ):
            assert callable(getattr(cls, method)), (cls, method)
