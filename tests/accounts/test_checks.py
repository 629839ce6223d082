"""The development SECRET_KEY is refused when DEBUG is off, by `check` and by the ASGI app."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured

from accounts.checks import check_secret_key
from gateway.mount import refuse_insecure_settings


def test_development_key_without_debug_is_an_error(settings: Any) -> None:
    settings.DEBUG = False
    settings.SECRET_KEY = settings.DEVELOPMENT_SECRET_KEY
    errors = check_secret_key(None)
    assert [e.id for e in errors] == ["accounts.E001"]
    with pytest.raises(ImproperlyConfigured):
        refuse_insecure_settings()


@pytest.mark.parametrize(("debug", "key"), [(True, None), (False, "a-real-secret-" * 4)])
def test_debug_or_a_real_key_passes(settings: Any, debug: bool, key: str | None) -> None:
    settings.DEBUG = debug
    settings.SECRET_KEY = key or settings.DEVELOPMENT_SECRET_KEY
    assert check_secret_key(None) == []
    refuse_insecure_settings()
