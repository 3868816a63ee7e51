"""The install compiles the data plane (setup.py, mypyc) wherever it can, and says which it runs."""

from __future__ import annotations

import importlib
import os
import shutil
import sysconfig
from pathlib import Path

import pytest

import gateway
from gateway import coordinator
from gateway.proxy import client, upstream


def test_data_plane_is_compiled_where_a_compiler_exists() -> None:
    if os.environ.get("GATEWAY_PURE") == "1":
        pytest.skip("installed pure on purpose (GATEWAY_PURE=1)")
    has_cc = shutil.which("cc") is not None
    has_headers = (Path(sysconfig.get_paths()["include"]) / "Python.h").exists()
    if not (has_cc and has_headers):
        pytest.skip("no C compiler or Python headers: the install is pure Python")
    assert gateway.compiled()
    for name in (
        "gateway.proxy.client",
        "gateway.proxy.upstream",
        "gateway.proxy.http",
        "gateway.coordinator",
        "gateway.cache",
        "gateway.ratelimit",
        "gateway.runtime",
        "gateway.stats",
        "gateway.upstreams",
        "gateway.policy.token_bucket",
        "gateway.policy.admission",
    ):
        module = importlib.import_module(name)
        assert not (module.__file__ or "").endswith(".py"), name


def test_protocols_are_plain_classes_the_loop_accepts() -> None:
    """Compiled classes cannot derive from asyncio.Protocol; the loop needs only the methods."""
    for cls in (
        client.ClientProtocol,
        upstream.UpstreamProtocol,
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
