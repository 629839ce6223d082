"""People and ledger rows for the web pages' tests (the REST API's helpers, reused)."""

from __future__ import annotations

from typing import Any

import pytest
from django.conf import settings
from django.test import Client

# The REST API's two users, as fixtures of these tests too.
from tests.api.conftest import Person, alice, bob, make_person

__all__ = ["alice", "bob"]


@pytest.fixture
def staff(db: None) -> Person:
    return make_person("운영자", staff=True)


def logged_in(person: Person, *, csrf: bool = False, language: str | None = None) -> Client:
    """A browser session of `person`; with csrf, POSTs need the token as a real browser's do;
    with a language, the pages come in it (the language switch's cookie), else in Korean."""
    client = Client(enforce_csrf_checks=csrf)
    client.force_login(person.user)
    if language:
        client.cookies[settings.LANGUAGE_COOKIE_NAME] = language
    return client


def text(response: Any) -> str:
    return response.content.decode()
