#!/usr/bin/env bash
# Set up and run the whole test suite. Extra arguments go to pytest (e.g. -m "not slow", -x).
# The browser tests need Debian's chromium at /usr/bin/chromium (apt-get install -y chromium);
# as root on Debian/Ubuntu this script installs it, otherwise it tells you and the tests fail.
#
#   NANOCHAT_DATA=../shared/data bash runs/test.sh      # the README's command, from the repository root
#   SKIP_SETUP=1 bash runs/test.sh -x                   # use the current Python as it is: install nothing
set -euo pipefail
# A relative NANOCHAT_DATA / NANOCHAT_BASE_DIR means "from where you typed the command": made
# absolute here, once, before anything changes directory (the tests run scripts from temp folders).
abspath() { case "$1" in /*) printf '%s\n' "$1" ;; *) if [ -d "$1" ]; then (cd "$1" && pwd); else printf '%s\n' "$PWD/$1"; fi ;; esac; }
if [ -n "${NANOCHAT_DATA:-}" ]; then export NANOCHAT_DATA="$(abspath "$NANOCHAT_DATA")"; fi
if [ -n "${NANOCHAT_BASE_DIR:-}" ]; then export NANOCHAT_BASE_DIR="$(abspath "$NANOCHAT_BASE_DIR")"; fi
cd "$(dirname "$0")/.."
if [ "${SKIP_SETUP:-0}" != "1" ] && [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null
    else
        echo "warning: /usr/bin/chromium is missing; the web UI tests will fail (sudo apt-get install chromium)" >&2
    fi
fi
if [ "${SKIP_SETUP:-0}" != "1" ]; then
    bash runs/setup.sh
    . .venv/bin/activate
fi
if [ -z "${NANOCHAT_DATA:-}" ] && [ -d ../shared/data ]; then
    export NANOCHAT_DATA="$(cd ../shared/data && pwd)"
fi
set +e
python -m pytest "$@"
rc=$?
set -e
if [ $rc -eq 5 ]; then
    echo "error: pytest collected no tests" >&2
    exit 1
fi
exit $rc
