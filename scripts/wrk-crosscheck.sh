#!/usr/bin/env bash
# The exchange and metadata scenarios driven by a third-party load generator,
# wrk (C, one event loop per thread), against a scrip set up as scrip-bench
# sets it up, so that scrip-bench's figures can be checked against a client
# scrip's authors did not write (BENCHMARKS.md, "Eleventh pass").
#
#   scripts/wrk-crosscheck.sh SCRIP SCRIP_BENCH [CONNECTIONS [SECONDS [ROUNDS]]]
#
# Defaults: 64 connections, 6 s, 2 rounds. For each round it prints wrk's
# latency distribution for `POST /token` (one task token exchanged for
# `github:read` access tokens, the body scrip-bench's `exchange` sends) and
# for `GET /.well-known/oauth-authorization-server`, each followed by the
# cores scrip and wrk used (from /proc/<pid>/stat). The identity is an ES256
# service-account token minted with the `jose` npm package (interop/).
# Exits non-zero if any request failed (an answer other than 2xx or 3xx, or
# a socket error). Installs wrk and GNU time with apt-get, and the interop
# packages, if they are missing.
#
# SIGNING_ALGORITHM=ES256|EdDSA|RS256 sets the server's `signing_algorithm`
# (default ES256, scrip's). The server's store is in a `mktemp -d` directory,
# so TMPDIR=/dev/shm puts it in memory, where fdatasync costs nothing
# (BENCHMARKS.md, "Twelfth pass").
set -euo pipefail
# scrip refuses a configuration or trust anchor its group may write.
umask 022
if [ $# -lt 2 ] || [ $# -gt 5 ]; then
  sed -n '2,22p' "$0" >&2
  exit 2
fi
scrip=$(realpath "$1") bench=$(realpath "$2")
connections=${3:-64} secs=${4:-6} rounds=${5:-2}
algorithm=${SIGNING_ALGORITHM:-ES256}
case $algorithm in
  ES256 | EdDSA | RS256) ;;
  *)
    echo "SIGNING_ALGORITHM must be ES256, EdDSA or RS256, not \`$algorithm'" >&2
    exit 2
    ;;
esac
root=$(cd "$(dirname "$0")/.." && pwd)
install() {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null ||
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null; }
}
if ! command -v npm >/dev/null; then
  echo "the identity is minted with the interop packages, which need Node.js 20 or later with npm" >&2
  exit 1
fi
command -v wrk >/dev/null || install wrk
[ -x /usr/bin/time ] || install time
bash "$root/interop/setup.sh"

work=$(mktemp -d)
pid=
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
cd "$work"

# The identity provider's key, and the JWKS scrip trusts it with.
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out key.pem 2>/dev/null
openssl pkcs8 -topk8 -nocrypt -in key.pem -outform DER -out key.der
"$bench" --identity-key key.der --print-jwks >idp-jwks.json

# scrip-bench's configuration (crates/scrip-bench/src/server.rs), without
# its filler policies and the proxy's upstream.
mkdir policies
cp "$root"/policies/*.cedar "$root"/policies/*.cedarschema policies/
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
issuer=https://kubernetes.default.svc.cluster.local
cat >scrip.toml <<EOF
listen = "127.0.0.1:$port"
data_dir = "data"
policy_dir = "policies"
signing_algorithm = "$algorithm"

[[trusted_issuers]]
issuer = "$issuer"
jwks_file = "idp-jwks.json"
audiences = ["scrip"]
algorithms = ["ES256"]

[[tools]]
name = "github"
resource = "https://api.github.com"
actions = ["read", "write", "delete"]
labels = { owner = "platform" }

# One identity asks for every access token of a run: each limit at its most,
# as scrip-bench sets them, so that what is measured is the service.
[limits]
tasks_per_minute = 60000000
task_burst = 1000000
access_tokens_per_minute = 60000000
access_token_burst = 1000000
EOF
"$scrip" serve --config scrip.toml 2>scrip.log &
pid=$!
url=http://127.0.0.1:$port
for _ in $(seq 100); do
  curl -sf -o /dev/null "$url/readyz" && break
  sleep 0.1
done
curl -sf -o /dev/null "$url/readyz" || { cat scrip.log >&2; exit 1; }

# A Kubernetes service-account token, as scrip-bench's `Idp::kubernetes`.
identity=$(node "$root/interop/mint-k8s-identity.mjs" key.pem "$issuer" agents agent-0 2>&1) || { echo "minting the identity failed: $identity" >&2; exit 1; }

form() { python3 -c 'import sys, urllib.parse; print(urllib.parse.urlencode(list(zip(sys.argv[1::2], sys.argv[2::2]))), end="")' "$@"; }
te=urn:ietf:params:oauth:grant-type:token-exchange
answer=$(curl -s -X POST "$url/token" -H 'Content-Type: application/x-www-form-urlencoded' --data-binary "$(form \
  grant_type "$te" subject_token "$identity" \
  subject_token_type urn:ietf:params:oauth:token-type:jwt \
  requested_token_type urn:ietf:params:oauth:token-type:txn_token \
  scope 'github:read github:write' \
  request_details '{"purpose":"fix JIRA-1","environment":"dev"}')")
task=$(python3 -c 'import json, sys; print(json.loads(sys.argv[1])["access_token"])' "$answer" 2>/dev/null) \
  || { echo "starting the task answered: $answer" >&2; exit 1; }
form grant_type "$te" subject_token "$task" \
  subject_token_type urn:ietf:params:oauth:token-type:txn_token \
  requested_token_type urn:ietf:params:oauth:token-type:access_token \
  audience github scope read >exchange.body
check=$(curl -s -o /dev/null -w '%{http_code}' -X POST "$url/token" \
  -H 'Content-Type: application/x-www-form-urlencoded' --data-binary @exchange.body)
[ "$check" = 200 ] || { echo "the exchange answered $check" >&2; exit 1; }
# Each run prints its errors (answers other than 2xx or 3xx, and socket
# errors, which wrk keeps apart from latency); the script fails on any. A
# request counts as timed out only after 30 s: wrk's default, 2 s, would
# fail the smoke run on one slow fsync of a loaded machine.
cat >errors.lua <<'EOF'
done = function(summary)
  local e = summary.errors
  io.write(string.format("errors=%d\n", e.status + e.connect + e.read + e.write + e.timeout))
end
EOF
cat errors.lua - >exchange.lua <<'EOF'
local f = assert(io.open("exchange.body", "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
EOF

# utime + stime of a process, in clock ticks.
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
run() {
  local name=$1
  shift
  echo "== $name, $connections connections, ${secs} s"
  local before wrk_out after
  before=$(ticks "$pid")
  # (Shown whatever wrk did: under `set -e` a failed capture or a grep that
  # finds nothing would end the script with the lines that say why unseen.)
  if ! wrk_out=$( { /usr/bin/time -f 'wrk_cpu_s=%U+%S' wrk -t1 -c"$connections" -d"${secs}s" --timeout 30s --latency "$@"; } 2>&1); then
    echo "$wrk_out"
    failed=1
    return
  fi
  after=$(ticks "$pid")
  grep -E 'Latency |50%|90%|99%|Requests/sec|Non-2xx|Socket errors|^errors=' <<<"$wrk_out" || echo "$wrk_out"
  grep -qx 'errors=0' <<<"$wrk_out" || failed=1
  local wcpu
  wcpu=$(sed -nE 's/.*wrk_cpu_s=([0-9.]+)\+([0-9.]+).*/\1 \2/p' <<<"$wrk_out")
  awk -v t=$((after - before)) -v hz="$hz" -v s="$secs" -v w="$wcpu" \
    'BEGIN { split(w, c, " "); printf "server_cpu=%.2f wrk_cpu=%.2f cores\n", t / hz / s, (c[1] + c[2]) / s }'
}
failed=0
for r in $(seq "$rounds"); do
  echo "# round $r"
  run exchange -s exchange.lua "$url/token"
  run metadata -s errors.lua "$url/.well-known/oauth-authorization-server"
done
exit "$failed"
