"""System checks that keep development defaults out of production."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning, register
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


@register("security", deploy=False)
def check_allowed_hosts(app_configs: Any, **kwargs: Any) -> list[CheckMessage]:
    if settings.DEBUG:
        return []
    if not settings.ALLOWED_HOSTS:
        return [
            Error(
                gettext("ALLOWED_HOSTS is empty while DEBUG is off."),
                hint=gettext(
                    "Set ALLOWED_HOSTS to the host names the admin and pages are served under, "
                    "e.g. ALLOWED_HOSTS=limiter.example.com."
                ),
                id="accounts.E002",
            )
        ]
    if "*" in settings.ALLOWED_HOSTS:
        return [
            Warning(
                gettext("ALLOWED_HOSTS accepts any host name."),
                hint=gettext(
                    "List the real host names; websockets never accept '*' as an origin anyway."
                ),
                id="accounts.W001",
            )
        ]
    return []
