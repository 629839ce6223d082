"""Served models made, changed and deleted through the services: validated (ValidationError by
field), aliases taken from other models in the same transaction, every change audited with the
actor, nothing written without a change."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError

from accounts.models import AuditAction, AuditEvent
from accounts.services import audit_target
from gateway.models import ServedModel
from gateway.services import (
    EDITABLE_MODEL_FIELDS,
    delete_served_model,
    save_served_model,
    set_served_model,
    take_model_aliases,
)

pytestmark = [pytest.mark.django_db, pytest.mark.postgres]


@pytest.fixture
def operator() -> User:
    return User.objects.create_user("운영자", is_staff=True)


def events_of(target: Any) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(**audit_target(ServedModel, target.pk)))


def _broken(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError("audit write failed")


def test_a_new_model_is_audited_with_every_value(operator: User) -> None:
    model, changed = save_served_model(
        actor=operator,
        model=None,
        name="Qwen/Qwen2.5-7B-Instruct",
        aliases=["korean-qwen", "korean-qwen"],
        upstream_url="http://sglang:8000",
        lora_adapters=["legal-ko"],
    )

    assert changed and model.pk is not None
    model.refresh_from_db()
    assert model.aliases == ["korean-qwen"]  # each name once
    [event] = events_of(model)
    assert (event.action, event.actor, event.target_label) == (
        AuditAction.MODEL_CREATED,
        operator,
        "Qwen/Qwen2.5-7B-Instruct",
    )
    assert set(event.details) == set(EDITABLE_MODEL_FIELDS)
    assert event.details["upstream_url"] == "http://sglang:8000"
    assert event.details["lora_adapters"] == ["legal-ko"]


def test_a_change_records_old_and_new_once(operator: User) -> None:
    model, _ = save_served_model(actor=None, model=None, name="qwen", context_length=8192)
    AuditEvent.objects.all().delete()

    assert save_served_model(
        actor=operator, model=model, context_length=16384, description="주 모델"
    ) == (model, True)
    assert save_served_model(actor=operator, model=model, context_length="16384") == (
        model,
        False,
    )

    [event] = events_of(model)
    assert (event.action, event.actor) == (AuditAction.MODEL_CHANGED, operator)
    assert event.details == {
        "context_length": {"old": 8192, "new": 16384},
        "description": {"old": "", "new": "주 모델"},
    }
    assert ServedModel.objects.get(pk=model.pk).context_length == 16384 == model.context_length


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"upstream_url": "ftp://sglang"}, "upstream_url"),
        ({"lora_adapters": ["bad name"]}, "lora_adapters"),
        ({"aliases": "korean-qwen"}, "aliases"),
        ({"aliases": [""]}, "aliases"),
        ({"aliases": ["x" * 201]}, "aliases"),
        ({"context_length": 0}, "context_length"),
        ({"context_length": -1}, "context_length"),
        ({"korean_factor": 0}, "korean_factor"),
        ({"korean_factor": 11}, "korean_factor"),
        ({"korean_factor": float("nan")}, "korean_factor"),
        ({"request_timeout_seconds": 0}, "request_timeout_seconds"),
        ({"request_timeout_seconds": float("inf")}, "request_timeout_seconds"),
        ({"tokenizer": "x" * 501}, "tokenizer"),
        ({"more_upstream_urls": ["ftp://sglang-2"]}, "more_upstream_urls"),
        ({"more_upstream_urls": "http://sglang-2:8000"}, "more_upstream_urls"),
        ({"more_upstream_urls": [f"http://s{n}:8000" for n in range(33)]}, "more_upstream_urls"),
        ({"name": ""}, "name"),
        ({"name": "other"}, "name"),  # taken
    ],
)
def test_bad_values_are_refused_by_field_and_write_nothing(
    operator: User, fields: dict[str, Any], field: str
) -> None:
    save_served_model(actor=None, model=None, name="other")
    model, _ = save_served_model(actor=None, model=None, name="qwen")
    AuditEvent.objects.all().delete()

    with pytest.raises(ValidationError) as caught:
        save_served_model(actor=operator, model=model, description="바뀜", **fields)
    assert field in caught.value.message_dict
    with pytest.raises(ValidationError) as caught:
        save_served_model(actor=operator, model=None, **{"name": "새 모델", **fields})
    assert field in caught.value.message_dict

    assert sorted(ServedModel.objects.values_list("name", "description")) == [
        ("other", ""),
        ("qwen", ""),
    ]
    assert not AuditEvent.objects.exists()


def test_more_upstream_urls_are_normalised_once_each(operator: User) -> None:
    model, _ = save_served_model(
        actor=operator, model=None, name="qwen", upstream_url="http://a:8000",
        more_upstream_urls=["http://b:8000/v1/", " http://b:8000 ", "http://c:8000/"],
    )  # fmt: skip
    model.refresh_from_db()
    assert model.more_upstream_urls == ["http://b:8000", "http://c:8000"]


def test_unknown_fields_are_refused(operator: User) -> None:
    with pytest.raises(ValueError, match="unknown served model fields"):
        save_served_model(actor=operator, model=None, name="qwen", id=5)


def test_aliases_are_taken_from_other_models_and_each_loss_audited(operator: User) -> None:
    old, _ = save_served_model(actor=None, model=None, name="old", aliases=["korean-qwen", "ko"])
    AuditEvent.objects.all().delete()

    new, _ = save_served_model(
        actor=operator, actor_label="배포", model=None, name="new", aliases=["korean-qwen"]
    )

    old.refresh_from_db()
    assert old.aliases == ["ko"]
    [lost] = events_of(old)
    assert (lost.action, lost.actor, lost.actor_label) == (
        AuditAction.MODEL_CHANGED,
        operator,
        "배포",
    )
    assert lost.details == {"aliases": {"old": ["korean-qwen", "ko"], "new": ["ko"]}}
    # A change of the aliases takes them too.
    save_served_model(actor=operator, model=new, aliases=["korean-qwen", "ko"])
    old.refresh_from_db()
    assert old.aliases == []


def test_an_alias_that_is_another_model_s_name_is_refused(operator: User) -> None:
    save_served_model(actor=None, model=None, name="korean-qwen")
    model, _ = save_served_model(actor=None, model=None, name="qwen")
    AuditEvent.objects.all().delete()

    with pytest.raises(ValidationError) as caught:
        save_served_model(actor=operator, model=None, name="new", aliases=["korean-qwen"])
    assert list(caught.value.message_dict) == ["aliases"]
    with pytest.raises(ValidationError):
        save_served_model(actor=operator, model=model, aliases=["korean-qwen"])

    assert not ServedModel.objects.filter(name="new").exists()
    assert ServedModel.objects.get(pk=model.pk).aliases == []
    assert not AuditEvent.objects.exists()


def test_a_model_is_deleted_and_audited(operator: User) -> None:
    model, _ = save_served_model(actor=None, model=None, name="qwen", context_length=4096)
    model_id = model.pk

    delete_served_model(model, actor=operator)

    assert not ServedModel.objects.exists()
    [event] = AuditEvent.objects.filter(action=AuditAction.MODEL_DELETED)
    assert (event.actor, event.target_id, event.target_label) == (operator, model_id, "qwen")
    assert event.details["context_length"] == 4096


def test_every_change_rolls_back_when_the_audit_write_fails(
    operator: User, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, _ = save_served_model(actor=None, model=None, name="qwen")
    save_served_model(actor=None, model=None, name="other", aliases=["ko"])
    monkeypatch.setattr("gateway.services.record_audit", _broken)

    with pytest.raises(RuntimeError):
        save_served_model(actor=operator, model=None, name="new")
    with pytest.raises(RuntimeError):
        save_served_model(actor=operator, model=model, aliases=["ko"], context_length=1024)
    with pytest.raises(RuntimeError):
        delete_served_model(model, actor=operator)

    assert sorted(ServedModel.objects.values_list("name", "aliases", "context_length")) == [
        ("other", ["ko"], 32768),
        ("qwen", [], 32768),
    ]


def test_set_served_model_is_audited_as_import_config() -> None:
    model, created, changed = set_served_model("qwen", context_length=4096)
    assert (created, changed) == (True, True)
    assert set_served_model("qwen", context_length=4096) == (model, False, False)
    _model, created, changed = set_served_model("qwen", context_length=8192)
    assert (created, changed) == (False, True)

    assert [(e.action, e.actor, e.actor_label) for e in reversed(events_of(model))] == [
        (AuditAction.MODEL_CREATED, None, "import_config"),
        (AuditAction.MODEL_CHANGED, None, "import_config"),
    ]


def test_set_served_model_leaves_aliases_to_take_model_aliases() -> None:
    old, _ = save_served_model(actor=None, model=None, name="old", aliases=["korean-qwen"])

    model, _created, _changed = set_served_model("new", aliases=["korean-qwen"])
    assert ServedModel.objects.get(pk=old.pk).aliases == ["korean-qwen"]
    assert take_model_aliases(model, actor_label="import_config") == [old]

    assert ServedModel.objects.get(pk=old.pk).aliases == []
    assert events_of(old)[0].actor_label == "import_config"


def test_the_admin_deletes_through_the_service(admin_client: Any, admin_user: User) -> None:
    models = [save_served_model(actor=None, model=None, name=n)[0] for n in ("a", "b", "c")]

    one = admin_client.post(f"/admin/gateway/servedmodel/{models[0].pk}/delete/", {"post": "yes"})
    bulk = admin_client.post(
        "/admin/gateway/servedmodel/",
        {
            "action": "delete_selected",
            "_selected_action": [m.pk for m in models[1:]],
            "post": "yes",
        },
    )

    assert one.status_code == bulk.status_code == 302 and not ServedModel.objects.exists()
    deleted = AuditEvent.objects.filter(action=AuditAction.MODEL_DELETED)
    assert sorted(deleted.values_list("target_label", "actor")) == [
        ("a", admin_user.pk),
        ("b", admin_user.pk),
        ("c", admin_user.pk),
    ]


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("http://sglang:8000/v1", "http://sglang:8000"),
        ("http://sglang:8000/v1/", "http://sglang:8000"),
        ("https://gpu.example.com/V1", "https://gpu.example.com"),
        ("http://sglang:8000/", "http://sglang:8000"),
        ("http://proxy:9000/sglang/v1", "http://proxy:9000/sglang"),
        ("http://sglang:8000/v10", "http://sglang:8000/v10"),
    ],
)
def test_an_openai_base_url_is_stored_as_the_servers_root(given: str, stored: str) -> None:
    model, _ = save_served_model(actor=None, model=None, name="qwen", upstream_url=given)
    model.refresh_from_db()
    assert model.upstream_url == stored
    [event] = events_of(model)
    assert event.details["upstream_url"] == stored
    # A change through the service, and the admin's path (full_clean), do the same.
    save_served_model(actor=None, model=model, upstream_url=given + "/")
    model.refresh_from_db()
    assert model.upstream_url == stored
    edited = ServedModel(name="other", upstream_url=given)
    edited.full_clean()
    assert edited.upstream_url == stored
