#!/usr/bin/env bash
# Lint and type-check: ruff over the code, tests, scripts and benchmarks, mypy over the
# packages (configuration in pyproject.toml).  Runs both, then exits non-zero when either
# found anything.  Needs the [test] extras in .venv (scripts/setup-env.sh test).
set -uo pipefail
cd "$(dirname "$0")/.."

rc=0
echo "ruff check pacs adapters tests scripts bench"
.venv/bin/ruff check --output-format concise pacs adapters tests scripts bench || rc=1
echo "mypy pacs adapters"
.venv/bin/mypy pacs adapters || rc=1
exit "$rc"
