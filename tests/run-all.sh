#!/bin/sh
# Installs what the tests need (Debian packages) and runs every test:
# the Rust unit and integration tests (ACME ones against a real Pebble),
# and the Prometheus alert-rule tests.
# Used as is by CI (.ci/run, a clean Debian clone, no stdin). Safe to run
# again: installs only what is missing, starts no service, and stops no
# process it did not start (it never kills by name).
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
    # Packages such as prometheus start a service from
    # their maintainer scripts; the tests need only the binaries. A
    # policy-rc.d that exits 101 ("action forbidden") makes invoke-rc.d
    # start nothing. Ours is removed afterwards, also on failure; one that
    # was already there is left alone.
    policy=/usr/sbin/policy-rc.d
    ours=""
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\n# written by portcullis tests/run-all.sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
        $SUDO chmod 755 "$policy"
        ours=1
        trap '$SUDO rm -f "$policy"' EXIT INT TERM
    fi
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    # shellcheck disable=SC2086 # $missing is a list of package names.
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing </dev/null >/dev/null
    if [ -n "$ours" ]; then
        $SUDO rm -f "$policy"
        trap - EXIT INT TERM
    fi
fi

echo "== alert rules (promtool)"
sh deploy/prometheus/run-tests.sh

echo "== cargo test"
cargo test --all-targets --no-fail-fast
