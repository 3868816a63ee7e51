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

install_current() {
  # install_current EXTRAS : true when .venv already holds this checkout installed with EXTRAS (or
  # more) in the same build mode, and no source, setup.py or pyproject.toml changed since.
  local stamp=".venv/.gateway-install" have
  [ -f "$stamp" ] && [ -x .venv/bin/python ] || return 1
  have="$(cat "$stamp")"
  case "$have" in
    "pure=${GATEWAY_PURE:-0} extras=$1" | "pure=${GATEWAY_PURE:-0} extras=[test]") ;;
    *) return 1 ;;
  esac
  [ -z "$(find gateway setup.py pyproject.toml -newer "$stamp" \( -name '*.py' -o -name '*.toml' \) -print -quit)" ]
}

make_venv() {
  # make_venv EXTRAS : .venv with the project installed (editable), e.g. make_venv "" or "[test]".
  # Skipped when the install is current (install_current): a second `scripts/run` starts at once and
  # needs no network; an edited source, a changed pyproject.toml or another build mode reinstalls.
  if install_current "$1"; then
    echo "gateway in .venv is up to date (delete .venv/.gateway-install to force a reinstall)"
    return 0
  fi
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
  rm -f .venv/.gateway-install  # written back only once this install has succeeded
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
  echo "pure=${GATEWAY_PURE:-0} extras=$1" >.venv/.gateway-install
}
