"""One error shape in Korean or English, JSON 404s, and the API's own throttle."""

from __future__ import annotations

from typing import Any

import pytest
from django.conf import settings
from django.core.cache.backends.redis import RedisCache

from api.throttling import ApiUserThrottle
from tests.api.conftest import Person

pytestmark = pytest.mark.django_db


def test_errors_are_korean_by_default_and_english_on_request(client: Any) -> None:
    korean = client.get("/api/v1/me").json()["error"]
    english = client.get("/api/v1/me", HTTP_ACCEPT_LANGUAGE="en").json()["error"]
    assert english["message"] == "Authentication credentials were not provided."
    assert korean["message"] != english["message"]
    assert any("\uac00" <= char <= "\ud7a3" for char in korean["message"])
    assert korean["code"] == english["code"] == "not_authenticated"
    assert set(korean) == {"message", "type", "code", "param"}


def test_our_own_messages_are_translated(client: Any) -> None:
    english = client.get("/api/v1/me", HTTP_AUTHORIZATION="Bearer sk-x", HTTP_ACCEPT_LANGUAGE="en")
    korean = client.get("/api/v1/me", HTTP_AUTHORIZATION="Bearer sk-x")
    assert english.json()["error"]["message"] == "Invalid, expired or revoked API key."
    assert korean.json()["error"]["message"] != english.json()["error"]["message"]


def test_validation_errors_name_their_fields(alice: Person) -> None:
    response = alice.client().get("/api/v1/usage?period=week", HTTP_ACCEPT_LANGUAGE="en")
    error = response.json()["error"]
    assert response.status_code == 400
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "period"
    assert error["code"] == "invalid_choice"
    assert error["message"].startswith("period: ")
    assert list(error["fields"]) == ["period"]


def test_unknown_api_paths_and_methods_answer_json(alice: Person, client: Any) -> None:
    for path in ("/api/v1/nope", "/api/v1/", "/api/v1/keys/abc", "/api/v1/me/"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert response.json()["error"]["type"] == "not_found_error"
    response = alice.client().delete("/api/v1/me")
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"


def test_an_unexpected_failure_is_a_json_500(
    alice: Person, monkeypatch: pytest.MonkeyPatch
) -> None:
    from api import client_views

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(client_views, "me_payload", broken)
    client = alice.client()
    client.raise_request_exception = False
    response = client.get("/api/v1/me")
    assert response.status_code == 500
    assert response.json()["error"] == {
        "message": response.json()["error"]["message"],
        "type": "server_error",
        "code": "server_error",
        "param": None,
    }
    assert "boom" not in response.content.decode()


def test_the_api_is_throttled_per_user(
    alice: Person, bob: Person, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ApiUserThrottle, "THROTTLE_RATES", {"client": "3/min", "operator": "5/min"})
    client = alice.client()
    assert [client.get("/api/v1/keys").status_code for _ in range(3)] == [200] * 3
    refused = client.get("/api/v1/keys")
    assert refused.status_code == 429
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(refused["Retry-After"]) <= 60
    # A session of the same user shares the budget; another user has their own.
    assert alice.session().get("/api/v1/keys").status_code == 429
    assert bob.client().get("/api/v1/keys").status_code == 200


@pytest.mark.redis
def test_replicas_share_the_throttle_through_redis(
    alice: Person, monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    """Two gateway replicas are two processes with their own Redis connections: the count is
    the user's, not the replica's."""
    import uuid

    prefix = f"{settings.LIMITER_REDIS_PREFIX}:throttle-{uuid.uuid4().hex[:8]}"
    replicas = [RedisCache(redis_url, {"KEY_PREFIX": prefix}) for _ in range(2)]
    monkeypatch.setattr(ApiUserThrottle, "THROTTLE_RATES", {"client": "4/min", "operator": "4/min"})
    client = alice.client()
    codes = []
    for i in range(6):
        monkeypatch.setattr(ApiUserThrottle, "cache", replicas[i % 2])
        codes.append(client.get("/api/v1/keys").status_code)
    assert codes == [200, 200, 200, 200, 429, 429]
    replicas[0].delete_many([f"throttle_client_{alice.user.pk}"])
