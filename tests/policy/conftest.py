"""Shared fixtures for policy tests: a manual monotonic clock."""

from __future__ import annotations

import pytest

from tests.helpers import ManualClock


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()
