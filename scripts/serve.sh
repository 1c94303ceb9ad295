#!/usr/bin/env bash
# Install pacs into .venv and start the node on its embedded defaults
# (folder storage and SQLite under ./customer/<CUSTOMER>/).  Extra arguments go to
# `pacs serve`, e.g. scripts/serve.sh --port 11112.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-env.sh
exec .venv/bin/pacs serve "$@"
