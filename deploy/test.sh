#!/usr/bin/env bash
# The whole test suite (the command README.md gives and .ci/run calls).
# Postgres/Redis tests run when DATABASE_URL / REDIS_URL point at them; with CI=true they must.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/bootstrap.sh
export DEBUG=1
exec .venv/bin/python -m pytest "$@"
