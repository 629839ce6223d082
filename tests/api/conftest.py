"""Users, keys and clients for the REST API's tests."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from django.core.cache.backends.locmem import LocMemCache
from rest_framework.test import APIClient

from api.throttling import ApiUserThrottle


@pytest.fixture(autouse=True)
def fresh_throttle(monkeypatch: pytest.MonkeyPatch) -> Iterator[LocMemCache]:
    """Each test counts its own API calls (user ids repeat across rolled-back tests)."""
    cache = LocMemCache(f"throttle-{uuid.uuid4().hex}", {})
    monkeypatch.setattr(ApiUserThrottle, "cache", cache)
    yield cache


@dataclass
class Person:
    user: Any
    key: Any
    raw_key: str

    def client(self) -> APIClient:
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {self.raw_key}")
        return client

    def session(self) -> APIClient:
        client = APIClient(enforce_csrf_checks=True)
        client.force_login(self.user)
        return client


def make_person(
    username: str, *, staff: bool = False, plan: Any = None, **overrides: Any
) -> Person:
    from accounts.services import create_api_key, get_or_create_user
    from quotas.services import default_plan, set_user_quota

    user, _ = get_or_create_user(username)
    if staff:
        user.is_staff = True
        user.save(update_fields=["is_staff"])
    set_user_quota(user, plan or default_plan(), actor=None, **overrides)
    key, raw = create_api_key(user, actor=None, name=f"{username}'s key")
    return Person(user, key, raw)


@pytest.fixture
def alice(db: None) -> Person:
    return make_person("앨리스")


@pytest.fixture
def bob(db: None) -> Person:
    return make_person("bob")


@pytest.fixture
def operator(db: None) -> Person:
    return make_person("operator", staff=True)


def operator_token(person: Person, scope: str = "write") -> APIClient:
    from accounts.services import create_operator_token

    _, raw = create_operator_token(person.user, actor=person.user, name="script", scope=scope)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    return client
