#!/usr/bin/env bash
# Installs the third-party packages the interoperability tests run, into this
# directory only: node_modules/ (npm) and .venv/ (pip). Idempotent and safe to
# run concurrently (a lock serialises installers; a stamp skips done work).
set -euo pipefail
cd "$(dirname "$0")"

exec 9>.setup.lock
flock 9

stamp=".installed"
want="$(cat package.json requirements.txt | sha256sum | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -d node_modules && -x .venv/bin/python ]]; then
  exit 0
fi

echo "interop: installing npm packages" >&2
if [[ -f package-lock.json ]]; then
  npm ci --no-audit --no-fund --loglevel=error
else
  npm install --no-audit --no-fund --loglevel=error
fi

echo "interop: installing PyPI packages" >&2
if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt

echo "$want" > "$stamp"
