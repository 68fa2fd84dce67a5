#!/usr/bin/env bash
# Validates helm/herald and deploy/ offline: chart lint and schema, rendered
# manifests against the Kubernetes 1.30 and 1.34 schemas, security and
# rollout properties, the compose file, the dashboard and alerts (against a
# live herald's /metrics), and the Dockerfile.
#
# The Python tools live in .venv-deploy/, created on the first run (about
# 75 MB to download) and reused while tests/deploy/requirements.txt is
# unchanged. The live tests run $HERALD_BIN (default target/debug/herald), so
# build herald first. Extra arguments go to pytest, e.g. -k lint.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv-deploy
requirements=tests/deploy/requirements.txt
python=${PYTHON:-python3}
stamp="$venv/.requirements.sha256"
want=$(sha256sum "$requirements" | cut -d' ' -f1)

if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "test-deploy: installing the Python tools into $venv"
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -r "$requirements"
    "$venv/bin/python" -m pip check
    echo "$want" >"$stamp"
fi

# promtool checks and unit-tests the alert rules. It is not on PyPI; take it
# from Debian's prometheus package, unpacked into the virtualenv (nothing is
# installed system-wide). Without apt, the promtool tests are skipped.
fetch_promtool() {
    (cd "$1" && apt-get download -qq prometheus >/dev/null 2>&1)
}
if [ ! -x "$venv/bin/promtool" ] && command -v apt-get >/dev/null 2>&1; then
    tmp=$(mktemp -d)
    # A fresh machine may have no package lists yet; refresh them as root.
    if fetch_promtool "$tmp" || { [ "$(id -u)" = 0 ] && apt-get update -qq && fetch_promtool "$tmp"; }; then
        dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/root"
        install -m 0755 "$tmp/root/usr/bin/promtool" "$venv/bin/promtool"
    else
        echo "test-deploy: apt-get download prometheus failed (run apt-get update?); promtool tests will be skipped"
    fi
    rm -rf "$tmp"
fi

export PATH="$PWD/$venv/bin:$PATH"
export PYTHONDONTWRITEBYTECODE=1
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/deploy "$@"
