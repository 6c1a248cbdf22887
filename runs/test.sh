#!/usr/bin/env bash
# Set up and run the whole test suite. Extra arguments go to pytest (e.g. -m "not slow", -x).
# The browser tests need Debian's chromium at /usr/bin/chromium (apt-get install -y chromium);
# as root on Debian/Ubuntu this script installs it, otherwise it tells you and the tests fail.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null
    else
        echo "warning: /usr/bin/chromium is missing; the web UI tests will fail (sudo apt-get install chromium)" >&2
    fi
fi
bash runs/setup.sh
. .venv/bin/activate
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
