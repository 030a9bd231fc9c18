#!/bin/sh
# Installs what the tests need (Debian packages) and runs every test:
# the Rust unit and integration tests (ACME ones against a real Pebble),
# and the Prometheus alert-rule tests.
# Used as is by CI (.ci/run). Safe to run again; installs only what is missing.
set -eu
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

missing=""
command -v openssl >/dev/null 2>&1 || missing="$missing openssl"
command -v promtool >/dev/null 2>&1 || missing="$missing prometheus"
# Pebble (Let's Encrypt's test CA) and its fake DNS, for tests/acme.rs.
{ command -v pebble && command -v pebble-challtestsrv; } >/dev/null 2>&1 || missing="$missing pebble"
if [ -n "$missing" ]; then
    echo "installing:$missing"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
    # The prometheus package may start a server; the tests only need promtool.
    $SUDO pkill -x prometheus 2>/dev/null || true
fi

echo "== alert rules (promtool)"
sh deploy/prometheus/run-tests.sh

echo "== cargo test"
cargo test --all-targets --no-fail-fast
