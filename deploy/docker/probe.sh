#!/bin/sh
# Kubernetes exec probes and the image's HEALTHCHECK call this: see probe.py.
exec "${PYTHON:-python}" "${LIMITER_HOME:-/app}/deploy/docker/probe.py" "$@"
