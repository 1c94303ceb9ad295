#!/usr/bin/env bash
# Create .venv and install pacs into it (editable).  Usage: scripts/setup-env.sh [extras]
# Shared by scripts/serve.sh and scripts/test.sh so that both install the same way.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
if [ -n "$extras" ]; then
    .venv/bin/python -m pip install --quiet -e ".[$extras]"
else
    .venv/bin/python -m pip install --quiet -e .
fi
