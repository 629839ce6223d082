"""The client endpoints, by key and by session, with two users who must never see each other."""

from __future__ import annotations

import asyncio
import csv
import io
import re
import uuid
from datetime import timedelta
from typing import Any

import pytest
from django.conf import settings
from django.utils import timezone

from accounts.models import ApiKey
from api import me as me_module
from quotas.models import Plan, UsageRecord
from tests.api.conftest import Person, make_person
from tokenlimit.limiter import LimiterUnavailable, ratelimit_headers

pytestmark = pytest.mark.django_db


def ledger_row(person: Person, **fields: Any) -> UsageRecord:
    started = fields.pop("started_at", timezone.now() - timedelta(minutes=5))
    values: dict[str, Any] = {
        "request_id": uuid.uuid4().hex,
        "user": person.user,
        "api_key": person.key,
        "model": "Qwen/Qwen2.5-7B-Instruct",
        "endpoint": "chat",
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "status_code": 200,
        "started_at": started,
        "finished_at": started + timedelta(milliseconds=1500),
        **fields,
    }
    return UsageRecord.objects.create(**values)


# --- Authentication ------------------------------------------------------------------------------


def test_every_client_endpoint_needs_a_credential(client: Any) -> None:
    for path in ("me", "usage", "requests", "keys", "keys/1", "models"):
        response = client.get(f"/api/v1/{path}")
        assert response.status_code == 401, path
        assert response["WWW-Authenticate"] == 'Bearer realm="api"'
        assert response.json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize("how", ["key", "session"])
def test_every_client_endpoint_answers_by_key_and_by_session(alice: Person, how: str) -> None:
    client = alice.client() if how == "key" else alice.session()
    for path in ("me", "usage", "usage?format=csv", "requests", "keys", f"keys/{alice.key.pk}",
                 "models"):  # fmt: skip
        assert client.get(f"/api/v1/{path}").status_code == 200, path


def test_unknown_revoked_expired_and_malformed_keys_are_refused(alice: Person, client: Any) -> None:
    cases = ["Bearer sk-nope", "Bearer", "Bearer a b", "Bearer " + "x" * 300, "Bearer 키"]
    for header in cases:
        assert client.get("/api/v1/me", HTTP_AUTHORIZATION=header).status_code == 401, header
    ApiKey.objects.filter(pk=alice.key.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert alice.client().get("/api/v1/me").status_code == 401
    ApiKey.objects.filter(pk=alice.key.pk).update(expires_at=None, revoked_at=timezone.now())
    assert alice.client().get("/api/v1/me").status_code == 401


def test_an_inactive_users_key_is_refused(alice: Person) -> None:
    alice.user.is_active = False
    alice.user.save()
    assert alice.client().get("/api/v1/me").status_code == 401


def test_session_reads_and_writes_with_csrf(alice: Person) -> None:
    session = alice.session()
    me = session.get("/api/v1/me")
    assert me.status_code == 200
    assert me.json()["credential"] == {"kind": "session", "key_id": None, "key_prefix": None}
    # Without the CSRF token a logged-in browser cannot be made to create keys.
    refused = session.post("/api/v1/keys", {"name": "x"}, format="json")
    assert refused.status_code == 403
    assert refused.json()["error"]["type"] == "permission_error"
    session.get("/api/v1/keys")
    from django.middleware.csrf import _get_new_csrf_string

    token = _get_new_csrf_string()
    session.cookies[settings.CSRF_COOKIE_NAME] = token
    created = session.post("/api/v1/keys", {"name": "x"}, format="json", HTTP_X_CSRFTOKEN=token)
    assert created.status_code == 201, created.json()


# --- /me -----------------------------------------------------------------------------------------


def test_me_shows_plan_limits_and_empty_windows(alice: Person) -> None:
    body = alice.client().get("/api/v1/me").json()
    assert body["user"]["username"] == "앨리스"
    assert body["plan"]["name"] == "default"
    assert body["credential"]["kind"] == "api_key"
    assert body["credential"]["key_id"] == alice.key.pk
    assert body["time_zone"] == "Asia/Seoul"
    plan = Plan.objects.get(name="default")
    assert body["limits"]["tokens_per_day"] == plan.tokens_per_day
    [user_scope] = body["scopes"]
    windows = {w["window"]: w for w in user_scope["windows"]}
    assert windows["tokens_per_minute"]["limit"] == plan.tokens_per_minute
    assert windows["tokens_per_minute"]["used"] == 0
    assert windows["tokens_per_minute"]["remaining"] == plan.tokens_per_minute
    # Asia/Seoul, to the second; an empty window has nothing to wait for.
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+09:00", windows["tokens_per_day"]["resets_at"]
    )
    assert user_scope["in_flight"] == 0
    assert user_scope["cooldown_ends_at"] is None


def _admit(person: Person, tokens: int) -> Any:
    """Admit one request through the gateway's own limiter, as /v1/ would; returns the decision."""
    from accounts.services import hash_key
    from gateway.limits import GatewayLimiter, make_backend, shared_backend
    from quotas.services import load_key_grant

    grant = load_key_grant(hash_key(person.raw_key))
    assert grant is not None

    async def run() -> Any:
        # Embedded mode: the process's one in-memory limiter (the one /me reads); Redis: a pool
        # of this event loop's own.
        backend = make_backend() if settings.REDIS_URL else shared_backend()
        limiter = GatewayLimiter(backend)
        decision = await limiter.admit(grant, uuid.uuid4().hex, tokens, "m")
        if settings.REDIS_URL:
            await limiter.close()
        return decision

    return asyncio.run(run())


def test_me_gives_the_numbers_the_gateway_headers_give(alice: Person, bob: Person) -> None:
    _admit(alice, 300)
    decision = _admit(alice, 200)
    _admit(bob, 999)  # another user's traffic changes nothing of alice's
    headers = {k.decode(): v.decode() for k, v in ratelimit_headers(decision.state)}
    body = alice.client().get("/api/v1/me").json()
    windows = {w["window"]: w for w in body["scopes"][0]["windows"]}
    assert windows["requests_per_minute"]["used"] == 2
    assert windows["tokens_per_minute"]["used"] == 500
    assert windows["tokens_per_day"]["used"] == 500
    assert (
        str(windows["requests_per_minute"]["remaining"])
        == headers["x-ratelimit-remaining-requests"]
    )
    assert str(windows["tokens_per_minute"]["remaining"]) == headers["x-ratelimit-remaining-tokens"]
    assert (
        str(windows["tokens_per_hour"]["remaining"]) == headers["x-ratelimit-remaining-tokens-hour"]
    )
    assert (
        str(windows["tokens_per_day"]["remaining"]) == headers["x-ratelimit-remaining-tokens-day"]
    )
    assert body["scopes"][0]["in_flight"] == 2
    assert windows["tokens_per_day"]["resets_at"].endswith("T00:00:00+09:00")  # midnight, KST
    # The reset of the daily window is the same moment (midnight KST), a little later asked.
    assert 0 <= decision.state.reset_tokens_day - windows["tokens_per_day"]["reset_seconds"] < 5


def test_me_shows_a_keys_own_limits(alice: Person) -> None:
    from accounts.services import update_api_key

    update_api_key(alice.key, actor=None, name="tight", expires_at=None, tokens_per_minute=50)
    body = alice.client().get("/api/v1/me").json()
    assert [scope["scope"] for scope in body["scopes"]] == ["user", "key"]
    key_scope = body["scopes"][1]
    assert key_scope["key_id"] == alice.key.pk
    windows = {w["window"]: w for w in key_scope["windows"]}
    assert windows["tokens_per_minute"]["limit"] == 50
    # A session sees every active key that has limits of its own.
    assert [s["key_id"] for s in alice.session().get("/api/v1/me").json()["scopes"]] == [
        None,
        alice.key.pk,
    ]


def test_me_answers_503_when_the_limiter_cannot_be_read(
    alice: Person, monkeypatch: pytest.MonkeyPatch
) -> None:
    def down(scopes: Any) -> Any:
        raise LimiterUnavailable("redis down")

    monkeypatch.setattr(me_module, "read_live_state", down)
    response = alice.client().get("/api/v1/me")
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "service_unavailable"


def test_me_query_count(alice: Person, django_assert_num_queries: Any) -> None:
    client = alice.client()
    client.get("/api/v1/me")  # the default plan exists from here on
    # Key + user; quota + plan.
    with django_assert_num_queries(2):
        assert client.get("/api/v1/me").status_code == 200


# --- Keys ----------------------------------------------------------------------------------------


def test_a_created_key_is_shown_once_and_works(alice: Person) -> None:
    client = alice.client()
    created = client.post("/api/v1/keys", {"name": "노트북"}, format="json")
    assert created.status_code == 201
    body = created.json()
    raw = body["key"]
    assert raw.startswith("sk-") and body["prefix"] == raw[: len(body["prefix"])]
    assert body["state"] == "active"
    listed = client.get("/api/v1/keys").json()["results"]
    assert {k["id"] for k in listed} == {alice.key.pk, body["id"]}
    assert all("key" not in k for k in listed)
    assert raw not in client.get(f"/api/v1/keys/{body['id']}").content.decode()
    new = Person(alice.user, ApiKey.objects.get(pk=body["id"]), raw).client()
    assert new.get("/api/v1/me").json()["credential"]["key_id"] == body["id"]


def test_key_creation_follows_the_plan(alice: Person) -> None:
    plan = Plan.objects.create(name="locked", self_service_keys=False)
    from quotas.services import set_user_quota

    set_user_quota(alice.user, plan, actor=None)
    refused = alice.client().post("/api/v1/keys", {"name": "x"}, format="json")
    assert refused.status_code == 403
    plan.self_service_keys, plan.max_keys_per_user = True, 2
    plan.save()
    client = alice.client()
    assert client.post("/api/v1/keys", {}, format="json").status_code == 201
    full = client.post("/api/v1/keys", {}, format="json")
    assert full.status_code == 409
    assert full.json()["error"]["type"] == "conflict_error"


def test_key_input_is_validated(alice: Person) -> None:
    client = alice.client()
    past = (timezone.now() - timedelta(days=1)).isoformat()
    response = client.post("/api/v1/keys", {"expires_at": past}, format="json")
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "expires_at" and "expires_at" in error["fields"]
    assert client.post("/api/v1/keys", {"name": "x" * 101}, format="json").status_code == 400
    assert (
        client.post("/api/v1/keys", "not json", content_type="application/json").status_code == 400
    )


def test_revoke_stops_the_key(alice: Person) -> None:
    second = make_person("앨리스")  # the same user, a second key
    response = alice.client().post(f"/api/v1/keys/{second.key.pk}/revoke")
    assert response.status_code == 200
    assert response.json()["state"] == "revoked"
    assert second.client().get("/api/v1/me").status_code == 401
    from accounts.models import AuditEvent

    event = AuditEvent.objects.get(action="key_revoked", target_id=second.key.pk)
    assert event.actor == alice.user


# --- Isolation -----------------------------------------------------------------------------------


def test_another_users_objects_are_not_found(alice: Person, bob: Person) -> None:
    client = alice.client()
    bobs = bob.key.pk
    for method, path in [
        ("get", f"/api/v1/keys/{bobs}"),
        ("post", f"/api/v1/keys/{bobs}/revoke"),
        ("get", f"/api/v1/usage?key={bobs}"),
        ("get", f"/api/v1/requests?key={bobs}"),
        ("get", "/api/v1/keys/999999999"),
    ]:
        response = getattr(client, method)(path)
        assert response.status_code == 404, path
        assert response.json()["error"]["type"] == "not_found_error"
    assert ApiKey.objects.get(pk=bobs).revoked_at is None


def test_lists_hold_only_the_callers_rows(alice: Person, bob: Person) -> None:
    ledger_row(alice)
    ledger_row(bob)
    ledger_row(bob, prompt_tokens=1000)
    for person, own in ((alice, 1), (bob, 2)):
        client = person.client()
        rows = client.get("/api/v1/requests").json()["results"]
        assert len(rows) == own
        assert {r["key_id"] for r in rows} == {person.key.pk}
        keys = client.get("/api/v1/keys").json()["results"]
        assert [k["id"] for k in keys] == [person.key.pk]
        usage = client.get("/api/v1/usage?period=day").json()
        assert usage["totals"]["requests"] == own
    assert alice.client().get("/api/v1/usage").json()["totals"]["prompt_tokens"] == 10


# --- Requests ------------------------------------------------------------------------------------


def test_requests_are_cursor_paginated_newest_first(alice: Person) -> None:
    now = timezone.now()
    ids = [ledger_row(alice, started_at=now - timedelta(minutes=i)).request_id for i in range(7)]
    client = alice.client()
    seen: list[str] = []
    url: str | None = "/api/v1/requests?limit=3"
    pages = 0
    while url:
        page = client.get(url).json()
        seen += [row["request_id"] for row in page["results"]]
        url = page["next"]
        pages += 1
    assert seen == ids and pages == 3
    # A row written while paging does not shift the pages already handed out.
    first = client.get("/api/v1/requests?limit=3").json()
    ledger_row(alice, started_at=now + timedelta(seconds=1))
    second = client.get(first["next"]).json()
    assert [r["request_id"] for r in second["results"]] == ids[3:6]


def test_request_rows_explain_refusals_and_token_sources(alice: Person) -> None:
    ledger_row(alice, status_code=429, error_type="tokens_per_day", model="", prompt_tokens=0,
               completion_tokens=0, usage_source="none")  # fmt: skip
    ledger_row(alice, usage_source="gateway", streamed=True)
    rows = alice.client().get("/api/v1/requests").json()["results"]
    by_status = {row["status_code"]: row for row in rows}
    assert by_status[429]["refused_by"] == "tokens_per_day"
    assert by_status[200]["refused_by"] is None
    assert by_status[200]["usage_source"] == "gateway"
    assert by_status[200]["total_tokens"] == 15
    assert by_status[200]["latency_ms"] == 1500.0
    assert by_status[200]["key_prefix"] == alice.key.prefix


def test_request_filters(alice: Person) -> None:
    second = make_person("앨리스")
    now = timezone.now()
    ledger_row(alice, status_code=429, error_type="requests", model="")
    ledger_row(alice, status_code=502, error_type="upstream_error")
    ledger_row(alice, model="other", started_at=now - timedelta(hours=3))
    ledger_row(second, model="other")
    client = alice.client()

    def ids(query: str) -> int:
        response = client.get(f"/api/v1/requests?{query}")
        assert response.status_code == 200, response.json()
        return len(response.json()["results"])

    assert ids("status=rate_limited") == 1
    assert ids("status=error") == 1
    assert ids("status=ok") == 2
    assert ids("status_code=502") == 1
    assert ids("model=other") == 2
    assert ids(f"key={second.key.pk}") == 1
    assert ids(f"since={(now - timedelta(hours=1)).isoformat().replace('+', '%2B')}") == 3
    assert ids(f"until={(now - timedelta(hours=1)).isoformat().replace('+', '%2B')}") == 1
    assert client.get("/api/v1/requests?status=bogus").status_code == 400


@pytest.mark.parametrize("rows", [2, 40])
def test_request_list_query_count_is_constant(
    alice: Person, rows: int, django_assert_num_queries: Any
) -> None:
    for _ in range(rows):
        ledger_row(alice)
    client = alice.client()
    # Key + user; the page of rows with their keys.
    with django_assert_num_queries(2):
        assert len(client.get("/api/v1/requests?limit=50").json()["results"]) == rows


@pytest.mark.parametrize("keys", [1, 12])
def test_key_list_query_count_is_constant(
    alice: Person, keys: int, django_assert_num_queries: Any
) -> None:
    for _ in range(keys - 1):
        make_person("앨리스")
    client = alice.client()
    with django_assert_num_queries(2):
        assert len(client.get("/api/v1/keys").json()["results"]) == keys


# --- Usage ---------------------------------------------------------------------------------------


def test_usage_json_and_csv(alice: Person) -> None:
    ledger_row(alice, prompt_tokens=100, completion_tokens=20)
    ledger_row(alice, status_code=429, error_type="requests", model="", prompt_tokens=0,
               completion_tokens=0)  # fmt: skip
    client = alice.client()
    body = client.get("/api/v1/usage?period=hour").json()
    assert body["totals"]["requests"] == 2
    assert body["totals"]["total_tokens"] == 120
    assert body["totals"]["rate_limited"] == 1
    assert body["series"] and body["series"][0]["start"].endswith("+09:00")
    response = client.get("/api/v1/usage?period=day&format=csv")
    assert response.status_code == 200
    assert response["Content-Type"] == "text/csv; charset=utf-8"
    assert "attachment" in response["Content-Disposition"]
    text = response.content.decode("utf-8")
    assert text.startswith("\ufeff")
    rows = list(csv.reader(io.StringIO(text[1:])))
    assert len(rows) >= 2


def test_usage_refuses_bad_ranges(alice: Person) -> None:
    client = alice.client()
    assert client.get("/api/v1/usage?period=week").status_code == 400
    now = timezone.now()
    backwards = f"start={now.isoformat()}&end={(now - timedelta(hours=1)).isoformat()}"
    assert client.get("/api/v1/usage?" + backwards.replace("+", "%2B")).status_code == 400
    huge = f"period=minute&start={(now - timedelta(days=400)).isoformat()}".replace("+", "%2B")
    response = client.get("/api/v1/usage?" + huge)
    assert response.status_code == 400
    assert response.json()["error"]["code"]


@pytest.mark.parametrize("rows", [2, 40])
def test_usage_query_count_is_constant(
    alice: Person, rows: int, django_assert_num_queries: Any
) -> None:
    for i in range(rows):
        ledger_row(alice, started_at=timezone.now() - timedelta(hours=i % 20))
    client = alice.client()
    client.get("/api/v1/usage")
    # Key + user; the report (roll-ups and the tail in one statement, after the watermark).
    with django_assert_num_queries(3):
        assert client.get("/api/v1/usage?period=hour").json()["totals"]["requests"] == rows


# --- Models --------------------------------------------------------------------------------------


def test_models_follow_the_plan(alice: Person, bob: Person) -> None:
    from gateway.models import ServedModel

    ServedModel.objects.create(
        name="Qwen/Qwen2.5-7B-Instruct",
        aliases=["korean-qwen"],
        context_length=32768,
        lora_adapters=["legal-ko", "med-ko"],
    )
    ServedModel.objects.create(name="solar", context_length=4096)
    ServedModel.objects.create(name="retired", is_active=False)
    from quotas.services import set_user_quota

    narrow = Plan.objects.create(
        name="narrow", allowed_models=["korean-qwen", "korean-qwen:legal-ko"]
    )
    set_user_quota(alice.user, narrow, actor=None)
    mine = alice.client().get("/api/v1/models").json()
    assert [m["name"] for m in mine] == ["Qwen/Qwen2.5-7B-Instruct"]
    assert mine[0]["aliases"] == ["korean-qwen"]
    assert mine[0]["lora_adapters"] == ["legal-ko"]
    assert mine[0]["context_length"] == 32768
    everything = bob.client().get("/api/v1/models").json()
    assert [m["name"] for m in everything] == ["Qwen/Qwen2.5-7B-Instruct", "solar"]


@pytest.mark.parametrize("models", [1, 12])
def test_model_list_query_count_is_constant(
    alice: Person, models: int, django_assert_num_queries: Any
) -> None:
    from gateway.models import ServedModel

    for i in range(models):
        ServedModel.objects.create(name=f"model-{i}", aliases=[f"alias-{i}"])
    client = alice.client()
    client.get("/api/v1/models")  # the default plan exists from here on
    # Key + user; quota + plan; the models.
    with django_assert_num_queries(3):
        assert len(client.get("/api/v1/models").json()) == models
