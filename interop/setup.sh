#!/usr/bin/env bash
# Installs the third-party packages the interoperability tests run, into this
# directory only: node_modules/ (npm) and .venv/ (pip). Idempotent and safe to
# run concurrently (a lock serialises installers; a stamp skips done work).
set -euo pipefail
cd "$(dirname "$0")"

exec 9>.setup.lock
flock 9

stamp=".installed"
want="$(cat package.json package-lock.json requirements.txt setup.sh | sha256sum | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -d node_modules && -x .venv/bin/python ]]; then
  exit 0
fi

# Exactly the versions and integrity hashes of package-lock.json (`npm ci`
# fails without it, or when it disagrees with package.json); no package's
# install scripts run.
echo "interop: installing npm packages" >&2
npm ci --ignore-scripts --no-audit --no-fund --loglevel=error

echo "interop: installing PyPI packages" >&2
if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
# Every package pinned with its hashes (requirements.txt is compiled from
# requirements.in: `pip-compile --allow-unsafe --generate-hashes`), wheels only.
.venv/bin/python -m pip install --quiet --disable-pip-version-check \
  --require-hashes --only-binary=:all: -r requirements.txt

echo "$want" > "$stamp"
