"""Plan and served-model admin pages: lists shown as names, at a fixed number of queries."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse

from gateway.models import ServedModel
from quotas.models import Plan

pytestmark = pytest.mark.django_db

EN = {"accept-language": "en"}
# session, user, the count, the full count, the page.
PLAN_LIST_QUERIES = 5
# session, user, the plan.
PLAN_PAGE_QUERIES = 3
# session, user, the count, the full count, the page (reconciliation and the latest self-check
# as subqueries).
MODEL_LIST_QUERIES = 5
# session, user, the model (with its reconciliation subqueries), its self-check history, the
# config file managing it.
MODEL_PAGE_QUERIES = 5


@pytest.mark.parametrize("count", [1, 30])
def test_the_plan_list_costs_the_same_for_1_and_30_plans(
    admin_client: Client, count: int, django_assert_num_queries: Callable[..., Any]
) -> None:
    for n in range(count):
        Plan.objects.create(
            name=f"요금제{n:02d}", allowed_models=["a", "b:c"], extra_request_fields=["ignore_eos"]
        )

    with django_assert_num_queries(PLAN_LIST_QUERIES):
        response = admin_client.get(reverse("admin:quotas_plan_changelist"), headers=EN)

    page = response.content.decode()
    assert page.count('<td class="field-allowed_models_shown">a, b:c</td>') == count
    assert page.count('<td class="field-extra_fields_shown">ignore_eos</td>') == count


def test_an_empty_allowed_list_reads_every_model(admin_client: Client) -> None:
    Plan.objects.create(name="전부", allowed_models=[])

    page = admin_client.get(reverse("admin:quotas_plan_changelist"), headers=EN).content.decode()

    assert '<td class="field-allowed_models_shown">every model</td>' in page


def test_the_plan_page_costs_a_fixed_number_of_queries(
    admin_client: Client, django_assert_num_queries: Callable[..., Any]
) -> None:
    plan = Plan.objects.create(name="한 개", allowed_models=["a"])
    url = reverse("admin:quotas_plan_change", args=[plan.pk])
    admin_client.get(url)  # Django's content-type cache, once a process

    with django_assert_num_queries(PLAN_PAGE_QUERIES):
        response = admin_client.get(url)

    assert "a</textarea>" in response.content.decode()


@pytest.mark.parametrize("count", [1, 30])
def test_the_served_model_list_costs_the_same_for_1_and_30_models(
    admin_client: Client, count: int, django_assert_num_queries: Callable[..., Any]
) -> None:
    for n in range(count):
        ServedModel.objects.create(name=f"model-{n:02d}", aliases=[f"alias-{n:02d}"])
    admin_client.get(reverse("admin:gateway_servedmodel_changelist"))  # token counters loaded

    with django_assert_num_queries(MODEL_LIST_QUERIES):
        response = admin_client.get(reverse("admin:gateway_servedmodel_changelist"))

    assert response.context["cl"].result_count == count


def test_the_served_model_page_costs_a_fixed_number_of_queries(
    admin_client: Client, django_assert_num_queries: Callable[..., Any]
) -> None:
    model = ServedModel.objects.create(name="one", aliases=["x", "y"])
    url = reverse("admin:gateway_servedmodel_change", args=[model.pk])
    admin_client.get(url)

    with django_assert_num_queries(MODEL_PAGE_QUERIES):
        response = admin_client.get(url)

    assert "x\ny</textarea>" in response.content.decode()
