"""Upstream kinds: what the gateway and the scraper ask each kind of model server for."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from gateway import upstream_kinds
from gateway.upstream_kinds import DetectedKinds, kind_from_models
from telemetry import sglang

VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="Qwen/Qwen2.5-7B-Instruct"} 3.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="Qwen/Qwen2.5-7B-Instruct"} 2.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{model_name="Qwen/Qwen2.5-7B-Instruct"} 0.25
# TYPE vllm:prompt_tokens counter
vllm:prompt_tokens_total{model_name="Qwen/Qwen2.5-7B-Instruct"} 1200.0
# TYPE vllm:generation_tokens counter
vllm:generation_tokens_total{model_name="Qwen/Qwen2.5-7B-Instruct"} 800.0
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{model_name="Qwen/Qwen2.5-7B-Instruct"} 300.0
# TYPE vllm:request_success counter
vllm:request_success_total{finished_reason="stop",model_name="Qwen/Qwen2.5-7B-Instruct"} 7.0
vllm:request_success_total{finished_reason="length",model_name="Qwen/Qwen2.5-7B-Instruct"} 3.0
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_sum{model_name="Qwen/Qwen2.5-7B-Instruct"} 1.5
vllm:time_to_first_token_seconds_count{model_name="Qwen/Qwen2.5-7B-Instruct"} 10.0
"""


def models_answer(owner: str) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": "m", "object": "model", "owned_by": owner}]}


@pytest.mark.parametrize(
    ("owner", "kind"),
    [("sglang", "sglang"), ("vllm", "vllm"), ("llamacpp", "llama.cpp"), ("me", "openai")],
)
def test_the_kind_is_told_by_owned_by(owner: str, kind: str) -> None:
    assert kind_from_models(models_answer(owner)) == kind


def test_an_answer_without_models_is_a_generic_server() -> None:
    assert kind_from_models({"data": []}) == "openai"
    assert kind_from_models("not json") == "openai"


def test_a_set_kind_needs_no_detection_and_auto_waits_for_it() -> None:
    kinds = DetectedKinds()
    assert kinds.kind("http://a", "vllm") == "vllm"
    assert kinds.kind("http://a", "auto") is None
    kinds.learn("http://a", "llama.cpp")
    assert kinds.kind("http://a", "auto") == "llama.cpp"
    assert kinds.kind("http://b", "auto") is None


def test_a_learnt_kind_expires() -> None:
    kinds = DetectedKinds(ttl=-1.0)
    kinds.learn("http://a", "sglang")
    assert kinds.kind("http://a", "auto") is None


class _Model:
    def __init__(self, url: str, kind: str, *more: str) -> None:
        self.upstream_url, self.upstream_kind, self.more = url, kind, more

    def servers(self) -> tuple[str, ...]:
        return (self.upstream_url, *self.more)


def test_models_sharing_an_upstream_take_the_kind_one_of_them_sets() -> None:
    models = [_Model("http://a", "auto"), _Model("http://a", "vllm"), _Model("http://b", "auto")]
    assert upstream_kinds.upstreams(models) == {"http://a": "vllm", "http://b": "auto"}
    # Every server of a model with several, each with the model's kind.
    several = [_Model("http://a", "sglang", "http://c"), _Model("http://c", "auto")]
    assert upstream_kinds.upstreams(several) == {"http://a": "sglang", "http://c": "sglang"}


def test_the_liveness_probe_is_what_the_kind_has() -> None:
    assert upstream_kinds.traits("sglang").liveness_path == "/health"
    assert upstream_kinds.traits("vllm").liveness_path == "/health"
    assert upstream_kinds.traits("llama.cpp").liveness_path == "/v1/models"
    assert upstream_kinds.traits("openai").liveness_path == "/v1/models"
    assert upstream_kinds.traits("unknown").liveness_path == "/v1/models"
    assert upstream_kinds.traits("sglang").abort_path == "/abort_request"
    assert not upstream_kinds.traits("vllm").abort_path


def _scrape(routes: dict[str, httpx.Response], url: str, kind: str) -> tuple[Any, list[str]]:
    asked: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.path)
        return routes.get(request.url.path, httpx.Response(404))

    async def run() -> sglang.Sample:
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
            return await sglang.scrape(url, client, kind)

    return asyncio.run(run()), asked


def test_a_generic_server_is_scraped_through_v1_models_only() -> None:
    routes = {"/v1/models": httpx.Response(200, json=models_answer("me"))}
    sample, asked = _scrape(routes, "http://generic-1:8000", "auto")

    assert asked == ["/v1/models"]  # detection's answer is the sample: no SGLang-only 404s
    assert sample.ok and sample.error == "" and sample.model_name == "m"
    assert sample.running_requests is None

    again, asked = _scrape(routes, "http://generic-1:8000", "auto")
    assert asked == ["/v1/models"] and again.ok


def test_a_set_llama_cpp_kind_is_not_probed_for_sglang_routes() -> None:
    routes = {"/v1/models": httpx.Response(200, json=models_answer("llamacpp"))}
    sample, asked = _scrape(routes, "http://llama-1:8080", "llama.cpp")
    assert asked == ["/v1/models"] and sample.ok


def test_a_down_generic_server_is_a_sample_with_the_error() -> None:
    sample, asked = _scrape({}, "http://generic-2:8000", "openai")
    assert asked == ["/v1/models"]
    assert not sample.ok and "HTTP 404" in sample.error


def test_vllm_metrics_are_read_with_vllm_names() -> None:
    routes = {"/metrics": httpx.Response(200, text=VLLM_METRICS)}
    sample, asked = _scrape(routes, "http://vllm-1:8000", "vllm")

    assert asked == ["/metrics"]  # no /get_server_info, no /get_load
    assert sample.ok and sample.error == ""
    assert (sample.running_requests, sample.queued_requests) == (3.0, 2.0)
    assert sample.kv_cache_usage == 0.25
    assert (sample.prompt_tokens_total, sample.generation_tokens_total) == (1200.0, 800.0)
    assert sample.cached_tokens_total == 300.0
    assert sample.requests_total == 10.0  # summed over finish reasons
    assert (sample.ttft_sum, sample.ttft_count) == (1.5, 10.0)
    assert sample.model_name == "Qwen/Qwen2.5-7B-Instruct"


def test_an_auto_sglang_server_is_detected_then_scraped_as_before() -> None:
    routes = {
        "/v1/models": httpx.Response(200, json=models_answer("sglang")),
        "/metrics": httpx.Response(200, text="sglang:num_running_reqs 4\n"),
        "/get_server_info": httpx.Response(200, json={"version": "0.5.4"}),
        "/get_load": httpx.Response(200, json=[{"dp_rank": 0, "num_reqs": 4}]),
    }
    sample, asked = _scrape(routes, "http://sglang-auto:30000", "auto")
    assert asked[0] == "/v1/models"
    assert sorted(asked[1:]) == ["/get_load", "/get_server_info", "/metrics"]
    assert sample.running_requests == 4.0 and sample.server_info == {"version": "0.5.4"}


@pytest.mark.django_db
def test_scrape_targets_carry_each_upstreams_kind(settings: Any) -> None:
    from gateway.models import ServedModel

    settings.SGLANG_URL = "http://default:30000"
    ServedModel.objects.create(
        name="a", upstream_url="http://llama:8080", upstream_kind="llama.cpp"
    )
    ServedModel.objects.create(name="b", upstream_url="")
    ServedModel.objects.create(name="c", upstream_url="http://off:1", is_active=False)

    assert sglang.upstream_targets() == {
        "http://llama:8080": "llama.cpp",
        "http://default:30000": "auto",
    }
