#!/usr/bin/env bash
# Create .venv with Python 3.13 and install the locked dependencies and cpns itself.
# Sourced by scripts/demo and scripts/test; safe to run again (it skips what is done).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"

usable() {  # a Python 3.13 that really runs (a pyenv shim may exist and refuse)
  "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 13))' >/dev/null 2>&1
}

find_python() {
  local p
  for p in "${CPNS_PYTHON:-}" "$(command -v python3.13 || true)" /usr/local/bin/python3.13 \
           /usr/bin/python3.13; do
    [ -n "$p" ] && usable "$p" && { echo "$p"; return; }
  done
  if command -v pyenv >/dev/null 2>&1; then
    for p in "$(pyenv root)"/versions/3.13*/bin/python3.13; do
      usable "$p" && { echo "$p"; return; }
    done
  fi
  return 1
}

if [ ! -x "$venv/bin/python" ]; then
  py="$(find_python)" || {
    echo "cpns needs Python 3.13 (its ssl module has TLS-PSK). Install it, put python3.13" >&2
    echo "on PATH (or set CPNS_PYTHON=/path/to/python3.13) and run this again." >&2
    exit 2
  }
  echo "bootstrap: creating .venv with $py" >&2
  "$py" -m venv "$venv"
fi

stamp="$venv/.cpns-installed"
want="$(cat "$root/requirements/lock.txt" "$root/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "bootstrap: installing locked dependencies (requirements/lock.txt)" >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --require-hashes \
    -r "$root/requirements/lock.txt"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
    --no-build-isolation -e "$root"
  echo "$want" > "$stamp"
fi
