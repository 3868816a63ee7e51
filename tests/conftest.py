"""Shared fixtures: uvloop for every async test, real aiohttp backends and in-process gateways on port 0.

The helpers they use live in tests/helpers.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import uvloop

import gateway
from tests.helpers import Backend, BackendFactory, GatewayFactory, gateway_app, started_servers


def stale_compiled_modules() -> list[str]:
    """Sources edited after their in-place compiled module was built (setup.py): the .so would be
    imported instead of the edited code, and the tests would pass or fail on old code."""
    root = Path(gateway.__file__).parent
    stale = []
    for so in root.rglob("*.so"):
        source = so.with_name(so.name.split(".", 1)[0] + ".py")
        if source.exists() and source.stat().st_mtime > so.stat().st_mtime:
            stale.append(str(source.relative_to(root.parent)))
    return stale


def pytest_configure(config: pytest.Config) -> None:
    stale = stale_compiled_modules()
    if stale:
        pytest.exit(
            f"compiled modules are older than their source ({', '.join(stale)}): rebuild with "
            "`.venv/bin/pip install -e .` (scripts/test does), or GATEWAY_PURE=1 for pure Python",
            returncode=2,
        )
    # The gateway runs on uvloop in production; the tests do too.
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


@pytest.fixture
async def backend_factory() -> AsyncIterator[BackendFactory]:
    """`await backend_factory(app=None, port=0, name="backend")`: a started `Backend`."""
    async with started_servers(Backend) as make:
        yield make


@pytest.fixture
async def backend(backend_factory: BackendFactory) -> Backend:
    return await backend_factory()


@pytest.fixture
async def gateway_factory() -> AsyncIterator[GatewayFactory]:
    """`await gateway_factory(yaml_text, path=None)`: a started in-process gateway (`gateway_app`)."""
    async with started_servers(gateway_app) as make:
        yield make
