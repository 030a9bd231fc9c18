#!/usr/bin/env bash
# Side-by-side comparison of portcullis with nginx, HAProxy and Caddy.
#
#   benches/compare/run.sh            # 10 s per scenario, about 5 minutes
#   benches/compare/run.sh --quick    # 2 s per scenario, a smoke run
#
# Every proxy gets the same certificates (ECDSA P-256, and RSA-2048 for the
# RSA scenario, generated here with openssl), the same nginx origin on
# loopback answering `hello`, one worker, no access log, TLS session tickets
# on, and is pinned to one core (PROXY_CPU, default 1); the load generators
# and the origin run on the other (LOAD_CPU, default 0). Configs are the
# files next to this script, templated with ports and paths.
#
# Prints one markdown table on stdout (progress goes to stderr): rows are
# scenarios, columns nginx, HAProxy, Caddy, portcullis, and portcullis'
# ratio to the best peer. Everything it starts it stops by PID on exit.
# It installs nothing: it says what is missing and how to install it.
#
# Options:
#   --quick          2 s scenarios (smoke run)
#   --duration N     N seconds per scenario (default 10)
#   --only LIST      comma-separated subset of nginx,haproxy,caddy,portcullis
#   --keep           keep the work directory (configs, logs, raw outputs)
#   --no-build       use the portcullis binaries already built
# Environment: PROXY_CPU, LOAD_CPU, COMPARE_PORT_BASE (default 18400),
#   CONNECTIONS (default 50), SWAPS (default 100).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)

DUR=10
KEEP=0
BUILD=1
PROXIES="nginx haproxy caddy portcullis"
PROXY_CPU=${PROXY_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}
PORT_BASE=${COMPARE_PORT_BASE:-18400}
CONNS=${CONNECTIONS:-50}
SWAPS=${SWAPS:-100}
ARGS_SEEN="$*"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case "$1" in
        --quick) DUR=2 ;;
        --duration) DUR=${2:?--duration needs seconds}; shift ;;
        --duration=*) DUR=${1#*=} ;;
        --only) PROXIES=$(echo "${2:?--only needs a list}" | tr ',' ' '); shift ;;
        --only=*) PROXIES=$(echo "${1#*=}" | tr ',' ' ') ;;
        --keep) KEEP=1 ;;
        --no-build) BUILD=0 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "run.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
case "$DUR" in ''|*[!0-9]*|0) echo "run.sh: --duration wants whole seconds >= 1, got $DUR" >&2; exit 2 ;; esac
for p in $PROXIES; do
    case "$p" in nginx|haproxy|caddy|portcullis) ;; *) echo "run.sh: --only: unknown proxy $p" >&2; exit 2 ;; esac
done

say() { printf '%s\n' "$*" >&2; }
has() { case " $PROXIES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# --- tools -----------------------------------------------------------------
missing=() pkgs=()
need() { command -v "$1" >/dev/null 2>&1 || { missing+=("$1"); pkgs+=("$2"); }; }
need nginx nginx # also the origin
has haproxy && need haproxy haproxy
has caddy && need caddy caddy
need wrk wrk
need h2load nghttp2-client
need openssl openssl
need taskset util-linux
need cargo "(rustup: https://rustup.rs)"
if [ ${#missing[@]} -gt 0 ]; then
    say "run.sh: missing: ${missing[*]}"
    say "install them with:  sudo apt-get install ${pkgs[*]}"
    say "(nothing is installed by this script)"
    exit 2
fi
if [ "$(nproc)" -lt 2 ] && [ "$PROXY_CPU" != "$LOAD_CPU" ]; then
    say "run.sh: needs 2 CPUs (proxy on CPU $PROXY_CPU, load on CPU $LOAD_CPU); this machine has $(nproc)."
    say "Set PROXY_CPU=0 LOAD_CPU=0 to run everything on one (the figures then mean little)."
    exit 2
fi

# --- build -----------------------------------------------------------------
START=$(date +%s)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
if [ "$BUILD" = 1 ]; then
    say "== building portcullis, hsload and swapcerts (release)"
    (cd "$ROOT" && cargo build --release --quiet --bin portcullis --example hsload --example swapcerts) >&2
    say "   built in $(( $(date +%s) - START )) s"
fi
PORTCULLIS=$TARGET_DIR/release/portcullis
HSLOAD=$TARGET_DIR/release/examples/hsload
SWAPCERTS=$TARGET_DIR/release/examples/swapcerts
for b in "$PORTCULLIS" "$HSLOAD" "$SWAPCERTS"; do
    [ -x "$b" ] || { say "run.sh: $b is missing (drop --no-build)"; exit 2; }
done

# --- work dir, cleanup -------------------------------------------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/portcullis-compare.XXXXXX")
chmod 755 "$WORK" # nginx workers may run as another user
. "$HERE/lib.sh"

ORIGIN_PORT=$PORT_BASE
ADMIN_PORT=$((PORT_BASE + 1))
PORT=$((PORT_BASE + 43))
# A host name, not 127.0.0.1: wrk and h2load would send the IP address as
# SNI, which TLS forbids (rustls logs a warning for each such handshake).
URL="https://localhost:$PORT/"
for p in "$ORIGIN_PORT" "$ADMIN_PORT" "$PORT"; do
    if port_busy "$p"; then
        say "run.sh: 127.0.0.1:$p is in use; set COMPARE_PORT_BASE to a free range"
        exit 2
    fi
done

# A plain HTTP/1.0 GET on loopback; prints the body.

template() { # src dst
    sed -e "s#@DIR@#$WORK#g" -e "s#@PORT@#$PORT#g" -e "s#@ORIGIN_PORT@#$ORIGIN_PORT#g" \
        -e "s#@ADMIN_PORT@#$ADMIN_PORT#g" "$1" >"$2"
}

# start NAME CPU CMD... : runs CMD pinned, output to $WORK/NAME.out; sets STARTED_PID.
start() {
    local name=$1 cpu=$2
    shift 2
    taskset -c "$cpu" "$@" >"$WORK/$name.out" 2>&1 &
    STARTED_PID=$!
    PIDS+=("$STARTED_PID")
}

# --- certificates ------------------------------------------------------------
say "== certificates (openssl) in $WORK"
(
    cd "$WORK"
    exec >/dev/null 2>"$WORK/openssl.err"
    openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 -days 30 \
        -subj "/CN=portcullis bench CA" -keyout ca.key -out ca.crt
    leaf() { # name keyopts... ; SANs from $SAN
        local name=$1
        shift
        openssl req -new -nodes "$@" -subj "/CN=$CN" -keyout "$name.key" -out "$name.csr"
        printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' "$SAN" >"$name.ext"
        openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 \
            -extfile "$name.ext" -out "$name.crt"
        cat "$name.crt" "$name.key" >"$name.pem"
    }
    CN=localhost SAN="DNS:localhost,DNS:bench.test,IP:127.0.0.1" leaf ecdsa -newkey ec -pkeyopt ec_paramgen_curve:P-256
    # A second ECDSA pair for the same names: the swap scenario alternates them.
    CN=localhost SAN="DNS:localhost,DNS:bench.test,IP:127.0.0.1" leaf ecdsa2 -newkey ec -pkeyopt ec_paramgen_curve:P-256
    CN=rsa.bench.test SAN="DNS:rsa.bench.test" leaf rsa -newkey rsa:2048
    mkdir -p portcullis-certs nginx-tmp origin-tmp caddy-home
    cp ecdsa.crt ecdsa.key rsa.crt rsa.key portcullis-certs/
)

# --- origin ------------------------------------------------------------------
template "$HERE/origin.nginx.conf" "$WORK/origin.conf"
start origin "$LOAD_CPU" nginx -e "$WORK/origin.error.log" -p "$WORK" -c "$WORK/origin.conf"
ORIGIN_PID=$STARTED_PID
for _ in $(seq 1 50); do
    [ "$(http_get "$ORIGIN_PORT" / 2>/dev/null)" = hello ] && break
    kill -0 "$ORIGIN_PID" 2>/dev/null || { cat "$WORK/origin.out" "$WORK/origin.error.log" >&2 || true; say "origin failed to start"; exit 1; }
    sleep 0.1
done
[ "$(http_get "$ORIGIN_PORT" / 2>/dev/null)" = hello ] || { say "origin does not answer hello"; exit 1; }
say "== origin: nginx on 127.0.0.1:$ORIGIN_PORT (CPU $LOAD_CPU)"

# --- measurements --------------------------------------------------------------
declare -A VAL  # "row|proxy" -> number (for ratios)
declare -A CELL # "row|proxy" -> text shown
NOTES=()

set_cell() { # row proxy value [extra text]
    VAL["$1|$2"]=$3
    CELL["$1|$2"]="$(fmt "$3")${4:-}"
}
fmt() { # >= 100: whole, with thousands separators; smaller: 2 significant decimals
    awk -v v="$1" 'BEGIN {
        if (v == "") { print "-"; exit }
        if (v + 0 >= 100) { s = sprintf("%.0f", v); r = "";
            while (length(s) > 3) { r = "," substr(s, length(s) - 2) r; s = substr(s, 1, length(s) - 3) }
            print s r } else if (v + 0 >= 10) printf "%.1f\n", v; else printf "%.2f\n", v }'
}
errs_text() { [ "${1:-0}" = 0 ] && return 0; printf ' (%s errors)' "$1"; }

kib() { awk -v f="$2:" '$1 == f { print $2; exit }' "/proc/$1/status" 2>/dev/null || echo 0; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

# The process that serves traffic (nginx: the worker, not the master).
serving_pid() { # name pid
    if [ "$1" = nginx ]; then
        local kids=""
        kids=$(cat "/proc/$2/task/$2/children" 2>/dev/null || pgrep -P "$2" || true)
        echo "${kids%% *}" | awk '{ print $1 }'
    else
        echo "$2"
    fi
}

# wrk over HTTP/1.1 keep-alive; sets W_RPS W_P99 W_ERR.
run_wrk() { # label duration
    local out="$WORK/$1.wrk"
    taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${2}s" --latency "$URL" >"$out" 2>&1 || true
    W_RPS=$(awk '/^Requests\/sec:/ { print $2 }' "$out")
    W_P99=$(awk '$1 == "99%" { v = $2; u = v; sub(/[a-z]+$/, "", v); sub(/^[0-9.]+/, "", u);
        m = (u == "us") ? 0.001 : (u == "s") ? 1000 : (u == "m") ? 60000 : 1; printf "%.2f", v * m }' "$out")
    W_ERR=$(awk '/^  Non-2xx or 3xx responses:/ { n += $NF }
        /Socket errors:/ { gsub(/,/, ""); n += $4 + $6 + $8 + $10 } END { print n + 0 }' "$out")
    [ -n "$W_RPS" ] || { say "   wrk failed:"; sed 's/^/     /' "$out" >&2; W_RPS=0; W_ERR=1; }
}

# h2load; sets H_RPS H_ERR.
run_h2load() { # label duration
    local out="$WORK/$1.h2load"
    taskset -c "$LOAD_CPU" h2load -c"$CONNS" -m10 -D "$2" "$URL" >"$out" 2>&1 || true
    H_RPS=$(awk '/^finished in/ { print $4 }' "$out")
    # failed + errored + timeout, plus 4xx and 5xx responses
    H_ERR=$(awk '/^requests:/ { n += $10 + $12 + $14 } /^status codes:/ { n += $7 + $9 } END { print n + 0 }' "$out")
    [ -n "$H_RPS" ] || { say "   h2load failed:"; sed 's/^/     /' "$out" >&2; H_RPS=0; H_ERR=1; }
}

# hsload; sets S_RATE S_ERR S_RES S_OK S_P50 S_P99.
run_hsload() { # label duration [hsload args...]
    local out="$WORK/$1.hsload" d=$2
    shift 2
    taskset -c "$LOAD_CPU" "$HSLOAD" --addr "127.0.0.1:$PORT" -c "$CONNS" -d "${d}s" "$@" >"$out" 2>&1 || true
    local kv
    kv=$(grep '^hs_per_s=' "$out" || true)
    if [ -z "$kv" ]; then
        say "   hsload failed:"; sed 's/^/     /' "$out" >&2
        S_RATE=0 S_ERR=1 S_RES=0 S_OK=0 S_P50=0 S_P99=0
        return
    fi
    S_RATE=$(kvget "$kv" hs_per_s) S_ERR=$(kvget "$kv" errors) S_RES=$(kvget "$kv" resumed)
    S_OK=$(kvget "$kv" ok) S_P50=$(kvget "$kv" p50_ms) S_P99=$(kvget "$kv" p99_ms)
    grep '^first error' "$out" | sed 's/^/   /' >&2 || true
}
# CPU time the proxy process used during a scenario, as a share of one
# core: well under 100 means the proxy was not the bottleneck (the load
# generator was, or the machine was busy), and the figure says little.
# The load CPU's busy share (all processes on it) says whether the load
# generator had room to push harder.
CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
core_ticks() { awk -v c="cpu$1" '$1 == c { print $2 + $3 + $4 + $7 + $8 + $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat; }
cpu_begin() { CPU_T0=$(cpu_ticks "$1"); WALL_T0=$(date +%s.%N); CORE_T0=$(core_ticks "$LOAD_CPU"); }
cpu_end() { # pid label: appends "label NN% (load CPU MM%)" to CPU_USE; sets CPU_PCT
    local t1 w1 c1
    t1=$(cpu_ticks "$1"); w1=$(date +%s.%N); c1=$(core_ticks "$LOAD_CPU")
    CPU_PCT=$(awk -v a="$CPU_T0" -v b="$t1" -v w0="$WALL_T0" -v w1="$w1" -v hz="$CLK_TCK" \
        'BEGIN { printf "%.0f", 100 * (b - a) / hz / (w1 - w0) }')
    local load
    load=$(echo "$CORE_T0 $c1" | awk '{ t = $4 - $2; printf "%.0f", (t > 0) ? 100 * ($3 - $1) / t : 0 }')
    CPU_USE="${CPU_USE:+$CPU_USE, }$2 $CPU_PCT% (load CPU $load%)"
    # MARK flags a throughput figure taken while the proxy had CPU to spare.
    MARK=""
    if [ "$CPU_PCT" -lt 90 ]; then MARK="†"; STARVED=1; fi
}
STARVED=0
# CPU µs the proxy spent per request in the last scenario (from CPU_PCT):
# unlike req/s, it does not depend on how hard the load side could push.
per_request() { # rps
    awk -v p="$CPU_PCT" -v r="$1" 'BEGIN { if (r > 0) printf "%.1f", p * 10000 / r; else print "" }'
}

kvget() { printf '%s\n' "$1" | tr ' ' '\n' | awk -F= -v k="$2" '$1 == k { print $2 }'; }

# portcullis' certificate reload counters from its admin /metrics.
reloads() { http_get "$ADMIN_PORT" /metrics 2>/dev/null | awk '/^portcullis_tls_cert_reloads_total\{result="success"\}/ { s = $2 }
    /^portcullis_tls_cert_reloads_total\{result="failure"\}/ { f = $2 } END { printf "%d %d\n", s, f }'; }

# Replaces portcullis' ECDSA certificate and key $SWAPS times over the
# first 90% of $1 seconds, alternating two pairs, each file written to a
# temp file and renamed into place (the key renamed first, then the
# certificate: a reload that reads between the two renames sees a
# mismatched pair and keeps the previous certificate, as designed). One
# process (benches/compare/swapcerts.rs) pinned to the load CPU: a shell
# loop forking cp and mv cost more CPU than the reloads themselves.
swap_loop() { # duration
    local over
    over=$(awk -v t="$1" 'BEGIN { printf "%dms", t * 900 }')
    taskset -c "$LOAD_CPU" "$SWAPCERTS" --dir "$WORK/portcullis-certs" --name ecdsa \
        --from "$WORK/ecdsa" --from "$WORK/ecdsa2" --count "$SWAPS" --over "$over"
}

ROWS=(h1 h1p99 h1cpu h2 h2cpu full fullp99 resumed rsa rssidle rsspeak swaph1 swapfull)
declare -A ROWNAME=(
    [h1]="HTTP/1.1 keep-alive over TLS, req/s (\`wrk -t1 -c$CONNS\`)"
    [h1p99]="HTTP/1.1 keep-alive p99 latency, ms (\`wrk --latency\`)"
    [h1cpu]="HTTP/1.1 keep-alive, proxy CPU per request, µs (its CPU time / requests)"
    [h2]="HTTP/2, req/s (\`h2load -c$CONNS -m10\`)"
    [h2cpu]="HTTP/2, proxy CPU per request, µs"
    [full]="full TLS 1.3 handshake + 1 GET per connection, hs/s (ECDSA P-256, hsload -c$CONNS)"
    [fullp99]="full handshake + GET p99 latency, ms"
    [resumed]="resumed TLS 1.3 handshake (ticket) + 1 GET, hs/s"
    [rsa]="full TLS 1.3 handshake + 1 GET, RSA-2048, hs/s"
    [rssidle]="RSS idle, MiB (VmRSS after start)"
    [rsspeak]="peak RSS under load, MiB (VmHWM after all of the above)"
    [swaph1]="HTTP/1.1 keep-alive req/s during $SWAPS certificate swaps"
    [swapfull]="full handshakes/s during $SWAPS certificate swaps"
)
# Which way is better: up (more is better) or down.
declare -A BETTER=([h1]=up [h1p99]=down [h1cpu]=down [h2]=up [h2cpu]=down [full]=up [fullp99]=down [resumed]=up [rsa]=up
    [rssidle]=down [rsspeak]=down [swaph1]=up [swapfull]=up)

bench_proxy() { # name
    local name=$1 pid spid
    CPU_USE=""
    say "== $name (CPU $PROXY_CPU), $DUR s per scenario"
    case "$name" in
        nginx)
            template "$HERE/nginx.conf" "$WORK/nginx.conf"
            start nginx "$PROXY_CPU" nginx -e "$WORK/nginx.error.log" -p "$WORK" -c "$WORK/nginx.conf" ;;
        haproxy)
            template "$HERE/haproxy.cfg" "$WORK/haproxy.cfg"
            start haproxy "$PROXY_CPU" haproxy -db -f "$WORK/haproxy.cfg" ;;
        caddy)
            template "$HERE/Caddyfile" "$WORK/Caddyfile"
            start caddy "$PROXY_CPU" env GOMAXPROCS=1 HOME="$WORK/caddy-home" XDG_DATA_HOME="$WORK/caddy-home" \
                XDG_CONFIG_HOME="$WORK/caddy-home" caddy run --config "$WORK/Caddyfile" --adapter caddyfile ;;
        portcullis)
            template "$HERE/portcullis.toml" "$WORK/portcullis.toml"
            start portcullis "$PROXY_CPU" env PORTCULLIS_WORKERS=1 RUST_LOG=warn \
                "$PORTCULLIS" run --config "$WORK/portcullis.toml" ;;
    esac
    pid=$STARTED_PID
    local ready=0
    for _ in $(seq 1 100); do
        if "$HSLOAD" --addr "127.0.0.1:$PORT" --probe >/dev/null 2>&1 \
            && "$HSLOAD" --addr "127.0.0.1:$PORT" --sni rsa.bench.test --probe >/dev/null 2>&1; then
            ready=1; break
        fi
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if [ "$ready" = 0 ]; then
        say "   $name did not come up; its output:"
        sed 's/^/     /' "$WORK/$name.out" >&2 || true
        [ -f "$WORK/$name.error.log" ] && sed 's/^/     /' "$WORK/$name.error.log" >&2
        stop_pid "$pid"
        NOTES+=("$name did not start; see the log above.")
        return 0
    fi
    spid=$(serving_pid "$name" "$pid")
    [ -n "$spid" ] || spid=$pid
    sleep 1
    set_cell rssidle "$name" "$(mib "$(kib "$spid" VmRSS)")"
    if [ "$name" = nginx ]; then
        NOTES+=("nginx RSS is its worker's; the master adds $(mib "$(kib "$pid" VmRSS)") MiB idle (mostly pages shared with the worker).")
    fi

    say "   warm-up (1 s)"
    taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d1s "$URL" >/dev/null 2>&1 || true

    say "   HTTP/1.1 keep-alive"
    cpu_begin "$spid"
    run_wrk "$name-h1" "$DUR"
    cpu_end "$spid" h1
    set_cell h1 "$name" "$W_RPS" "$MARK$(errs_text "$W_ERR")"
    set_cell h1p99 "$name" "$W_P99"
    set_cell h1cpu "$name" "$(per_request "$W_RPS")"
    local base_h1=$W_RPS

    say "   HTTP/2"
    cpu_begin "$spid"
    run_h2load "$name-h2" "$DUR"
    cpu_end "$spid" h2
    set_cell h2 "$name" "$H_RPS" "$MARK$(errs_text "$H_ERR")"
    set_cell h2cpu "$name" "$(per_request "$H_RPS")"

    say "   full handshakes (ECDSA)"
    cpu_begin "$spid"
    run_hsload "$name-full" "$DUR"
    cpu_end "$spid" full
    set_cell full "$name" "$S_RATE" "$MARK$(errs_text "$S_ERR")"
    set_cell fullp99 "$name" "$S_P99"
    local base_full=$S_RATE

    say "   resumed handshakes"
    cpu_begin "$spid"
    run_hsload "$name-resumed" "$DUR" --resume
    cpu_end "$spid" resumed
    local pct
    pct=$(awk -v r="$S_RES" -v o="$S_OK" 'BEGIN { if (o > 0) printf "%.0f", 100 * r / o; else print 0 }')
    set_cell resumed "$name" "$S_RATE" "$MARK$(errs_text "$S_ERR")$([ "$pct" -lt 95 ] && printf ' (%s%% resumed)' "$pct")"

    say "   full handshakes (RSA-2048)"
    cpu_begin "$spid"
    run_hsload "$name-rsa" "$DUR" --sni rsa.bench.test
    cpu_end "$spid" rsa
    set_cell rsa "$name" "$S_RATE" "$MARK$(errs_text "$S_ERR")"

    set_cell rsspeak "$name" "$(mib "$(kib "$spid" VmHWM)")"

    if [ "$name" = portcullis ]; then
        local before after
        before=$(reloads)
        say "   HTTP/1.1 keep-alive during $SWAPS certificate swaps"
        swap_loop "$DUR" &
        local swapper=$!
        PIDS+=("$swapper")
        cpu_begin "$spid"
        run_wrk "$name-swap-h1" "$DUR"
        cpu_end "$spid" swap-h1
        wait "$swapper" || true
        set_cell swaph1 "$name" "$W_RPS" "$MARK$(errs_text "$W_ERR")"
        VAL["swaph1|base"]=$base_h1
        sleep 0.3
        after=$(reloads)
        NOTES+=("portcullis certificate reloads during the keep-alive swap run (success failure): before $before, after $after. Swaps closer together than the 75 ms file-watch debounce count as one; a failure is a reload that read the new key with the old certificate between the two renames, and kept the previous certificate in service.")

        say "   full handshakes during $SWAPS certificate swaps"
        before=$after
        swap_loop "$DUR" &
        swapper=$!
        PIDS+=("$swapper")
        cpu_begin "$spid"
        run_hsload "$name-swap-full" "$DUR"
        cpu_end "$spid" swap-full
        wait "$swapper" || true
        set_cell swapfull "$name" "$S_RATE" "$MARK$(errs_text "$S_ERR")"
        VAL["swapfull|base"]=$base_full
        sleep 0.3
        after=$(reloads)
        NOTES+=("portcullis certificate reloads during the handshake swap run (success failure): before $before, after $after.")
    else
        CELL["swaph1|$name"]="n/a"
        CELL["swapfull|$name"]="n/a"
    fi

    NOTES+=("$name CPU time per scenario, as a share of its core: $CPU_USE.")
    stop_pid "$pid"
}

for p in nginx haproxy caddy portcullis; do
    has "$p" && bench_proxy "$p"
done
ELAPSED=$(( $(date +%s) - START ))
if [ "$STARVED" = 1 ]; then
    NOTES+=("† the proxy used under 90% of its core: the load generator (or another process on the machine) set this figure, not the proxy.")
fi

# --- table ---------------------------------------------------------------------
ratio() { # row -> text
    local row=$1 pc=${VAL["$1|portcullis"]:-} best="" p v
    [ -n "$pc" ] || { echo "-"; return; }
    if [ "$row" = swaph1 ] || [ "$row" = swapfull ]; then
        local base=${VAL["$row|base"]:-}
        awk -v a="$pc" -v b="$base" 'BEGIN { if (b > 0) printf "%.2f× of no-swap run", a / b; else print "-" }'
        return
    fi
    for p in nginx haproxy caddy; do
        v=${VAL["$row|$p"]:-}
        [ -n "$v" ] || continue
        if [ -z "$best" ]; then best=$v; continue; fi
        if [ "${BETTER[$row]}" = up ]; then
            best=$(awk -v a="$best" -v b="$v" 'BEGIN { print (b > a) ? b : a }')
        else
            best=$(awk -v a="$best" -v b="$v" 'BEGIN { print (b < a) ? b : a }')
        fi
    done
    [ -n "$best" ] || { echo "-"; return; }
    awk -v a="$pc" -v b="$best" -v d="${BETTER[$row]}" 'BEGIN {
        if (b > 0) printf "%.2f× %s", a / b, (d == "up") ? "(higher is better)" : "(lower is better)"; else print "-" }'
}

CPU_MODEL=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
echo "Side-by-side, $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs ($CPU_MODEL), ${DUR} s per scenario, $CONNS connections; proxy on CPU $PROXY_CPU, load and origin on CPU $LOAD_CPU; \`benches/compare/run.sh${ARGS_SEEN:+ $ARGS_SEEN}\` took ${ELAPSED} s in all."
echo
echo "| scenario | nginx $(nginx -v 2>&1 | sed 's#.*nginx/##') | HAProxy $(haproxy -v 2>/dev/null | awk 'NR == 1 { sub(/-.*/, "", $3); print $3 }') | Caddy $(caddy version 2>/dev/null | awk '{ print $1 }' | sed 's/^v//') | portcullis | portcullis / best peer |"
echo "|---|---:|---:|---:|---:|---:|"
for row in "${ROWS[@]}"; do
    line="| ${ROWNAME[$row]} |"
    for p in nginx haproxy caddy portcullis; do
        line="$line ${CELL["$row|$p"]:--} |"
    done
    echo "$line $(ratio "$row") |"
done
if [ ${#NOTES[@]} -gt 0 ]; then
    echo
    for n in "${NOTES[@]}"; do echo "- $n"; done
fi
