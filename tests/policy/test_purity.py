"""Every module in gateway/policy/ imports only the standard library, and never asyncio or time.

Policies must stay pure: time comes from an injected clock, I/O and event loops live elsewhere.
The check walks the AST of each file, so imports inside functions or TYPE_CHECKING blocks count.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

POLICY_DIR = ROOT / "gateway" / "policy"
FORBIDDEN = frozenset({"asyncio", "aiohttp", "time"})
POLICY_FILES = sorted(POLICY_DIR.rglob("*.py"))


def _check_module(name: str, lineno: int, where: str) -> list[str]:
    root = name.split(".", 1)[0]
    if root in FORBIDDEN:
        return [f"{where}:{lineno}: imports forbidden module {name!r}"]
    if root not in sys.stdlib_module_names:
        return [f"{where}:{lineno}: imports non-stdlib module {name!r}"]
    return []


def import_violations(source: str, where: str = "<string>") -> list[str]:
    """Human-readable import violations in ``source``; empty when the module is pure."""
    problems: list[str] = []
    for node in ast.walk(ast.parse(source, filename=where)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                problems += _check_module(alias.name, node.lineno, where)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                problems += _check_module(node.module or "", node.lineno, where)
            elif node.level > 1:
                problems.append(f"{where}:{node.lineno}: relative import reaches outside gateway.policy")
            # level 1 imports a sibling policy module, which is checked on its own.
        elif isinstance(node, ast.Call):
            func = node.func
            name = getattr(func, "id", None) or getattr(func, "attr", "")
            if name in {"__import__", "import_module"}:
                problems.append(f"{where}:{node.lineno}: dynamic import via {name}()")
    return problems


def test_policy_modules_found() -> None:
    names = {p.name for p in POLICY_FILES}
    assert {"token_bucket.py", "balancer.py", "slow_start.py", "health.py", "outlier.py"} <= names


@pytest.mark.parametrize("path", POLICY_FILES, ids=lambda p: str(p.relative_to(POLICY_DIR)))
def test_policy_module_is_pure(path: Path) -> None:
    assert import_violations(path.read_text(encoding="utf-8"), str(path.relative_to(POLICY_DIR))) == []


@pytest.mark.parametrize(
    "source",
    [
        "import asyncio",
        "import time",
        "from time import monotonic",
        "import aiohttp.web",
        "from aiohttp import web",
        "import numpy as np",
        "import yaml",
        "from gateway.client import listener",
        "from ..client import listener",
        "def f():\n    import time\n    return time.monotonic()",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import asyncio",
        "m = __import__('time')",
        "import importlib\nm = importlib.import_module('time')",
    ],
)
def test_checker_flags_impure_source(source: str) -> None:
    assert import_violations(source)


def test_checker_accepts_stdlib_and_siblings() -> None:
    source = (
        "from __future__ import annotations\n"
        "import math, random\n"
        "import os.path\n"
        "from collections import OrderedDict\n"
        "from collections.abc import Callable, Sequence\n"
        "from . import balancer\n"
        "from .token_bucket import RateTable\n"
    )
    assert import_violations(source) == []
