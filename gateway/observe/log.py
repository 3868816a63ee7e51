"""Structured JSON event log (state transitions, errors) to stderr; never used on success paths."""

from __future__ import annotations

import sys
import time
from typing import Any

import orjson


def event(name: str, **fields: Any) -> None:
    """One JSON line: `{"time": ..., "event": name, ...fields}`."""
    record = {"time": round(time.time(), 3), "event": name, **fields}
    sys.stderr.buffer.write(orjson.dumps(record, default=str) + b"\n")
    sys.stderr.flush()
