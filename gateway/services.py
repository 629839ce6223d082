"""Every change to served models goes through these functions."""

from __future__ import annotations

from typing import Any

from django.utils.translation import gettext

from gateway.models import ServedModel

SERVED_MODEL_FIELDS = (
    "aliases",
    "upstream_url",
    "tokenizer",
    "context_length",
    "korean_factor",
    "request_timeout_seconds",
    "is_active",
    "description",
)


def set_served_model(name: str, **fields: Any) -> tuple[ServedModel, bool, bool]:
    """Create or update the served model `name`; returns (model, created, changed)."""
    unknown = set(fields) - set(SERVED_MODEL_FIELDS)
    if unknown:
        raise ValueError(f"unknown served model fields: {sorted(unknown)}")
    model = ServedModel.objects.filter(name=name).first()
    if model is None:
        return ServedModel.objects.create(name=name, **fields), True, True
    changed = [field for field, value in fields.items() if getattr(model, field) != value]
    for field in changed:
        setattr(model, field, fields[field])
    if changed:
        model.save(update_fields=changed)
    return model, False, bool(changed)


def take_model_aliases(model: ServedModel) -> list[ServedModel]:
    """Remove `model`'s aliases from every other model, so that each name means one model.

    Returns the models that lost an alias. An alias that is another model's own name cannot be
    taken (clients already use that name): ValueError.
    """
    others = list(ServedModel.objects.exclude(pk=model.pk))
    clashes = sorted(other.name for other in others if other.name in model.aliases)
    if clashes:
        raise ValueError(
            gettext("%(names)s is already the name of another served model")
            % {"names": ", ".join(clashes)}
        )
    changed = []
    for other in others:
        kept = [alias for alias in other.aliases or [] if alias not in model.aliases]
        if kept != (other.aliases or []):
            other.aliases = kept
            other.save(update_fields=["aliases"])
            changed.append(other)
    return changed
