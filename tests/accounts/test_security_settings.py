"""Production switches: `check --deploy` is clean behind TLS, hosts are never a wildcard by
default, and the admin login locks out after repeated failures."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client

from accounts.checks import check_allowed_hosts
from tests.procs import ROOT

PRODUCTION = {
    "DEBUG": "0",
    "SECRET_KEY": "k3y-" + "x9Qf2LmZ7vB4nR8tW1yP6sD0" * 3,
    "ALLOWED_HOSTS": "limiter.example.com",
    "DATABASE_URL": "sqlite:////tmp/unused-check-deploy.sqlite3",
}


def check_deploy(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("DEBUG", "ALLOWED_HOSTS", "HTTPS")}
    return subprocess.run(
        # The security checks: the project's own deploy checks (upstreams, Redis, static files:
        # tests/deploy/test_preflight_checks.py) ask for a running stack.
        [
            sys.executable,
            "manage.py",
            "check",
            "--deploy",
            "--tag",
            "security",
            "--fail-level",
            "WARNING",
        ],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_check_deploy_is_clean_behind_tls() -> None:
    result = check_deploy({**PRODUCTION, "HTTPS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNINGS" not in result.stdout + result.stderr


def test_without_the_tls_switch_check_deploy_names_what_is_missing() -> None:
    result = check_deploy(PRODUCTION)
    assert result.returncode != 0
    for warning in ("security.W004", "security.W008", "security.W012", "security.W016"):
        assert warning in result.stdout + result.stderr


def test_production_needs_its_own_host_names(settings: Any) -> None:
    settings.DEBUG = False
    settings.ALLOWED_HOSTS = []
    assert [m.id for m in check_allowed_hosts(None)] == ["accounts.E002"]
    settings.ALLOWED_HOSTS = ["*"]
    assert [m.id for m in check_allowed_hosts(None)] == ["accounts.W001"]
    settings.ALLOWED_HOSTS = ["limiter.example.com"]
    assert check_allowed_hosts(None) == []


def test_the_default_host_list_is_never_a_wildcard() -> None:
    script = (
        "import django, os\n"
        "os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'limiter_site.settings')\n"
        "django.setup()\n"
        "from django.conf import settings\n"
        "print(settings.ALLOWED_HOSTS)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "ALLOWED_HOSTS"}
    for debug, expected in (("1", "['localhost', '127.0.0.1', '[::1]']"), ("0", "[]")):
        result = subprocess.run(
            [sys.executable, "-c", script],
            cwd=ROOT,
            env={**env, "DEBUG": debug},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.stdout.strip() == expected, result.stderr


@pytest.mark.django_db
def test_the_admin_login_locks_out_after_repeated_failures() -> None:
    User.objects.create_superuser("관리자", password="the-right-password-9")
    client = Client(REMOTE_ADDR="203.0.113.7")
    for _ in range(5):
        response = client.post(
            "/admin/login/", {"username": "관리자", "password": "wrong"}, follow=False
        )
        assert response.status_code in (200, 429)
    locked = client.post(
        "/admin/login/", {"username": "관리자", "password": "the-right-password-9"}
    )
    assert locked.status_code == 429
    assert "_auth_user_id" not in client.session
    # Another address is not locked out by this one's failures.
    other = Client(REMOTE_ADDR="198.51.100.2")
    response = other.post(
        "/admin/login/", {"username": "관리자", "password": "the-right-password-9"}
    )
    assert response.status_code == 302 and "_auth_user_id" in other.session


def test_an_old_secret_key_still_verifies_while_it_is_a_fallback() -> None:
    """Rotation (docs/operations.md): what the old key signed stays valid while it is listed."""
    old, new = "old-" + "a1B2c3D4" * 8, "new-" + "e5F6g7H8" * 8
    script = (
        "import django, sys; django.setup(); from django.core import signing; "
        "print(signing.loads(sys.argv[1]))"
    )
    signed = subprocess.run(
        [sys.executable, "-c", "import django; django.setup(); from django.core import signing;"
         " print(signing.dumps('session'))"],
        cwd=ROOT, env={**os.environ, **PRODUCTION, "SECRET_KEY": old,
                       "DJANGO_SETTINGS_MODULE": "limiter_site.settings"},
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.strip()  # fmt: skip
    for fallbacks, expected in ((old, 0), ("", 1)):
        result = subprocess.run(
            [sys.executable, "-c", script, signed], cwd=ROOT,
            env={**os.environ, **PRODUCTION, "SECRET_KEY": new, "SECRET_KEY_FALLBACKS": fallbacks,
                 "DJANGO_SETTINGS_MODULE": "limiter_site.settings"},
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode == expected, result.stderr
