"""The admin pages that bring the layers together: a user's page (keys, plan and overrides,
usage), a key's usage, the user list, the index's way out to the console and the portal, lists
edited one item per line, and Korean throughout."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from accounts.models import ApiKey
from accounts.services import create_api_key
from gateway.models import ServedModel
from quotas.admin import PlanForm, UserQuotaForm
from quotas.models import Plan, UsageRecord, UserQuota
from quotas.services import default_plan, set_user_quota
from telemetry.rollups import local_zone

pytestmark = pytest.mark.django_db

EN = {"accept-language": "en"}
KO = {"accept-language": "ko"}
# session, user, the groups filter, the count, the full count, the page of users (plan joined,
# active keys as a subquery).
USER_LIST_QUERIES = 6
# session, user, the user, Django's own (groups and permissions, twice each), the quota inline
# (quota, plans for its selects), the keys, the limits (quota with plan), the usage (watermark,
# report) and the inline's user and plan.
USER_PAGE_QUERIES = 16


def today_start() -> datetime:
    return timezone.localtime(timezone.now(), local_zone()).replace(
        hour=0, minute=0, second=0, microsecond=0
    )


def spend(user: User, key: ApiKey | None, at: datetime, prompt: int, n: int) -> None:
    UsageRecord.objects.create(
        request_id=f"req-{user.pk}-{n}",
        user=user,
        api_key=key,
        model="m",
        endpoint="chat/completions",
        prompt_tokens=prompt,
        completion_tokens=0,
        status_code=200,
        started_at=at,
        finished_at=at,
    )


@pytest.fixture
def customer() -> User:
    """A user with three keys, a per-user override and usage today, 3, 20 and 40 days ago."""
    user = User.objects.create_user("이용자")
    set_user_quota(user, default_plan(), actor=None, tokens_per_minute=1234)
    keys = [create_api_key(user, actor=None, name=f"키{n}")[0] for n in range(3)]
    ApiKey.objects.filter(pk=keys[2].pk).update(revoked_at=timezone.now())
    start = today_start()
    now = timezone.now()
    spend(user, keys[0], start + (now - start) / 2, 1_000, 1)
    spend(user, keys[1], start - timedelta(days=3), 20_000, 2)
    spend(user, keys[0], start - timedelta(days=20), 300_000, 3)
    spend(user, keys[0], start - timedelta(days=40), 4_000_000, 4)
    return user


def user_url(user: User) -> str:
    return reverse("admin:auth_user_change", args=[user.pk])


def table(page: str, element_id: str) -> str:
    match = re.search(rf'<table class="admin-summary" id="{element_id}">(.*?)</table>', page, re.S)
    assert match, element_id
    return match.group(1)


def rows(html: str) -> list[list[str]]:
    return [
        [
            re.sub(r"<[^>]+>", "", cell).strip()
            for cell in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", r, re.S)
        ]
        for r in re.findall(r"<tr>(.*?)</tr>", html, re.S)
    ]


def test_a_users_page_shows_keys_limits_and_usage(admin_client: Client, customer: User) -> None:
    page = admin_client.get(user_url(customer), headers=EN).content.decode()

    keys = rows(table(page, "user-keys"))
    assert keys[0] == ["state", "prefix", "name", "last used", "expires"]
    assert sorted((r[0], r[2]) for r in keys[1:]) == [
        ("active", "키0"),
        ("active", "키1"),
        ("revoked", "키2"),
    ]
    for key in customer.api_keys.all():
        assert reverse("admin:accounts_apikey_change", args=[key.pk]) in page
    limits = {r[0]: r[1] for r in rows(table(page, "user-limits"))}
    assert limits["tokens per minute"] == "1,234 (plan: 8,000)"
    assert limits["tokens per day"] == "1,000,000"
    assert 'id="user-plan"' in page and default_plan().name in page
    usage = {r[0]: r[1:] for r in rows(table(page, "user-usage"))[1:]}
    # requests, prompt, completion, total, rate limited, errors
    assert usage["today"] == ["1", "1,000", "0", "1,000", "0", "0"]
    assert usage["7 days"][3] == "21,000"
    assert usage["30 days"][3] == "321,000"  # the row 40 days ago is outside


def test_a_keys_page_shows_its_own_usage(admin_client: Client, customer: User) -> None:
    first = customer.api_keys.get(name="키0")
    second = customer.api_keys.get(name="키1")

    def usage(key: ApiKey) -> dict[str, list[str]]:
        page = admin_client.get(
            reverse("admin:accounts_apikey_change", args=[key.pk]), headers=EN
        ).content.decode()
        return {r[0]: r[1:] for r in rows(table(page, "key-usage"))[1:]}

    assert usage(first)["today"][3] == "1,000"
    assert usage(first)["30 days"][3] == "301,000"
    assert usage(second)["today"][3] == "0"
    assert usage(second)["7 days"][3] == "20,000"


@pytest.mark.parametrize("count", [1, 30])
def test_the_user_list_shows_plan_and_active_keys_at_a_fixed_cost(
    admin_client: Client, count: int, django_assert_num_queries: Callable[..., Any]
) -> None:
    plan = Plan.objects.create(name="프로")
    for n in range(count):
        user = User.objects.create_user(f"사람{n:02d}")
        if n % 2:
            set_user_quota(user, plan, actor=None)
        for _ in range(n % 3):
            create_api_key(user, actor=None)

    with django_assert_num_queries(USER_LIST_QUERIES):
        response = admin_client.get("/admin/auth/user/", {"q": "사람"}, headers=EN)

    page = response.content.decode()
    plans = re.findall(r'<td class="field-plan_name">([^<]*)</td>', page)
    keys = re.findall(r'<td class="field-key_count">([^<]*)</td>', page)
    assert len(plans) == len(keys) == count
    names = re.findall(r'<th class="field-username"><a[^>]*>([^<]*)</a>', page)
    expected = {
        f"사람{n:02d}": ("프로" if n % 2 else "(default)", str(n % 3)) for n in range(count)
    }
    assert dict(zip(names, zip(plans, keys, strict=True), strict=True)) == expected


def test_the_user_page_costs_a_fixed_number_of_queries(
    admin_client: Client, customer: User, django_assert_num_queries: Callable[..., Any]
) -> None:
    admin_client.get(user_url(customer))  # Django's content-type cache, once a process
    for n in range(10):
        create_api_key(customer, actor=None)
        spend(customer, None, timezone.now() - timedelta(days=n), 1, 100 + n)

    with django_assert_num_queries(USER_PAGE_QUERIES):
        response = admin_client.get(user_url(customer))

    assert response.status_code == 200


# --- Lists, one item per line -------------------------------------------------------------------


def test_plan_lists_are_edited_one_per_line_and_round_trip() -> None:
    plan = Plan.objects.create(
        name="목록", allowed_models=["korean-qwen", "m:legal-ko"], extra_request_fields=[]
    )
    shown = PlanForm(instance=plan)
    assert shown["allowed_models"].value() == ["korean-qwen", "m:legal-ko"]
    assert "korean-qwen\nm:legal-ko</textarea>" in str(shown["allowed_models"])

    data = {
        **{name: shown[name].value() for name in shown.fields},
        "allowed_models": "\n  korean-qwen \r\n\r\nm:legal-ko\nkorean-qwen\n",
        "extra_request_fields": "ignore_eos\n",
        "priority": "",
    }
    form = PlanForm(data, instance=plan)
    assert form.is_valid(), form.errors
    assert form.changed_data == ["extra_request_fields"]
    form.save()
    plan.refresh_from_db()
    assert plan.allowed_models == ["korean-qwen", "m:legal-ko"]
    assert plan.extra_request_fields == ["ignore_eos"]

    empty = PlanForm({**data, "allowed_models": "\n \n"}, instance=plan)
    assert empty.is_valid() and empty.cleaned_data["allowed_models"] == []


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('"korean-qwen", "other"', "Line 1"),
        ("korean qwen", "not one name"),
        ("ok\n" + "x" * 301, "Line 2 is longer than 300 characters"),
    ],
)
def test_a_bad_line_is_refused_in_words(text: str, words: str) -> None:
    from django.utils import translation

    with translation.override("en"):
        form = PlanForm({"name": "나쁜", "allowed_models": text}, instance=Plan())
        assert not form.is_valid()
        assert words in str(form.errors["allowed_models"])


def test_a_pasted_json_list_is_taken_as_its_items() -> None:
    form = PlanForm({"name": "붙여넣기", "allowed_models": '["a", "b:c"]'}, instance=Plan())
    form.is_valid()
    assert form.cleaned_data["allowed_models"] == ["a", "b:c"]


def test_a_users_own_list_blank_means_the_plans() -> None:
    user = User.objects.create_user("상속")
    quota = UserQuota.objects.create(user=user, plan=default_plan(), allowed_models=["m"])
    base = {"plan": quota.plan.pk, "description": ""}

    blank = UserQuotaForm({**base, "allowed_models": "\n"}, instance=quota)
    own = UserQuotaForm({**base, "allowed_models": "m\nn"}, instance=quota)

    assert blank.is_valid() and blank.cleaned_data["allowed_models"] is None
    assert own.is_valid() and own.cleaned_data["allowed_models"] == ["m", "n"]


def test_served_model_aliases_adapters_and_servers_round_trip(admin_client: Client) -> None:
    model = ServedModel.objects.create(
        name="base", aliases=["a1", "a2"], lora_adapters=["law"],
        more_upstream_urls=["http://s2:8000"],
    )  # fmt: skip
    url = reverse("admin:gateway_servedmodel_change", args=[model.pk])
    page = admin_client.get(url).content.decode()
    assert "a1\na2</textarea>" in page and "law</textarea>" in page
    assert "http://s2:8000</textarea>" in page
    form = admin_client.get(url).context["adminform"].form
    # `is not`: a value of 0 (the prompt token offset) must be posted; 0 == False.
    data = {
        n: form[n].value()
        for n in form.fields
        if form[n].value() is not None and form[n].value() is not False
    }
    data.update({"aliases": "a1\n\na3\n", "lora_adapters": "law\nmed\n", "korean_factor": "",
                 "more_upstream_urls": "http://s2:8000/v1/\n\nhttp://s3:8000\n"})  # fmt: skip
    # The self-check history inline (read-only) still posts its management form.
    data.update({"tokenizer_checks-TOTAL_FORMS": "0", "tokenizer_checks-INITIAL_FORMS": "0"})

    response = admin_client.post(url, data)

    assert response.status_code == 302, response.content.decode()[:2000]
    model.refresh_from_db()
    assert model.aliases == ["a1", "a3"] and model.lora_adapters == ["law", "med"]
    assert model.more_upstream_urls == ["http://s2:8000", "http://s3:8000"]


# --- The index and Korean -----------------------------------------------------------------------


def test_the_index_links_to_the_console_and_the_portal(admin_client: Client) -> None:
    page = admin_client.get("/admin/", headers=EN).content.decode()

    assert f'href="{reverse("portal:console")}" id="link-console"' in page
    assert f'href="{reverse("portal:usage")}" id="link-portal"' in page
    assert "/static/portal/admin.css" in page
    assert "Token Limiter administration" in page


ENGLISH_LEFTOVERS = re.compile(
    r">\s*(Token Limiter administration|Beyond the admin|Operator console|Usage portal|"
    r"started \(KST\)|status|prompt|completion|cached|total|latency|refused by|rate limited|"
    r"tokens per hour|state|active|Revoke key|usage|today|7 days|30 days|requests|history)\s*<"
)


@pytest.mark.parametrize("page", ["index", "ledger", "key"])
def test_the_admin_speaks_korean(admin_client: Client, customer: User, page: str) -> None:
    key = customer.api_keys.get(name="키0")
    UsageRecord.objects.create(
        request_id="req-ko", user=customer, api_key=key, model="m", endpoint="chat/completions",
        status_code=429, error_type="tokens_per_hour", started_at=timezone.now(),
        finished_at=timezone.now(),
    )  # fmt: skip
    url = {
        "index": "/admin/",
        "ledger": "/admin/quotas/usagerecord/",
        "key": reverse("admin:accounts_apikey_change", args=[key.pk]),
    }[page]

    html = admin_client.get(url, headers=KO).content.decode()

    assert 'lang="ko"' in html
    assert "토큰 리미터 관리" in html
    assert not ENGLISH_LEFTOVERS.findall(html)


def test_every_app_on_the_korean_index_has_a_korean_name(admin_client: Client) -> None:
    html = admin_client.get("/admin/", headers=KO).content.decode()
    names = re.findall(r'class="section"[^>]*>([^<]+)</a>', html)
    # Ours, django-axes' (accounts.apps.LoginLockoutsConfig) and Django's own.
    assert len(names) >= 6, names
    assert [name for name in names if not re.search("[가-힣]", name)] == []
