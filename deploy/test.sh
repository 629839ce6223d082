#!/usr/bin/env bash
# The whole test suite (the command README.md gives and .ci/run calls).
# Postgres/Redis tests run when DATABASE_URL / REDIS_URL point at them; with CI=true they must.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/bootstrap.sh
# Checkov (Kubernetes policies for the Helm chart, tests/deploy) in an environment of its own:
# its pinned dependencies would downgrade the project's.
CHECKOV_VERSION=3.3.30
if [ ! -f ".venv-checkov/.installed-$CHECKOV_VERSION" ]; then
  rm -rf .venv-checkov
  "${PYTHON:-python3}" -m venv .venv-checkov
  .venv-checkov/bin/python -m pip install --quiet "checkov==$CHECKOV_VERSION"
  touch ".venv-checkov/.installed-$CHECKOV_VERSION"
fi
export DEBUG=1
exec .venv/bin/python -m pytest "$@"
