#!/usr/bin/env bash
# Instructions a scrip build spends per request of one scenario, counted by
# callgrind, so that two builds compare the same on a host whose speed
# changes from minute to minute (BENCHMARKS.md, "Seventh pass").
#
#   scripts/instructions-per-request.sh SCRIP SCRIP_BENCH SCENARIO
#
# Runs the scenario twice under `valgrind --tool=callgrind` (10 s and 30 s,
# 8 connections) and prints the difference of the two runs' instruction
# totals over the difference of their requests: start-up and set-up are the
# same in both runs and cancel out. Counts only user space (not the kernel),
# and valgrind's CPU lacks the extensions AWS-LC's P-256 code uses, so
# ECDSA counts more than it runs natively.
set -euo pipefail
if [ $# -ne 3 ]; then
  sed -n '2,13p' "$0" >&2
  exit 2
fi
scrip=$(realpath "$1") bench=$2 scenario=$3
command -v valgrind >/dev/null || {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null ||
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null; }
}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Only `scrip serve` is counted: scrip-bench also runs `scrip secret set`
# before it, which must not write the same counts file.
cat >"$work/scrip" <<WRAP
#!/usr/bin/env bash
if [ "\$1" = serve ]; then
  exec valgrind --tool=callgrind --callgrind-out-file="\$CALLGRIND_OUT" "$scrip" "\$@"
fi
exec "$scrip" "\$@"
WRAP
chmod +x "$work/scrip"
declare -A requests instructions
for secs in 10 30; do
  line=$(CALLGRIND_OUT="$work/$secs.out" "$bench" --scrip "$work/scrip" --scenario "$scenario" \
    --duration "${secs}s" --connections 8 --no-restart | grep "^$scenario ")
  requests[$secs]=$(sed -E 's/.*requests=([0-9]+).*/\1/' <<<"$line")
  instructions[$secs]=$(awk '/^summary:/ {print $2}' "$work/$secs.out")
done
echo "$scenario: $(( (instructions[30] - instructions[10]) / (requests[30] - requests[10]) )) instructions per request" \
  "(${requests[10]} and ${requests[30]} requests; ${instructions[10]} and ${instructions[30]} instructions)"
