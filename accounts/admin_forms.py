"""Form pieces the admin pages share: JSON lists edited as one item per line, and state badges.

Operators edit lists of names (allowed models, aliases, adapters, extra request fields); a JSON
box made them type brackets and quotes and answered a missing comma with "Enter a valid JSON".
"""

from __future__ import annotations

import json
from typing import Any

from django import forms
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.utils.translation import gettext
from django.utils.translation import gettext_lazy as _

# The longest item a line may hold (a served model's name and ":" and an adapter's, with room).
LINE_MAX = 300
# The most lines one list may have: a list this long is a paste gone wrong, not a plan.
LINES_MAX = 500


class LinesWidget(forms.Textarea):
    """A list shown one item per line."""

    def __init__(self, attrs: dict[str, Any] | None = None) -> None:
        super().__init__({"rows": 4, "cols": 40, "class": "lines-list", **(attrs or {})})

    def format_value(self, value: Any) -> str | None:
        if isinstance(value, (list, tuple)):
            return "\n".join(str(item) for item in value)
        return super().format_value(value)


class LinesField(forms.Field):
    """A list of non-empty strings, typed one per line; blank lines and surrounding spaces are
    ignored, duplicates dropped (first kept). No lines at all mean [] (an empty list), or None
    with `blank_is_none` (where a blank field means "inherit": a user's allowed models)."""

    widget = LinesWidget

    def __init__(self, *, blank_is_none: bool = False, **kwargs: Any) -> None:
        self.blank_is_none = blank_is_none
        kwargs.setdefault("required", False)
        kwargs.pop("encoder", None)  # passed by a JSONField's formfield()
        kwargs.pop("decoder", None)
        kwargs.pop("max_length", None)
        super().__init__(**kwargs)

    def prepare_value(self, value: Any) -> Any:
        return value

    def to_python(self, value: Any) -> list[str] | None:
        if value in (None, ""):
            return None if self.blank_is_none else []
        if isinstance(value, (list, tuple)):
            lines = [str(item) for item in value]
        else:
            lines = _pasted_json(str(value)) or str(value).splitlines()
        items: list[str] = []
        for number, line in enumerate(lines, start=1):
            item = line.strip()
            if not item:
                continue
            if len(item) > LINE_MAX:
                raise forms.ValidationError(
                    gettext("Line %(number)d is longer than %(max)d characters.")
                    % {"number": number, "max": LINE_MAX}
                )
            if any(ch.isspace() for ch in item) or '"' in item or "," in item:
                raise forms.ValidationError(
                    gettext(
                        "Line %(number)d (%(item)s) is not one name: put each name on its own "
                        "line, without quotes, commas or spaces."
                    )
                    % {"number": number, "item": item[:60]}
                )
            if item not in items:
                items.append(item)
        if len(items) > LINES_MAX:
            raise forms.ValidationError(
                gettext("Enter at most %(max)d lines.") % {"max": LINES_MAX}
            )
        if not items:
            return None if self.blank_is_none else []
        return items

    def has_changed(self, initial: Any, data: Any) -> bool:
        try:
            new = self.to_python(data)
        except forms.ValidationError:
            return True
        old = initial if initial not in ("", None) else (None if self.blank_is_none else [])
        return bool(old != new)


def _pasted_json(text: str) -> list[str] | None:
    """A JSON list of strings pasted from the old form or a config file, taken as its items."""
    text = text.strip()
    if not text.startswith("["):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    return None


# --- Badges -------------------------------------------------------------------------------------

# Levels map to the badge colours of portal/static/portal/admin.css.
BADGE_LEVELS = ("ok", "warn", "bad", "idle")


def badge(text: object, level: str) -> SafeString:
    assert level in BADGE_LEVELS, level
    return format_html('<span class="badge badge-{}">{}</span>', level, text)


KEY_STATE_LEVELS = {"active": "ok", "expired": "idle", "revoked": "bad"}


def key_state_badge(state: str) -> SafeString:
    """An API key's state ("active", "expired", "revoked") as a coloured badge."""
    labels = {"active": _("active"), "expired": _("expired"), "revoked": _("revoked")}
    return badge(labels[state], KEY_STATE_LEVELS[state])
