"""System checks that keep development defaults out of production."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning, register
from django.db import DatabaseError, connections
from django.db.migrations.executor import MigrationExecutor
from django.utils.translation import gettext, ngettext


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


@register("limiter", deploy=True)
def check_quick_start_keys(
    app_configs: Any, databases: Sequence[str] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    """The quick start's API keys are in the public README: anyone could spend with them."""
    if not database_ready(databases):
        return []
    from accounts.services import quick_start_keys_in_use  # models are loaded by now

    prefixes = quick_start_keys_in_use()
    if not prefixes:
        return []
    return [
        Error(
            gettext("The public quick-start API keys are still active: %(keys)s")
            % {"keys": ", ".join(prefixes)},
            hint=gettext(
                "Revoke them in the admin (API keys, action “Revoke”) before opening the "
                "gateway to anyone."
            ),
            id="accounts.E010",
        )
    ]


@register("limiter", deploy=True)
def check_database_migrated(
    app_configs: Any, databases: Sequence[str] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    """The other database checks need the tables; a gateway started on an old schema would
    fail its requests. Only this check reports a database it cannot read."""
    for alias in databases or ():
        try:
            pending = pending_migrations(alias)
        except DatabaseError as exc:
            return [
                Error(
                    gettext("The database cannot be read: %(error)s") % {"error": exc},
                    hint=gettext("Check DATABASE_URL and that the database server answers."),
                    id="accounts.E011",
                )
            ]
        if pending:
            return [
                Error(
                    ngettext(
                        "%(count)d database migration is not applied.",
                        "%(count)d database migrations are not applied.",
                        len(pending),
                    )
                    % {"count": len(pending)},
                    hint=gettext("Run the migrate role (`manage.py migrate`) before the gateways."),
                    id="accounts.E012",
                )
            ]
    return []


def pending_migrations(alias: str) -> list[Any]:
    """The migrations the database `alias` still lacks (DatabaseError: it cannot be read)."""
    executor = MigrationExecutor(connections[alias])
    return list(executor.migration_plan(executor.loader.graph.leaf_nodes()))


def database_ready(databases: Sequence[str] | None) -> bool:
    """Whether the database checks may query (check_database_migrated says why not)."""
    if not databases:
        return False
    try:
        return not pending_migrations(databases[0])
    except DatabaseError:
        return False
