# Shared by run.sh and accesslog.sh (sourced; bash). Expects `say`, `KEEP`
# and `WORK` from the caller; collects the PIDs it must stop in PIDS.

PIDS=()

# Stops one process by PID: TERM, up to 5 s, then KILL.
stop_pid() {
    local pid=$1 i
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# On exit: every started process stopped by PID, the work directory removed
# (unless KEEP=1).
cleanup() {
    local rc=$? pid
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
    if [ "$KEEP" = 1 ]; then say "work directory kept: $WORK"; else rm -rf "$WORK"; fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# GET path from 127.0.0.1:port over plain HTTP/1.0; prints the body.
http_get() { # port path
    timeout 5 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"; printf "GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n" "$2" >&3; sed "1,/^\r\{0,1\}$/d" <&3' _ "$1" "$2"
}
