#!/bin/sh
# Check and unit-test the Prometheus alert rules for portcullis.
#
#   deploy/prometheus/run-tests.sh        (from anywhere)
#
# Needs promtool (Prometheus 2.x or 3.x). Exit status is non-zero if promtool
# is missing, a rule is invalid or a test fails.
set -eu

dir=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)
PROMTOOL=${PROMTOOL:-promtool}

if ! command -v "$PROMTOOL" >/dev/null 2>&1; then
    cat >&2 <<'MSG'
run-tests.sh: promtool not found (set PROMTOOL=/path/to/promtool to use another).
Install it with one of:
  Debian/Ubuntu:  sudo apt-get install prometheus      (ships /usr/bin/promtool)
  macOS:          brew install prometheus
  any Linux:      download prometheus-*.linux-amd64.tar.gz from
                  https://prometheus.io/download/ and put promtool on PATH
MSG
    exit 127
fi

echo "== $PROMTOOL check rules"
"$PROMTOOL" check rules "$dir/portcullis-rules.yml"
echo "== $PROMTOOL test rules"
"$PROMTOOL" test rules "$dir/portcullis-rules.test.yml"
echo "portcullis alert rules: OK"
