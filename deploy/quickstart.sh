#!/usr/bin/env bash
# One command for a first try on one machine: installs into .venv, migrates, imports config/,
# starts the SGLang simulator when SGLANG_URL is not set, and serves the gateway on port 8080.
# Embedded defaults: SQLite in var/, no Redis, Celery tasks run in process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/bootstrap.sh
export DEBUG=${DEBUG:-1}  # a first try: the development SECRET_KEY is accepted only with DEBUG
PY=.venv/bin/python
$PY manage.py migrate --no-input -v 0
$PY manage.py import_config config/sglang_korean.yaml config/korean_users.yaml

pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM

if [ -z "${SGLANG_URL:-}" ]; then
  echo "SGLANG_URL is not set: starting the SGLang *simulator* (no GPU) on 127.0.0.1:8000"
  $PY manage.py simulate_sglang --host 127.0.0.1 --port 8000 > var/simulator.log 2>&1 &
  pids+=($!)
  for _ in $(seq 1 100); do
    curl -sf http://127.0.0.1:8000/health > /dev/null && break
    sleep 0.2
  done
  curl -sf http://127.0.0.1:8000/health > /dev/null || { cat var/simulator.log; exit 1; }
fi

echo "Gateway: http://${GATEWAY_HOST:-127.0.0.1}:${GATEWAY_PORT:-8080}/v1  (admin: /admin/)"
# uvicorn, not Daphne: it hands the body over as it arrives, so the gateway refuses an
# oversized upload at its limit instead of after buffering all of it (README, "Server").
.venv/bin/uvicorn --host "${GATEWAY_HOST:-127.0.0.1}" --port "${GATEWAY_PORT:-8080}" \
  --lifespan on limiter_site.asgi:application &
pids+=($!)
wait "${pids[-1]}"
