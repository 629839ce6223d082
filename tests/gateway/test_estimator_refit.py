"""The estimator of a model without a tokenizer, refitted from its ledger rows."""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from accounts.models import AuditEvent
from gateway.caches import fit_pairs
from gateway.models import ServedModel
from gateway.services import refit_estimators
from quotas.models import UsageRecord
from tests.gateway.conftest import make_user
from tokenlimit.estimator_fit import apply
from tokenlimit.tokens import get_counter

pytestmark = pytest.mark.django_db
KOREAN = [{"role": "user", "content": "한국의 전통 음식 세 가지를 간단히 소개해 주세요."}]


def ledger(model: str, user: Any, ratio: float, n: int = 120, **fields: Any) -> None:
    """Chat rows where the upstream counted `ratio` × the gateway's estimate."""
    rng, now = random.Random(3), timezone.now()
    estimates = [rng.randrange(30, 900) for _ in range(n)]
    UsageRecord.objects.bulk_create(
        UsageRecord(
            request_id=f"{model}-{i}", user=user, model=model, endpoint="chat/completions",
            started_at=now - timedelta(minutes=i), finished_at=now - timedelta(minutes=i),
            estimated_prompt_tokens=e, prompt_tokens=round(e * ratio), usage_source="upstream",
            status_code=200, **fields,
        )
        for i, e in enumerate(estimates)
    )  # fmt: skip


def test_an_estimating_model_is_refitted_and_counts_closer(
    django_assert_num_queries: Callable[..., Any],
) -> None:
    user, _ = make_user("추정")
    ServedModel.objects.create(name="gemma-ko")  # no tokenizer anywhere: the estimator
    ServedModel.objects.create(name="Qwen/Qwen2.5-7B-Instruct")  # exact: never refitted
    ledger("gemma-ko", user, 0.76)
    ledger("Qwen/Qwen2.5-7B-Instruct", user, 0.5)

    # The models; the estimating model's rows; its update and audit row (in a savepoint).
    with django_assert_num_queries(6):
        stored = refit_estimators()

    assert list(stored) == ["gemma-ko"]
    fit = ServedModel.objects.get(name="gemma-ko").estimator_fit
    assert fit["scale"] == pytest.approx(0.76, abs=0.01) and fit["rows"] == 120
    assert fit["error_after"] < 0.01 < fit["error_before"]
    assert ServedModel.objects.get(name="Qwen/Qwen2.5-7B-Instruct").estimator_fit == {}
    audit = AuditEvent.objects.get(action="model_changed", actor_label="estimator refit")
    assert audit.target_label == "gemma-ko"

    plain = get_counter("gemma-ko").count_chat(KOREAN)
    refitted = get_counter("gemma-ko", estimator_fit=fit_pairs(fit)).count_chat(KOREAN)
    assert refitted == apply(plain, fit["scale"], fit["offset"])

    # Rows counted before this fit are not used again: nothing new, nothing stored.
    assert refit_estimators() == {}
