#!/usr/bin/env bash
# Install pacs into .venv and start the node on its embedded defaults
# (folder storage and SQLite under ./customer/<CUSTOMER>/).  Extra arguments go to
# `pacs serve`, e.g. scripts/serve.sh --port 11112.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-env.sh
# The OHIF viewer for port 8080 (vendor/ohif/dist, quick when present); the node also runs
# without it, and says so.
scripts/fetch-ohif.sh --viewer-only || echo "serve.sh: could not fetch the OHIF viewer" >&2
exec .venv/bin/pacs serve "$@"
