"""scripts/_venv.sh: `make_venv` reinstalls only when the install is not current.

Why: the install compiles the data plane (about a minute) and upgrades pip over the network, so a
second `scripts/run` used to take a minute and fail offline. The shell logic runs for real here;
only the interpreter in `.venv` is a stand-in that records how it was called (the real install is
what CI's fresh clone does).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT

FAKE_PYTHON = """#!/bin/sh
# Records each call; `-m pip install -e ...` fails when FAIL_INSTALL is set.
echo "$*" >> "$(dirname "$0")/../calls.log"
case "$*" in
  *"install -q -e"*) [ -z "${FAIL_INSTALL:-}" ] || exit 1 ;;
esac
exit 0
"""


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "_venv.sh", tmp_path / "scripts" / "_venv.sh")
    (tmp_path / "gateway").mkdir()
    (tmp_path / "gateway" / "server.py").write_text("x = 1\n")
    (tmp_path / "setup.py").write_text("")
    (tmp_path / "pyproject.toml").write_text("")
    venv_bin = tmp_path / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    python = venv_bin / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    tools = tmp_path / "tools"  # a C compiler is "present": no apt-get from a test
    tools.mkdir()
    (tools / "cc").write_text("#!/bin/sh\nexit 0\n")
    (tools / "cc").chmod(0o755)
    # Sources older than anything the install writes, as after a checkout.
    old = time.time() - 100
    for f in ("gateway/server.py", "setup.py", "pyproject.toml"):
        os.utime(tmp_path / f, (old, old))
    return tmp_path


def make_venv(tree: Path, extras: str = "", **env: str) -> tuple[int, str, list[str]]:
    """Run `make_venv EXTRAS` in `tree`; (exit status, output, pip installs made by this call)."""
    log = tree / ".venv" / "calls.log"
    before = log.read_text().splitlines() if log.exists() else []
    environ = {k: v for k, v in os.environ.items() if k != "GATEWAY_PURE"}
    environ["PATH"] = f"{tree / 'tools'}:{environ['PATH']}"
    environ.update(env)
    proc = subprocess.run(
        ["bash", "-c", f'source scripts/_venv.sh; make_venv "{extras}"'],
        cwd=tree,
        env=environ,
        capture_output=True,
        text=True,
        timeout=30,
    )
    after = log.read_text().splitlines() if log.exists() else []
    installs = [c for c in after[len(before) :] if "install -q -e" in c]
    return proc.returncode, proc.stdout + proc.stderr, installs


def test_a_current_install_is_not_redone(tree: Path) -> None:
    rc, _, installs = make_venv(tree)
    assert rc == 0 and installs == ["-m pip install -q -e ."]
    rc, out, installs = make_venv(tree)
    assert rc == 0 and installs == [] and "up to date" in out


def test_test_extras_cover_a_plain_install_but_not_the_reverse(tree: Path) -> None:
    make_venv(tree)
    _, _, installs = make_venv(tree, "[test]")
    assert installs == ["-m pip install -q -e .[test]"]
    _, _, installs = make_venv(tree, "")
    assert installs == []  # the [test] install holds everything `scripts/run` needs


def test_an_edited_source_or_project_file_reinstalls(tree: Path) -> None:
    make_venv(tree)
    for name in ("gateway/server.py", "pyproject.toml"):
        future = time.time() + 100
        os.utime(tree / name, (future, future))
        _, _, installs = make_venv(tree)
        assert installs == ["-m pip install -q -e ."], name


def test_another_build_mode_reinstalls(tree: Path) -> None:
    make_venv(tree)
    _, _, installs = make_venv(tree, GATEWAY_PURE="1")
    assert installs == ["-m pip install -q -e ."]
    _, _, installs = make_venv(tree)
    assert installs == ["-m pip install -q -e ."]  # back to compiled


def test_a_failed_install_is_retried_next_time(tree: Path) -> None:
    make_venv(tree)
    future = time.time() + 100
    os.utime(tree / "gateway" / "server.py", (future, future))
    rc, _, installs = make_venv(tree, FAIL_INSTALL="1")
    assert rc != 0 and installs
    rc, _, installs = make_venv(tree)
    assert rc == 0 and installs == ["-m pip install -q -e ."]
