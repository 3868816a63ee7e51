"""Shared fixtures for policy tests: a manual monotonic clock."""

from __future__ import annotations

import pytest


class ManualClock:
    """A monotonic clock the test moves by hand: call it to read, ``advance`` to move it."""

    __slots__ = ("now",)

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, dt: float) -> None:
        if dt < 0:
            raise ValueError("a monotonic clock cannot go backwards")
        self.now += dt

    def __repr__(self) -> str:
        return f"ManualClock(now={self.now:g})"


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()
