#!/usr/bin/env bash
# User-space instructions per request, counted by valgrind's callgrind:
# repeatable to a fraction of a percent, where req/s and CPU time on this
# shared machine swing by ±15% from minute to minute. For comparing two
# builds of portcullis, or portcullis with HAProxy or nginx, on the request
# path (the kernel's share is not counted: see CPU per request in run.sh).
#
#   benches/compare/run.sh --quick --keep --only portcullis   # makes a work directory
#   benches/compare/instructions.sh WORKDIR                   # portcullis (target/release)
#   benches/compare/instructions.sh WORKDIR portcullis BIN    # another build
#   benches/compare/instructions.sh WORKDIR haproxy           # or nginx
#
# WORKDIR is the directory `run.sh --keep` printed (certificates and the
# configs, templated with its ports). The proxy runs under callgrind pinned
# to PROXY_CPU (default 1), the origin and load on LOAD_CPU (default 0).
# After a warm-up, the counters are zeroed, `h2load -n 20000 -c50 -m10`
# runs and they are dumped; then the same for `wrk -t1 -c50 -d10s`.
# Prints instructions per request for each. Takes about a minute per proxy.
set -euo pipefail

WORK=${1:?usage: instructions.sh WORKDIR [portcullis|haproxy|nginx] [BIN]}
NAME=${2:-portcullis}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN=${3:-${CARGO_TARGET_DIR:-$ROOT/target}/release/portcullis}
PROXY_CPU=${PROXY_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}
H2_REQUESTS=${H2_REQUESTS:-20000}

for t in valgrind callgrind_control h2load wrk nginx taskset curl; do
    command -v "$t" >/dev/null || { echo "instructions.sh: $t is missing (apt-get install valgrind nghttp2-client wrk nginx curl)" >&2; exit 2; }
done
[ -f "$WORK/origin.conf" ] || { echo "instructions.sh: $WORK has no origin.conf; make it with run.sh --keep" >&2; exit 2; }
PORT=$(awk -F'[:"]' '/^listen = "127.0.0.1:/ && !admin { print $3; exit } /^\[admin\]/ { admin = 1; next } /^\[/ { admin = 0 }' "$WORK/portcullis.toml")
URL="https://localhost:$PORT/"

OUT=$(mktemp -d /tmp/portcullis-instructions.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

taskset -c "$LOAD_CPU" nginx -e "$OUT/origin.error.log" -p "$WORK" -c "$WORK/origin.conf" &
PIDS+=($!)

case "$NAME" in
    portcullis)
        # Set here, not with env(1) under valgrind: valgrind would follow
        # env's exec of the proxy out of its control.
        export PORTCULLIS_WORKERS=1 RUST_LOG=warn
        CMD=("$BIN" run --config "$WORK/portcullis.toml") ;;
    haproxy) CMD=(haproxy -db -f "$WORK/haproxy.cfg") ;;
    nginx) CMD=(nginx -e "$OUT/nginx.error.log" -p "$WORK" -c "$WORK/nginx.conf" -g "daemon off; master_process off;") ;;
    *) echo "instructions.sh: unknown proxy $NAME (portcullis, haproxy or nginx)" >&2; exit 2 ;;
esac
[ "$NAME" = portcullis ] || [ -f "$WORK/${NAME}.cfg" ] || [ -f "$WORK/${NAME}.conf" ] \
    || { echo "instructions.sh: $WORK has no $NAME config; run run.sh --keep without --only, or with $NAME" >&2; exit 2; }

taskset -c "$PROXY_CPU" valgrind --tool=callgrind --callgrind-out-file="$OUT/cg.out" "${CMD[@]}" \
    >"$OUT/proxy.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 600); do
    curl -sk -o /dev/null "$URL" && break
    sleep 0.2
done
curl -sk -o /dev/null "$URL" || { echo "instructions.sh: $NAME did not come up; see $OUT/proxy.log" >&2; exit 1; }
VG=$(pgrep -f "callgrind-out-file=$OUT/cg.out" | head -1)

# Warm-up: connections open, pools filled, first-use paths taken.
taskset -c "$LOAD_CPU" h2load -n 2000 -c50 -m10 "$URL" >/dev/null 2>&1 || true
taskset -c "$LOAD_CPU" wrk -t1 -c50 -d3s --timeout 10s "$URL" >/dev/null 2>&1 || true

callgrind_control -z "$VG" >/dev/null 2>&1
h2n=$(taskset -c "$LOAD_CPU" h2load -n "$H2_REQUESTS" -c50 -m10 "$URL" | awk '/^requests:/ { print $8 }')
callgrind_control -d h2 "$VG" >/dev/null 2>&1
callgrind_control -z "$VG" >/dev/null 2>&1
h1n=$(taskset -c "$LOAD_CPU" wrk -t1 -c50 -d10s --timeout 10s "$URL" | awk '/requests in/ { print $1 }')
callgrind_control -d h1 "$VG" >/dev/null 2>&1

ir() { grep -l "^desc: Trigger: dump $1\$" "$OUT"/cg.out.* | head -1 | xargs grep -m1 '^summary:' | awk '{ print $2 }'; }
per() { awk -v i="$1" -v n="$2" 'BEGIN { if (n > 0) printf "%.0f", i / n; else print "-" }'; }
echo "$NAME: HTTP/2 $(per "$(ir h2)" "$h2n") instructions per request ($h2n requests), HTTP/1.1 keep-alive $(per "$(ir h1)" "$h1n") ($h1n requests); callgrind files in $OUT"
