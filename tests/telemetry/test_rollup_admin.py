"""The roll-up admin: read-only list, exact user search, CSV export of the selection."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse

from telemetry.models import UsageRollup

pytestmark = pytest.mark.django_db


def test_list_search_and_csv_export() -> None:
    admin = User.objects.create_superuser("관리자", "a@example.com", "pw")
    user = User.objects.create_user("한국어개발자")
    cell = UsageRollup.objects.create(
        period="day", period_start=datetime(2026, 11, 23, 15, tzinfo=UTC), user=user,
        model="Qwen/Qwen2.5-7B-Instruct", requests=3, prompt_tokens=120, completion_tokens=300,
    )  # fmt: skip
    client = Client()
    client.force_login(admin)
    url = reverse("admin:telemetry_usagerollup_changelist")
    assert client.get(url).status_code == 200
    assert client.get(url, {"q": "한국어개발자"}).context["cl"].result_count == 1
    assert client.get(url, {"q": "한국어"}).context["cl"].result_count == 0  # exact only
    response = client.post(url, {"action": "export_csv", "_selected_action": [cell.pk]})
    body = b"".join(response.streaming_content).decode("utf-8")
    assert body.startswith("\ufeff")
    assert "한국어개발자" in body and "120" in body and "300" in body
    assert client.get(reverse("admin:telemetry_usagerollup_add")).status_code == 403
