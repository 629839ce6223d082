#!/bin/sh
# The image's one entrypoint: the first argument is the role this container plays.
#   migrate        apply database migrations, then import LIMITER_IMPORT_CONFIG's files if set
#   gateway        the API gateway, admin and pages (uvicorn, GATEWAY_WORKERS processes)
#   worker         Celery worker (ledger drain, roll-ups, quota alerts, SGLang scraping)
#   beat           Celery beat: exactly one in the whole deployment
#   simulator      the SGLang simulator (no GPU) on port 8000, a stand-in for SGLang
#   launch-sglang  SGLang as config/sglang_korean.yaml describes it (an image with SGLang)
#   preflight      manage.py check --deploy against the database (exit 1 on errors)
#   manage ARGS    any manage.py command
# Each server replaces this shell (exec): it becomes the container's PID 1 and gets the
# orchestrator's SIGTERM itself, so the gateway finishes its streams and the worker its task.
set -eu
cd "${LIMITER_HOME:-/app}"
PYTHON=${PYTHON:-python}
role=${1:-gateway}
[ "$#" -gt 0 ] && shift
# The health check (deploy/docker/probe.py) asks what this container is.
echo "$role" > "${TMPDIR:-/tmp}/limiter-role" 2>/dev/null || true

case "$role" in
  migrate)
    "$PYTHON" manage.py migrate --no-input
    if [ -n "${LIMITER_IMPORT_CONFIG:-}" ]; then
      # Word splitting is wanted: a space-separated list of files, applied in order.
      # shellcheck disable=SC2086
      "$PYTHON" manage.py import_config $LIMITER_IMPORT_CONFIG
    fi
    ;;
  gateway)
    workers=${GATEWAY_WORKERS:-1}
    if [ "$workers" -gt 1 ]; then
      # Several processes in one container sum their metrics through files here, emptied now.
      export PROMETHEUS_MULTIPROC_DIR="${PROMETHEUS_MULTIPROC_DIR:-${TMPDIR:-/tmp}/prometheus}"
      rm -rf "$PROMETHEUS_MULTIPROC_DIR" && mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
    fi
    # uvicorn, not Daphne: it hands the body over as it arrives (README, "Server").
    # --timeout-graceful-shutdown lets running streams finish within the orchestrator's grace.
    exec "$PYTHON" -m uvicorn --host "${GATEWAY_HOST:-0.0.0.0}" --port "${GATEWAY_PORT:-8080}" \
      --workers "$workers" --lifespan on --no-server-header \
      --proxy-headers --forwarded-allow-ips "${FORWARDED_ALLOW_IPS:-127.0.0.1}" \
      --timeout-graceful-shutdown "${GATEWAY_GRACEFUL_SECONDS:-50}" \
      "$@" limiter_site.asgi:application
    ;;
  worker)
    exec "$PYTHON" -m celery --quiet -A limiter_site worker --loglevel "${CELERY_LOG_LEVEL:-INFO}" \
      --concurrency "${CELERY_CONCURRENCY:-2}" --hostname "worker@%h" "$@"
    ;;
  beat)
    # The schedule's state lives in a writable directory (the image's root is read-only).
    exec "$PYTHON" -m celery --quiet -A limiter_site beat --loglevel "${CELERY_LOG_LEVEL:-INFO}" \
      --schedule "${TMPDIR:-/tmp}/celerybeat-schedule" "$@"
    ;;
  simulator)
    exec "$PYTHON" manage.py simulate_sglang --host "${SIMULATOR_HOST:-0.0.0.0}" \
      --port "${SIMULATOR_PORT:-8000}" "$@"
    ;;
  launch-sglang)
    # No Django here: the SGLang image has SGLang's Python, not the gateway's packages.
    exec "$PYTHON" -m gateway.sglang_launch --config "${SGLANG_CONFIG:-config/sglang_korean.yaml}" \
      --host "${SGLANG_HOST:-0.0.0.0}" --port "${SGLANG_PORT:-30000}" --exec "$@"
    ;;
  preflight)
    exec "$PYTHON" manage.py check --deploy --database default "$@"
    ;;
  manage)
    exec "$PYTHON" manage.py "$@"
    ;;
  *)
    echo "unknown role: $role (migrate, gateway, worker, beat, simulator, launch-sglang, preflight, manage)" >&2
    exit 64
    ;;
esac
