#!/usr/bin/env bash
# Runs every test herald has: the Rust suites (against real redis-server
# processes), the JavaScript client's tests, the browser tests (the demo page
# in Debian's Chromium, driven by playwright-core), the deployment checks (Helm
# chart, manifests, compose, dashboards, alerts), the Autobahn WebSocket
# conformance suite (Python 2.7 from pyenv, as on the project's machines) and
# a short run of every fuzz target (the nightly toolchain; cargo-fuzz is
# installed when missing). Installs what a fresh
# machine lacks, idempotently, and ends with one line: `N passed, M failed`.
set -uo pipefail
cd "$(dirname "$0")"

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}
apt_updated=
apt_install() {
    command -v apt-get >/dev/null 2>&1 || { echo "test.sh: please install $*" >&2; return 1; }
    if [ -z "$apt_updated" ]; then
        as_root apt-get update -qq && apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

command -v redis-server >/dev/null 2>&1 || { echo "test.sh: installing redis-server"; apt_install redis-server; }
python3 -m venv --help >/dev/null 2>&1 && python3 -c 'import ensurepip' 2>/dev/null \
    || { echo "test.sh: installing python3-venv"; apt_install python3-venv; }
command -v npm >/dev/null 2>&1 || { echo "test.sh: installing nodejs and npm"; apt_install nodejs npm; }
command -v openssl >/dev/null 2>&1 || { echo "test.sh: installing openssl"; apt_install openssl; }
command -v curl >/dev/null 2>&1 || { echo "test.sh: installing curl"; apt_install curl; }
[ -x /usr/bin/chromium ] || { echo "test.sh: installing chromium"; apt_install chromium; }

passed=0
failed=0
status=0
log=$(mktemp)
trap 'rm -f "$log"' EXIT

# Adds the counts a runner printed to the totals.
count() {
    local p f
    p=$(awk "$1" "$log")
    f=$(awk "$2" "$log")
    passed=$((passed + ${p:-0}))
    failed=$((failed + ${f:-0}))
}

echo "== Rust (cargo test --workspace)"
cargo test --workspace 2>&1 | tee "$log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
count '/^test result:/ { n += $4 } END { print n + 0 }' '/^test result:/ { n += $6 } END { print n + 0 }'

echo "== The test-only echo endpoint (cargo test --features test-echo --test echo)"
cargo test --features test-echo --test echo 2>&1 | tee "$log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
count '/^test result:/ { n += $4 } END { print n + 0 }' '/^test result:/ { n += $6 } END { print n + 0 }'

echo "== JavaScript client (clients/js)"
(cd clients/js && npm ci --no-audit --no-fund --loglevel=error && npm test) 2>&1 | tee "$log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
count '/^# pass / { n += $3 } END { print n + 0 }' '/^# fail / { n += $3 } END { print n + 0 }'

echo "== Browser tests (tests/browser: the demo page in Chromium against real nodes and redis-server)"
# The default build of the binary: the echo tests above built it with test-echo.
(cargo build --quiet --bin herald \
    && cd tests/browser && npm ci --no-audit --no-fund --loglevel=error \
    && HERALD_BIN=../../target/debug/herald npm test) 2>&1 | tee "$log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
count '/^# pass / { n += $3 } END { print n + 0 }' '/^# fail / { n += $3 } END { print n + 0 }'

echo "== Deployment (helm/herald, deploy/)"
HERALD_BIN=target/debug/herald bash scripts/test-deploy.sh 2>&1 | tee "$log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
count '/ passed/ { for (i = 1; i < NF; i++) if ($(i + 1) ~ /^passed/) n += $i } END { print n + 0 }' \
      '/ failed/ { for (i = 1; i < NF; i++) if ($(i + 1) ~ /^failed/) n += $i } END { print n + 0 }'

echo "== WebSocket conformance (Autobahn testsuite, cases 1-7, 9, 10)"
bash scripts/autobahn.sh 2>&1 | tee "$log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
count '/^autobahn: [0-9]+ cases, [0-9]+ differences/ { n += $2 - $4 } END { print n + 0 }' \
      '/^autobahn: [0-9]+ cases, [0-9]+ differences/ { n += $4 } END { print n + 0 }'

echo "== Fuzzing (each cargo-fuzz target for a short fixed time; the corpora replay under cargo test)"
bash scripts/fuzz.sh "${HERALD_FUZZ_SECONDS:-5}" 2>&1 | tee "$log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
count '/^fuzz: [a-z_]+: .*, ok$/ { n++ } END { print n + 0 }' '/^fuzz: [a-z_]+: .*FAILED/ { n++ } END { print n + 0 }'

if [ "$status" != 0 ] && [ "$failed" = 0 ]; then
    # A runner failed without counting a test (a build error, say).
    failed=1
fi
echo "${passed} passed, ${failed} failed"
exit "$status"
