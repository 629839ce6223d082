"""Container health probe: `python deploy/docker/probe.py [live|ready]`, exit 0 when healthy.

Standard library only and no Django, so a probe every few seconds costs milliseconds. What is
probed depends on the role the entrypoint wrote to $TMPDIR/limiter-role:
- gateway: GET /health (live) or /health/ready with the monitoring token (ready: 200 means
  serving; 503 while starting or without database, Redis or any upstream);
- simulator: GET /health;
- worker: its Celery process answers a ping over the broker (`celery inspect ping`);
- beat, migrate, launch-sglang (SGLang has its own /health, probed by the orchestrator): up.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

TIMEOUT = 5.0


def http_ok(port: str, path: str, token: str = "") -> bool:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def worker_ok() -> bool:
    host = os.uname().nodename
    command = [sys.executable, "-m", "celery", "-A", "limiter_site", "inspect", "ping"]
    result = subprocess.run(
        [*command, "--destination", f"worker@{host}", "--timeout", "5"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    return result.returncode == 0


def healthy(role: str, what: str) -> bool:
    if role == "gateway":
        port = os.environ.get("GATEWAY_PORT", "8080")
        if what == "ready":
            return http_ok(port, "/health/ready", os.environ.get("GATEWAY_MONITORING_TOKEN", ""))
        return http_ok(port, "/health")
    if role == "simulator":
        return http_ok(os.environ.get("SIMULATOR_PORT", "8000"), "/health")
    if role == "worker":
        return worker_ok()
    return True


def main() -> int:
    what = sys.argv[1] if len(sys.argv) > 1 else "live"
    marker = Path(os.environ.get("TMPDIR", tempfile.gettempdir())) / "limiter-role"
    try:
        role = marker.read_text().strip()
    except OSError:
        role = "gateway"
    return 0 if healthy(role, what) else 1


if __name__ == "__main__":
    sys.exit(main())
