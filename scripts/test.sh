#!/usr/bin/env bash
# Sets up and runs every test of scrip, on a fresh machine of the kind CI
# runs on (PostgreSQL with trust auth on 127.0.0.1, Node.js 20; it says so
# and stops where one differs) or a used one:
# formatting, lints, unit and integration tests (which start real scrip
# servers on ephemeral ports), and the shipped policy examples.
set -euo pipefail
cd "$(dirname "$0")/.."
# Package installs below never stop to ask (tzdata, on a fresh container).
export DEBIAN_FRONTEND=noninteractive
# The tests write trust anchors (JWKS files) and key files as the tests'
# user; scrip refuses any that group or others may write, as it should, so
# a umask of 002 (many desktops) would fail the tests, not the code.
umask 022

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "installing cargo-nextest" >&2
  cargo install cargo-nextest --locked --version 0.9.143
fi

# PostgreSQL: the shared store's tests (the conformance suite, replicas)
# each create a database of their own on 127.0.0.1:5432 (trust auth).
echo "== services" >&2
installed_pg=
# One already answering (a container, another install) is used as it is.
if ! pg_isready -q -h 127.0.0.1 -p 5432 >/dev/null 2>&1 \
  && ! command -v pg_ctlcluster >/dev/null 2>&1; then
  echo "installing PostgreSQL" >&2
  apt-get update -qq && apt-get install -y -qq postgresql
  installed_pg=1
fi
if [ -n "$installed_pg" ]; then
  # A cluster installed here, for the tests only: trust on 127.0.0.1, as on
  # the machines CI runs on (Debian's own default asks for a password).
  for hba in /etc/postgresql/*/main/pg_hba.conf; do
    sed -i '1i host all all 127.0.0.1/32 trust' "$hba"
  done
  for v in /etc/postgresql/*; do
    pg_ctlcluster --skip-systemctl-redirect "$(basename "$v")" main restart
  done
fi
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  shopt -s nullglob
  clusters=(/etc/postgresql/*)
  shopt -u nullglob
  if [ ${#clusters[@]} -eq 0 ]; then
    echo "PostgreSQL is installed but has no cluster: create one (pg_createcluster <version> main --start) or start a server on 127.0.0.1:5432" >&2
    exit 1
  fi
  for v in "${clusters[@]}"; do
    pg_ctlcluster --skip-systemctl-redirect "$(basename "$v")" main start
  done
fi
for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  echo "PostgreSQL does not answer on 127.0.0.1:5432 after 30 s" >&2
  exit 1
fi
# The tests log in as `postgres` without a password (trust) and create
# their databases from `test`. Changing how a PostgreSQL that was already
# there authenticates is left to you; a missing `test` database is made here.
if ! psql -wqtAX postgres://postgres@127.0.0.1:5432/postgres -c 'SELECT 1' >/dev/null 2>&1; then
  echo "PostgreSQL on 127.0.0.1:5432 does not let \`postgres\` in without a password; the tests need trust auth there: add \`host all all 127.0.0.1/32 trust\` first in pg_hba.conf and reload" >&2
  exit 1
fi
if [ -z "$(psql -wqtAX postgres://postgres@127.0.0.1:5432/postgres -c "SELECT 1 FROM pg_database WHERE datname = 'test'")" ]; then
  psql -wqX postgres://postgres@127.0.0.1:5432/postgres -c 'CREATE DATABASE test'
fi
# The shared store's TLS test connects to it over TLS, trusting the
# server's own certificate.
if [ "$(psql -wqtAX postgres://postgres@127.0.0.1:5432/postgres -c 'SHOW ssl')" != on ]; then
  echo "PostgreSQL on 127.0.0.1:5432 has ssl off; the tests need it on (Debian's package turns it on with its snakeoil certificate): set ssl, ssl_cert_file and ssl_key_file in postgresql.conf and reload" >&2
  exit 1
fi

# The interoperability tests run third-party JOSE and OAuth libraries on
# Node.js (20 or later) and Python (with venv).
if ! node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)' 2>/dev/null || ! command -v npm >/dev/null; then
  echo "the interoperability tests need Node.js 20 or later with npm (node --version: $(node --version 2>/dev/null || echo none))" >&2
  exit 1
fi
if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
  echo "installing python3-venv" >&2
  apt-get install -y -qq python3-venv >/dev/null || { apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null; }
fi

# nginx: the legacy-bridge proxy tests start their own nginx as the upstream
# that demands a static key (they install it too, but one install here
# spares the parallel tests from queueing on apt's lock).
if [ ! -x /usr/sbin/nginx ]; then
  echo "installing nginx" >&2
  apt-get install -y -qq nginx >/dev/null || { apt-get update -qq && apt-get install -y -qq nginx >/dev/null; }
fi

# curl and openssl: the CLI's proxy tests and the wrk cross-check use them.
for tool in curl openssl; do
  if ! command -v "$tool" >/dev/null; then
    echo "installing $tool" >&2
    apt-get install -y -qq "$tool" >/dev/null || { apt-get update -qq && apt-get install -y -qq "$tool" >/dev/null; }
  fi
done

# Databases that tests of an earlier run left when they were killed (their
# process is gone). Those of a run still going are left alone: a process
# that lives, or (a run in another PID namespace, sharing this PostgreSQL)
# a database someone is connected to, which is not forced.
psql -wqtAX postgres://postgres@127.0.0.1:5432/postgres \
  -c "SELECT datname FROM pg_database WHERE datname ~ '^scrip_(t|smoke_)[0-9]+'" |
  while read -r db; do
    pid=$(sed -E 's/^scrip_(t|smoke_)([0-9]+).*/\2/' <<<"$db")
    if [ ! -d "/proc/$pid" ]; then
      psql -wqX postgres://postgres@127.0.0.1:5432/postgres -c "DROP DATABASE IF EXISTS \"$db\"" >/dev/null 2>&1 || true
    fi
  done

# The interoperability tests' third-party packages (npm, a Python venv) are
# installed before the tests, so that the first of them does not hold the
# others up (the tests run this same idempotent script too).
echo "== interop packages" >&2
bash interop/setup.sh

echo "== format" >&2
cargo fmt --all --check
echo "== lints" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== tests" >&2
cargo nextest run --workspace --locked --no-fail-fast
# nextest does not run doctests: the examples in the crates' docs compile.
cargo test -q --workspace --doc --locked
# The binaries, built with the test build's features: only scrip-bench's is
# left to link (`cargo run -p` would compile dependencies again).
cargo build -q --workspace --all-targets --locked
echo "== shipped policy examples" >&2
target/debug/scrip policy test policies/examples.test.toml --policies policies
echo "== load smoke (fails on request errors, never on timings)" >&2
target/debug/scrip-bench --smoke --scrip target/debug/scrip
echo "== DPoP smoke with EdDSA proofs (fails on request errors, never on timings)" >&2
target/debug/scrip-bench --smoke --scrip target/debug/scrip \
  --scenario exchange-dpop,proxy-dpop --dpop-algorithm EdDSA --no-restart
echo "== open-loop smoke (--rate; fails on request errors, never on timings)" >&2
# (Captured, so shown before failing: under `set -e` a failed capture would
# end the script with the lines that say why unseen.)
open_loop=$(target/debug/scrip-bench --smoke --scrip target/debug/scrip \
  --scenario exchange,metadata --rate 2000 --no-restart) || { echo "$open_loop"; exit 1; }
echo "$open_loop"
# Open loop reports each request's round trip beside its latency from due.
[ "$(grep -c ' offered=2000/s rtt_p50=' <<<"$open_loop")" -eq 2 ]
echo "== prefilled-store smoke (tasks and records in the store before scrip serves it)" >&2
# Under umask 002 (many desktops): the files scrip-bench writes for scrip
# are not its group's to change whatever the caller's umask, or scrip
# would refuse them.
(umask 002 && target/debug/scrip-bench --smoke --scrip target/debug/scrip \
  --prefill-tasks 2000 --prefill-records 10000 --scenario task-start,exchange --no-restart)
smoke_db="scrip_smoke_$$"
psql -qX postgres://postgres@127.0.0.1:5432/test -c "CREATE DATABASE $smoke_db"
trap 'psql -qX postgres://postgres@127.0.0.1:5432/test -c "DROP DATABASE IF EXISTS $smoke_db WITH (FORCE)" >/dev/null 2>&1 || true' EXIT
target/debug/scrip-bench --smoke --scrip target/debug/scrip \
  --database-url "postgres://postgres@127.0.0.1:5432/$smoke_db" --replicas 2 \
  --scenario task-start,exchange,introspect,revoke,propagation --no-restart
# The same scrip driven by a third-party load generator (wrk), as
# BENCHMARKS.md's cross-check runs it: fails on request errors, never on
# timings.
echo "== load smoke with wrk" >&2
(umask 002 && bash scripts/wrk-crosscheck.sh target/debug/scrip target/debug/scrip-bench 8 2 1)
