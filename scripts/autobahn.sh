#!/usr/bin/env bash
# WebSocket conformance: runs the Autobahn testsuite's fuzzingclient (cases
# 1-7, 9 and 10) against the test-only echo endpoint of examples/echo_server.rs
# (`--features test-echo`) and compares every case's behaviour with
# tests/autobahn/expected.json. Fails on any difference and on an empty result.
#
#   scripts/autobahn.sh            run and compare
#   scripts/autobahn.sh --update   run and rewrite tests/autobahn/expected.json
#
# The suite is Python 2 only. Its virtualenv lives in .venv-autobahn/ and is
# created once (about 35 s, see ../shared/TESTING.md), then reused. Reports go
# to target/autobahn/.
set -euo pipefail
cd "$(dirname "$0")/.."

update=false
case "${1:-}" in
    --update) update=true ;;
    "") ;;
    *)
        echo "usage: $0 [--update]" >&2
        exit 2
        ;;
esac

root=$PWD
venv=$root/.venv-autobahn
python2=${HERALD_PYTHON2:-$HOME/.pyenv/versions/2.7.18/bin/python}
target=$(realpath -m "${CARGO_TARGET_DIR:-target}")
out=$target/autobahn
# Only one cargo at a time on a shared machine.
lock=/tmp/herald-cargo.lock

suite_works() {
    # `wstest --help` works even when the install is broken; importing does not.
    "$venv/py2/bin/python" -c 'import automat, autobahntestsuite.wstest' >/dev/null 2>&1
}

if ! suite_works; then
    echo "autobahn: installing autobahntestsuite into .venv-autobahn/"
    rm -rf "$venv"
    python3 -m venv "$venv/tools"
    # virtualenv 20.22 and later cannot create Python 2.7 environments.
    "$venv/tools/bin/pip" install --quiet --disable-pip-version-check 'virtualenv==20.21.1'
    "$venv/tools/bin/virtualenv" --quiet --app-data "$venv/appdata" --no-periodic-update \
        -p "$python2" "$venv/py2"
    "$venv/py2/bin/pip" install --quiet --disable-pip-version-check --no-python-version-warning \
        -c tests/autobahn/constraints.txt autobahntestsuite==25.10.1
    if ! suite_works; then
        echo "autobahn: the testsuite does not import; see $venv" >&2
        exit 1
    fi
fi
# The virtualenv ignores itself, whatever the repository's .gitignore says.
[ -f "$venv/.gitignore" ] || printf '*\n' >"$venv/.gitignore"

# A debug build: it shares the dependencies `cargo test` built, and case 9
# still takes under a second a case.
flock "$lock" cargo build --quiet --example echo_server --features test-echo

rm -rf "$out"
mkdir -p "$out"
"$target/debug/examples/echo_server" >"$out/server.out" 2>"$out/server.log" &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true' EXIT

addr=
for _ in $(seq 100); do
    addr=$(sed -n 's/^LISTENING //p' "$out/server.out")
    [ -n "$addr" ] && break
    if ! kill -0 "$server" 2>/dev/null; then
        echo "autobahn: the echo server exited; see $out/server.log" >&2
        exit 1
    fi
    sleep 0.1
done
if [ -z "$addr" ]; then
    echo "autobahn: the echo server did not print LISTENING" >&2
    exit 1
fi

cat >"$out/spec.json" <<SPEC
{
    "outdir": "$out/reports",
    "servers": [{"agent": "herald", "url": "ws://$addr/echo"}],
    "cases": ["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "9.*", "10.*"],
    "exclude-cases": [],
    "exclude-agent-cases": {}
}
SPEC

# wstest exits 0 whatever happens, even when it cannot connect: the verdict
# comes from index.json alone.
"$venv/py2/bin/wstest" -m fuzzingclient -s "$out/spec.json" >"$out/wstest.log" 2>&1 || true

args=("$out/reports/index.json" tests/autobahn/expected.json)
if $update; then
    args+=(--update)
fi
python3 tests/autobahn/compare.py "${args[@]}"
