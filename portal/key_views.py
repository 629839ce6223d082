""" "내 API 키": the user's own keys with their state and last use, create (the raw key shown
once) and revoke (after a confirmation), through the same services and plan policy as
/api/v1/keys (quotas.services.create_own_api_key / revoke_own_api_key)."""

from __future__ import annotations

import math
from datetime import date, datetime, time, timedelta
from typing import Any, cast

from django import forms
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils import timezone
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_http_methods, require_POST

from accounts.models import ApiKey
from accounts.services import CREDENTIAL_NAME_MAX
from quotas.services import KeyPolicyError, create_own_api_key, revoke_own_api_key, user_plan
from telemetry.rollups import local_zone

MAX_EXPIRY_DAYS = 3650


class NewKeyForm(forms.Form):
    name = forms.CharField(
        label=gettext_lazy("Name"),
        max_length=CREDENTIAL_NAME_MAX,
        required=False,
        help_text=gettext_lazy("Where you will use it, e.g. “chatbot server”."),
    )
    expires_on = forms.DateField(
        label=gettext_lazy("Last day (optional)"),
        required=False,
        widget=forms.DateInput(attrs={"type": "date"}),
        help_text=gettext_lazy("The key works until the end of this day (KST). Empty: no expiry."),
    )

    def clean_expires_on(self) -> date | None:
        day: date | None = self.cleaned_data.get("expires_on")
        if day is None:
            return None
        today = timezone.localtime(timezone.now(), local_zone()).date()
        if day < today:
            raise ValidationError(_("Choose today or a later day."))
        if day > today + timedelta(days=MAX_EXPIRY_DAYS):
            raise ValidationError(_("Choose a day within ten years."))
        return day

    def expires_at(self) -> datetime | None:
        day = self.cleaned_data.get("expires_on")
        if day is None:
            return None
        return datetime.combine(day + timedelta(days=1), time(), tzinfo=local_zone())


@never_cache
@require_http_methods(["GET", "POST"])
@login_required
def keys(request: HttpRequest) -> HttpResponse:
    """The list and the create form. A created key is shown in the response to the POST itself
    (never stored, not even in the session) and the page is not cached: it cannot be shown
    again, by design."""
    user = cast(User, request.user)
    form = NewKeyForm(request.POST if request.method == "POST" else None)
    new_key: dict[str, Any] | None = None
    if request.method == "POST" and form.is_valid():
        try:
            key, raw = create_own_api_key(
                user, name=form.cleaned_data["name"], expires_at=form.expires_at()
            )
        except KeyPolicyError as exc:
            messages.error(request, str(exc))
        except ValidationError as exc:
            for error in exc.messages:
                messages.error(request, error)
        else:
            new_key = {"key": key, "raw": raw}
            form = NewKeyForm()
    plan = user_plan(user)
    rows = list(ApiKey.objects.filter(user=user).order_by("-created_at", "-pk"))
    active = sum(1 for key in rows if key.state == "active")
    context = {
        "form": form,
        "rows": rows,
        "active_count": active,
        "plan": plan,
        "self_service": plan.self_service_keys,
        "at_limit": bool(plan.max_keys_per_user) and active >= plan.max_keys_per_user,
        "new_key": new_key,
        "base_url": request.build_absolute_uri("/v1"),
    }
    status = 400 if request.method == "POST" and form.errors else 200
    return render(request, "portal/keys.html", context, status=status)


@require_POST
@login_required
def revoke_key(request: HttpRequest, key_id: int) -> HttpResponse:
    user = cast(User, request.user)
    try:
        revoked = revoke_own_api_key(user, key_id)
    except KeyPolicyError as exc:
        messages.error(request, str(exc))
        return redirect("portal:keys")
    if not revoked:
        # Someone else's key or none: the same answer, so ids reveal nothing.
        raise Http404
    # Gateways cache a key's lookup for GATEWAY_KEY_CACHE_SECONDS (at most 5): say so.
    seconds = max(1, math.ceil(settings.GATEWAY_KEY_CACHE_SECONDS))
    messages.success(
        request,
        _("The key was revoked: every gateway refuses it within %(seconds)d seconds.")
        % {"seconds": seconds},
    )
    return redirect("portal:keys")
