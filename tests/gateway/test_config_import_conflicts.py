"""Re-importing a config file never silently overrides what an operator changed in the admin."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
import yaml
from django.contrib.auth.models import User
from django.core.management import call_command
from django.urls import reverse
from django.utils import translation

from accounts.models import AuditEvent
from gateway.models import ConfigImport, ServedModel
from quotas.models import Plan, UserQuota
from quotas.services import set_user_quota
from tests.gateway.test_import_config import MODEL, SERVER_FILE, USERS_FILE, shipped

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def english(settings: Any) -> Iterator[None]:
    settings.DEBUG = True  # the shipped users file holds the quick-start keys
    with translation.override("en"):
        yield


def run(*args: str) -> str:
    out = StringIO()
    call_command("import_config", *args, stdout=out, stderr=StringIO())
    return out.getvalue()


def other_plan() -> Plan:
    return Plan.objects.create(name="연구팀", tokens_per_minute=99_000)


def test_imported_objects_are_marked_as_managed_by_their_file() -> None:
    run(SERVER_FILE, USERS_FILE)

    managed = {(row.kind, row.name): row.file for row in ConfigImport.objects.all()}
    assert managed[("model", MODEL)] == SERVER_FILE
    assert managed[("plan", "default")] == SERVER_FILE
    assert managed[("user", "사용자1")] == USERS_FILE
    assert managed[("api_key", "sk-user1-ko")] == USERS_FILE
    user_row = ConfigImport.objects.get(kind="user", name="사용자1")
    assert user_row.values["plan"] == "default" and user_row.values["tokens_per_minute"] == 5000


def test_a_plan_changed_in_the_admin_stays_and_the_conflict_is_reported() -> None:
    run(SERVER_FILE, USERS_FILE)
    user = User.objects.get(username="사용자1")
    set_user_quota(user, other_plan(), actor=None)  # an operator moves the user

    out = run(SERVER_FILE, USERS_FILE)

    assert UserQuota.objects.get(user=user).plan.name == "연구팀"
    assert (
        "user 사용자1: plan: changed in the admin to '연구팀', kept; the file says 'default'" in out
    )
    assert "1 conflict: the admin's value was kept" in out
    again = run(SERVER_FILE, USERS_FILE)  # reported again, still kept
    assert again.count("changed in the admin to") == 1


def test_file_wins_applies_the_files_value() -> None:
    run(SERVER_FILE, USERS_FILE)
    user = User.objects.get(username="사용자1")
    set_user_quota(user, other_plan(), actor=None)

    out = run(SERVER_FILE, USERS_FILE, "--file-wins")

    assert UserQuota.objects.get(user=user).plan.name == "default"
    assert "changed in the admin, the file wins" in out
    assert "conflict" not in run(SERVER_FILE, USERS_FILE)  # agreed again: nothing to report


def test_a_changed_file_applies_where_the_admin_did_not_touch(tmp_path: Path) -> None:
    run(SERVER_FILE, USERS_FILE)
    changed = shipped(USERS_FILE)
    changed["users"]["사용자1"]["rpm"] = 31
    path = tmp_path / "korean_users.yaml"
    path.write_text(yaml.safe_dump(changed, allow_unicode=True), encoding="utf-8")

    out = run(SERVER_FILE, str(path))

    quota = UserQuota.objects.get(user__username="사용자1")
    assert quota.requests_per_minute == 31
    assert "conflict" not in out
    assert ConfigImport.objects.get(kind="user", name="사용자1").file == str(path)


def test_a_served_model_edited_in_the_admin_keeps_its_edit() -> None:
    run(SERVER_FILE)
    ServedModel.objects.filter(name=MODEL).update(context_length=8192)

    out = run(SERVER_FILE)

    assert ServedModel.objects.get(name=MODEL).context_length == 8192
    assert f"served model {MODEL}: context_length: changed in the admin to 8192" in out


def test_dry_run_prints_the_diff_and_writes_nothing(
    django_assert_num_queries: Callable[..., Any],
) -> None:
    run(SERVER_FILE, USERS_FILE)
    user = User.objects.get(username="사용자1")
    set_user_quota(user, other_plan(), actor=None, requests_per_minute=7)
    audits = AuditEvent.objects.count()

    out = run(SERVER_FILE, USERS_FILE, "--dry-run", "--file-wins")

    quota = UserQuota.objects.get(user=user)
    assert (quota.plan.name, quota.requests_per_minute) == ("연구팀", 7)  # nothing changed
    assert AuditEvent.objects.count() == audits
    assert "user 사용자1: plan: changed in the admin, the file wins: '연구팀' → 'default'" in out
    assert "user 사용자1: requests_per_minute: changed in the admin, the file wins: 7 → 30" in out
    assert "Dry run: nothing was changed." in out


def test_a_first_import_on_a_fresh_database_lists_every_field_on_a_dry_run() -> None:
    out = run(SERVER_FILE, USERS_FILE, "--dry-run")
    assert f"served model {MODEL}: context_length: None → 32768" in out
    assert not ServedModel.objects.exists() and not ConfigImport.objects.exists()


def test_the_admin_lists_what_files_manage(admin_client: Any) -> None:
    run(SERVER_FILE, USERS_FILE)
    page = admin_client.get(reverse("admin:gateway_configimport_changelist")).content.decode()
    assert "사용자1" in page and USERS_FILE in page and SERVER_FILE in page
    # The kind filter and column speak the operator's language, not the stored codes.
    filters = admin_client.get(
        reverse("admin:gateway_configimport_changelist"), HTTP_ACCEPT_LANGUAGE="en"
    ).content.decode()
    assert "served model" in filters and "API key" in filters
    assert ">api_key<" not in filters and ">model<" not in filters
