#!/usr/bin/env bash
# Proxy CPU per request with the access log on (a file, combined format)
# vs off (`access_log = "off"`), HTTP/1.1 (wrk) and HTTP/2 (h2load), in
# one run.
#
#   benches/compare/accesslog.sh                 # 3 rounds of 10 s per scenario
#   benches/compare/accesslog.sh --quick         # 1 round of 3 s, a smoke run
#
# Each run starts a fresh release portcullis (PORTCULLIS_WORKERS=1, pinned
# to PROXY_CPU, default 1) in front of the nginx origin of run.sh (pinned
# with the load generators to LOAD_CPU, default 0). Runs alternate on/off
# and off/on from round to round, so drift on a noisy machine falls on
# both. CPU is the proxy process's utime+stime from /proc (every thread,
# the access-log writer included) divided by the requests the load
# generator completed; the totals over all rounds give the figures.
# Prints one markdown table on stdout (progress on stderr) and checks that
# the log has one line per request and dropped none. Installs nothing;
# stops what it starts by PID.
#
# Options:
#   --quick          1 round of 3 s
#   --duration N     N seconds per scenario (default 10)
#   --rounds N       on/off pairs per protocol (default 3)
#   --format F       access_log_format of the "on" runs (default combined)
#   --keep           keep the work directory
#   --no-build       use the release binary already built
# Environment: PROXY_CPU, LOAD_CPU, COMPARE_PORT_BASE (default 18500),
#   CONNECTIONS (default 50).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)

DUR=10
ROUNDS=3
FORMAT=combined
KEEP=0
BUILD=1
PROXY_CPU=${PROXY_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}
PORT_BASE=${COMPARE_PORT_BASE:-18500}
CONNS=${CONNECTIONS:-50}

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) DUR=3; ROUNDS=1 ;;
        --duration) DUR=${2:?--duration needs seconds}; shift ;;
        --rounds) ROUNDS=${2:?--rounds needs a number}; shift ;;
        --format) FORMAT=${2:?--format needs json, common or combined}; shift ;;
        --keep) KEEP=1 ;;
        --no-build) BUILD=0 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "accesslog.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

say() { printf '%s\n' "$*" >&2; }
missing=() pkgs=()
need() { command -v "$1" >/dev/null 2>&1 || { missing+=("$1"); pkgs+=("$2"); }; }
need nginx nginx
need wrk wrk
need h2load nghttp2-client
need openssl openssl
need taskset util-linux
need cargo "(rustup: https://rustup.rs)"
if [ ${#missing[@]} -gt 0 ]; then
    say "accesslog.sh: missing: ${missing[*]}; install them with: sudo apt-get install ${pkgs[*]}"
    exit 2
fi

TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
if [ "$BUILD" = 1 ]; then
    say "== building portcullis (release)"
    (cd "$ROOT" && cargo build --release --quiet --bin portcullis) >&2
fi
PORTCULLIS=$TARGET_DIR/release/portcullis
[ -x "$PORTCULLIS" ] || { say "accesslog.sh: $PORTCULLIS is missing (drop --no-build)"; exit 2; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/portcullis-accesslog.XXXXXX")
chmod 755 "$WORK"
. "$HERE/lib.sh"

ORIGIN_PORT=$PORT_BASE
ADMIN_PORT=$((PORT_BASE + 1))
PORT=$((PORT_BASE + 43))
URL="https://localhost:$PORT/"
for p in "$ORIGIN_PORT" "$ADMIN_PORT" "$PORT"; do
    port_busy "$p" && { say "accesslog.sh: 127.0.0.1:$p is in use; set COMPARE_PORT_BASE"; exit 2; }
done

say "== certificate (openssl) in $WORK"
(
    cd "$WORK"
    exec >/dev/null 2>"$WORK/openssl.err"
    openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 -days 30 \
        -subj "/CN=localhost" -addext "subjectAltName=DNS:localhost" -keyout leaf.key -out leaf.crt
    mkdir -p origin-tmp
)

sed -e "s#@DIR@#$WORK#g" -e "s#@ORIGIN_PORT@#$ORIGIN_PORT#g" "$HERE/origin.nginx.conf" >"$WORK/origin.conf"
taskset -c "$LOAD_CPU" nginx -e "$WORK/origin.error.log" -p "$WORK" -c "$WORK/origin.conf" >"$WORK/origin.out" 2>&1 &
PIDS+=("$!")
for _ in $(seq 1 50); do
    [ "$(http_get "$ORIGIN_PORT" / 2>/dev/null)" = hello ] && break
    sleep 0.1
done
[ "$(http_get "$ORIGIN_PORT" / 2>/dev/null)" = hello ] || { say "origin does not answer hello"; exit 1; }

config() { # access_log value
    cat <<EOF
access_log = "$1"
access_log_format = "$FORMAT"
state_dir = "$WORK/state"
[admin]
listen = "127.0.0.1:$ADMIN_PORT"
[[listeners]]
listen = "127.0.0.1:$PORT"
[[sites]]
hosts = ["localhost"]
tls = { cert = "$WORK/leaf.crt", key = "$WORK/leaf.key" }
default = true
  [[sites.routes]]
  upstream = "http://127.0.0.1:$ORIGIN_PORT"
EOF
}
config "$WORK/access.log" >"$WORK/on.toml"
config off >"$WORK/off.toml"

CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }

declare -A TICKS REQS
for k in h1-on h1-off h2-on h2-off; do TICKS[$k]=0; REQS[$k]=0; done
ROUND_ROWS=()
LOG_LINES=0 LOG_REQS=0 DROPPED=0

# One run: start portcullis with the log $1 (on/off), measure protocol $2
# (h1/h2) for $DUR s, stop it; adds to TICKS/REQS; sets RUN_US (µs/request).
one_run() {
    local mode=$1 proto=$2 pid t0 t1 n out
    rm -f "$WORK/access.log"
    taskset -c "$PROXY_CPU" env PORTCULLIS_WORKERS=1 RUST_LOG=warn \
        "$PORTCULLIS" run --config "$WORK/$mode.toml" >"$WORK/portcullis.out" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    for _ in $(seq 1 100); do
        [ "$(http_get "$ADMIN_PORT" /readyz 2>/dev/null)" != "" ] && break
        sleep 0.1
    done
    taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d1s "$URL" >/dev/null 2>&1 || true
    out="$WORK/$proto-$mode.out"
    t0=$(cpu_ticks "$pid")
    if [ "$proto" = h1 ]; then
        taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${DUR}s" "$URL" >"$out" 2>&1 || true
        t1=$(cpu_ticks "$pid")
        n=$(awk '/requests in/ { print $1 }' "$out")
    else
        taskset -c "$LOAD_CPU" h2load -c"$CONNS" -m10 -D "$DUR" "$URL" >"$out" 2>&1 || true
        t1=$(cpu_ticks "$pid")
        n=$(awk '/^requests:/ { print $8 }' "$out")
    fi
    [ -n "$n" ] && [ "$n" -gt 0 ] || { say "   load run failed:"; sed 's/^/     /' "$out" >&2; exit 1; }
    if [ "$mode" = on ]; then
        local d
        d=$(http_get "$ADMIN_PORT" /metrics | awk '/^portcullis_access_log_dropped_total / { print $2 }')
        DROPPED=$((DROPPED + ${d:-0}))
    fi
    stop_pid "$pid"
    if [ "$mode" = on ]; then
        # Stopped: every line is flushed. The warm-up's requests are in it too.
        LOG_LINES=$((LOG_LINES + $(wc -l <"$WORK/access.log")))
        LOG_REQS=$((LOG_REQS + n))
    fi
    TICKS[$proto-$mode]=$((TICKS[$proto-$mode] + t1 - t0))
    REQS[$proto-$mode]=$((REQS[$proto-$mode] + n))
    RUN_US=$(awk -v t=$((t1 - t0)) -v n="$n" -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", t / hz * 1e6 / n }')
}

for r in $(seq 1 "$ROUNDS"); do
    if [ $((r % 2)) = 1 ]; then order="on off"; else order="off on"; fi
    for proto in h1 h2; do
        row="| $r | $proto |"
        declare -A US=()
        for mode in $order; do
            say "== round $r/$ROUNDS, $proto, access log $mode ($DUR s)"
            one_run "$mode" "$proto"
            US[$mode]=$RUN_US
        done
        ROUND_ROWS+=("$row ${US[on]} | ${US[off]} | $(awk -v a="${US[on]}" -v b="${US[off]}" 'BEGIN { printf "%.3f", a / b }') |")
    done
done

us() { awk -v t="${TICKS[$1]}" -v n="${REQS[$1]}" -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", t / hz * 1e6 / n }'; }
echo
echo "Access log on ($FORMAT, to a file) vs off, proxy CPU µs per request; $ROUNDS round(s) of ${DUR} s, $CONNS connections, $(date -u +%Y-%m-%d)."
echo
echo "| round | protocol | on, µs/req | off, µs/req | on / off |"
echo "|---|---|---|---|---|"
printf '%s\n' "${ROUND_ROWS[@]}"
for proto in h1 h2; do
    on=$(us "$proto-on") off=$(us "$proto-off")
    echo "| all | $proto | **$on** | **$off** | **$(awk -v a="$on" -v b="$off" 'BEGIN { printf "%.3f", a / b }')** |"
done
echo
echo "Log lines written: $LOG_LINES for $LOG_REQS measured requests (plus warm-up); dropped: $DROPPED."
