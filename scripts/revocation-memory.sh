#!/usr/bin/env bash
# Idle memory and time to ready of scrip builds started on one store with
# many revocations outstanding (BENCHMARKS.md, "Ninth pass").
#
#   scripts/revocation-memory.sh SCRIP_BENCH REVOCATIONS SCRIP...
#
# Makes the store with `SCRIP_BENCH --scenario revoke --revoke-tokens
# REVOCATIONS`, copying it with SQLite's backup API while the bench's server
# still runs (the bench is stopped with SIGSTOP meanwhile, since it deletes
# its directory when done). Then starts each SCRIP on the copy in turn,
# three rounds, and prints for each start the time until `/readyz` answers
# 200 (the proxy has read every revocation) and RSS and anonymous memory
# 1 s later. The revocations expire with their access tokens, minutes
# after the bench issued them, so the starts follow at once.
set -euo pipefail
# scrip refuses a configuration or data directory its group may write.
umask 022
if [ $# -lt 3 ]; then
  sed -n '2,14p' "$0" >&2
  exit 2
fi
bench=$1 revocations=$2
shift 2
# Where scrip-bench makes its directory (tempfile follows TMPDIR).
tmp=${TMPDIR:-/tmp}
tmp=${tmp%/}
work=$(mktemp -d)
trap 'kill "${server:-}" 2>/dev/null || true; rm -rf "$work"' EXIT
before=$(ls -d "$tmp"/scrip-bench-* 2>/dev/null || true)
"$bench" --scrip "$1" --scenario revoke --revoke-tokens "$revocations" --duration 120s \
  >"$work/bench.txt" 2>&1 &
bench_pid=$!
dir=
until [ -n "$dir" ] && [ -f "$dir/scrip.toml" ]; do
  kill -0 "$bench_pid" 2>/dev/null || { cat "$work/bench.txt" >&2; exit 1; }
  sleep 0.1
  dir=$(comm -13 <(echo "$before") <(ls -d "$tmp"/scrip-bench-* 2>/dev/null || true) | head -1)
done
until grep -q '^revoke' "$work/bench.txt"; do
  kill -0 "$bench_pid" 2>/dev/null || { cat "$work/bench.txt" >&2; exit 1; }
  sleep 0.05
done
kill -STOP "$bench_pid"
mkdir -p "$work/store/data"
cp -r "$dir/policies" "$dir/scrip.toml" "$dir"/*.json "$work/store/"
cp -r "$dir/data/keys" "$work/store/data/"
python3 - "$dir/data/scrip.db" "$work/store/data/scrip.db" <<'PY'
import sqlite3, sys
src, dst = sqlite3.connect(sys.argv[1]), sqlite3.connect(sys.argv[2])
src.backup(dst)
PY
kill -CONT "$bench_pid"
wait "$bench_pid" || true
grep '^revoke' "$work/bench.txt"
config="$work/store/scrip.toml"
port=$(sed -n 's/^listen = "[^:]*:\([0-9]*\)"/\1/p' "$config")
for round in 1 2 3; do
  for scrip in "$@"; do
    start=$(date +%s%N)
    "$scrip" serve --config "$config" >"$work/serve.log" 2>&1 &
    server=$!
    until curl -sf "http://127.0.0.1:$port/readyz" >/dev/null; do
      kill -0 "$server" 2>/dev/null || { cat "$work/serve.log" >&2; exit 1; }
      sleep 0.002
    done
    ready=$((($(date +%s%N) - start) / 1000000))
    sleep 1
    rss=$(awk '/^VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$server/status")
    anon=$(awk '/^RssAnon/ {printf "%.1f", $2 / 1024}' "/proc/$server/status")
    printf '%s round %d: ready after %d ms, rss %s MiB, anonymous %s MiB\n' \
      "$scrip" "$round" "$ready" "$rss" "$anon"
    kill "$server"
    wait "$server" 2>/dev/null || true
  done
done
