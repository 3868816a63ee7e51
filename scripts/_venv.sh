# Shared by scripts/run and scripts/test: a project venv built from the system python3 (Debian 12's
# python3 is externally managed, so nothing is installed system-wide except Debian packages).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO="sudo"; fi

apt_install() {
  # apt_install PKG... : install the Debian packages that are missing (update once, quietly).
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
}

make_venv() {
  # make_venv EXTRAS : .venv with the project installed (editable), e.g. make_venv "" or "[test]".
  local py="${PYTHON:-python3}"
  if [ ! -x .venv/bin/python ]; then
    if ! "$py" -m venv .venv 2>/dev/null; then
      rm -rf .venv
      apt_install python3-venv
      "$py" -m venv .venv
    fi
  fi
  # The data plane is compiled with mypyc at install (setup.py): it needs a C compiler and Python.h.
  if ! command -v cc >/dev/null || ! .venv/bin/python -c \
      'import os, sysconfig, sys; sys.exit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))'; then
    apt_install gcc libc6-dev python3-dev
  fi
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  echo "installing gateway into .venv (the data plane is compiled: about a minute)"
  local log
  log="$(mktemp)"
  if ! .venv/bin/python -m pip install -q -e ".$1" >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    return 1
  fi
  grep -h "^gateway:" "$log" >&2 || true  # setup.py's own notes (e.g. a pure-Python install)
  rm -f "$log"
}
