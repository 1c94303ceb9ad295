#!/usr/bin/env bash
# Create .venv and install pacs into it (editable).  Usage: scripts/setup-env.sh [extras]
# Shared by scripts/serve.sh and scripts/test.sh so that both install the same way.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
# Debian's python3 leaves venv's pip out (ensurepip) to its python3-venv package.
if ! python3 -c "import ensurepip" >/dev/null 2>&1; then
    scripts/apt-install.sh python3-venv
fi
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
if [ -n "$extras" ]; then
    .venv/bin/python -m pip install --quiet -e ".[$extras]"
else
    .venv/bin/python -m pip install --quiet -e .
fi
