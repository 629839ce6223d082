"""Pre-flight checks for a deployment (`manage.py check --deploy --database default`).

Registered with deploy=True: they ask the network and the database, which a plain `check` at
every start (runserver, migrate) must not. Without `--database` the database-backed ones say
nothing (Django's convention), so the pre-flight command names it (README, "Production").
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning, register
from django.db.models import Max
from django.utils.translation import gettext

from accounts.checks import database_ready
from gateway import upstream_kinds
from gateway.caches import stored_models
from gateway.models import ServedModel, TokenizerCheck, normalize_upstream_url

PROBE_TIMEOUT = 3.0


@register("limiter", deploy=True)
def check_upstreams_reachable(
    app_configs: Any, databases: Sequence[str] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    targets = {normalize_upstream_url(settings.SGLANG_URL): upstream_kinds.AUTO}
    if database_ready(databases):
        models = stored_models(settings.SGLANG_URL, active_only=False)
        targets.update(upstream_kinds.upstreams(models))
    found: list[CheckMessage] = []
    for url, kind in sorted(targets.items()):
        problem = _probe(url, kind)
        if problem:
            found.append(
                Warning(
                    gettext("The upstream %(url)s does not answer: %(problem)s")
                    % {"url": url, "problem": problem},
                    hint=gettext(
                        "Start the model server (manage.py launch_sglang) or fix the model's "
                        "upstream URL in the admin; until it answers, its requests get 502."
                    ),
                    id="gateway.W010",
                )
            )
    return found


def _probe(url: str, kind: str) -> str:
    # An automatic kind is probed as a generic server: /v1/models answers on every kind.
    path = upstream_kinds.traits(kind).liveness_path
    try:
        response = httpx.get(f"{url}{path}", timeout=PROBE_TIMEOUT)
    except httpx.HTTPError as exc:
        return f"{exc.__class__.__name__}: {exc}"[:200]
    return "" if response.status_code == 200 else f"GET {path} → {response.status_code}"


@register("limiter", deploy=True)
def check_tokenizer_self_checks(
    app_configs: Any, databases: Sequence[str] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    if not database_ready(databases):
        return []
    models = list(ServedModel.objects.only("id", "name"))
    latest = dict(
        TokenizerCheck.objects.filter(model__in=models)
        .values("model_id")
        .annotate(last=Max("checked_at"))
        .values_list("model_id", "last")
    )
    outcomes = {
        (row.model_id, row.checked_at): row
        for row in TokenizerCheck.objects.filter(checked_at__in=latest.values(), model__in=models)
    }
    found: list[CheckMessage] = []
    for model in models:
        last = latest.get(model.id)
        check = outcomes.get((model.id, last)) if last is not None else None
        if check is None:
            found.append(
                Warning(
                    gettext("The token counting of %(model)s has never been self-checked.")
                    % {"model": model.name},
                    hint=gettext(
                        "Start a gateway with GATEWAY_SELF_CHECK on (the default), or use the "
                        "admin action “Run the tokenizer self-check now”."
                    ),
                    id="gateway.W011",
                )
            )
        elif check.outcome != "ok":
            found.append(
                Warning(
                    gettext(
                        "The last self-check of %(model)s's token counting: %(outcome)s "
                        "(%(detail)s)."
                    )
                    % {
                        "model": model.name,
                        "outcome": check.get_outcome_display(),
                        "detail": check.detail or check.counter_source,
                    },
                    hint=gettext(
                        "Limits are counted from the gateway's own count: fix the tokenizer or "
                        "chat template of the model in the admin (see its self-check history)."
                    ),
                    id="gateway.W012",
                )
            )
    return found


@register("limiter", deploy=True)
def check_static_collected(app_configs: Any, **kwargs: Any) -> list[CheckMessage]:
    if settings.WHITENOISE_USE_FINDERS:
        return [
            Warning(
                gettext("Static files are served from the apps (STATIC_FROM_APPS is on)."),
                hint=gettext(
                    "Run `manage.py collectstatic` and set STATIC_FROM_APPS=0 (the container "
                    "image does both)."
                ),
                id="gateway.W013",
            )
        ]
    marker = Path(settings.STATIC_ROOT) / "admin" / "css" / "base.css"
    if not marker.is_file():
        return [
            Error(
                gettext("Static files are not collected in %(root)s.")
                % {"root": settings.STATIC_ROOT},
                hint=gettext("Run `manage.py collectstatic --no-input`."),
                id="gateway.E010",
            )
        ]
    return []
