"""System checks that keep development defaults out of production."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, register
from django.utils.translation import gettext


@register("security", deploy=False)
def check_secret_key(app_configs: Any, **kwargs: Any) -> list[CheckMessage]:
    # Run on every start (not only --deploy): a public default key signs sessions and admin logins.
    if not settings.DEBUG and settings.SECRET_KEY == settings.DEVELOPMENT_SECRET_KEY:
        return [
            Error(
                gettext("SECRET_KEY is the development default while DEBUG is off."),
                hint=gettext(
                    "Set the SECRET_KEY environment variable to a long random value, or DEBUG=1."
                ),
                id="accounts.E001",
            )
        ]
    return []
