"""Scraping SGLang: parsing its /metrics, the scrape task against a simulator process, rates
between samples, retention."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from django.utils import timezone

from gateway.models import ServedModel
from telemetry import services, sglang
from telemetry.models import SGLangSample
from telemetry.tasks import prune, scrape_sglang
from tests.procs import free_port, simulator

MODEL = "Qwen/Qwen2.5-7B-Instruct"

# /metrics of `python -m sglang.launch_server --model-path Qwen/Qwen2.5-7B-Instruct --tp-size 2
# --dp-size 2 --enable-dp-attention --enable-metrics`: the schedulers of the two dp ranks report
# their gauges separately (labels tp_rank/dp_rank), the tokenizer manager reports counters and
# histograms once. Bucket lists shortened; `_created` series as prometheus_client writes them.
RECORDED_METRICS = """\
# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{dp_rank="0",model_name="Qwen/Qwen2.5-7B-Instruct",tp_rank="0"} 12.0
sglang:num_running_reqs{dp_rank="1",model_name="Qwen/Qwen2.5-7B-Instruct",tp_rank="1"} 9.0
# HELP sglang:num_used_tokens The number of used tokens.
# TYPE sglang:num_used_tokens gauge
sglang:num_used_tokens{dp_rank="0",model_name="Qwen/Qwen2.5-7B-Instruct",tp_rank="0"} 254311.0
sglang:num_used_tokens{dp_rank="1",model_name="Qwen/Qwen2.5-7B-Instruct",tp_rank="1"} 237904.0
# HELP sglang:token_usage The token usage.
# TYPE sglang:token_usage gauge
sglang:token_usage{dp_rank="0",model_name="Qwen/Qwen2.5-7B-Instruct",tp_rank="0"} 0.62
sglang:token_usage{dp_rank="1",model_name="Qwen/Qwen2.5-7B-Instruct",tp_rank="1"} 0.58
# HELP sglang:gen_throughput The generation throughput (token/s).
# TYPE sglang:gen_throughput gauge
sglang:gen_throughput{dp_rank="0",model_name="Qwen/Qwen2.5-7B-Instruct",tp_rank="0"} 1834.5
sglang:gen_throughput{dp_rank="1",model_name="Qwen/Qwen2.5-7B-Instruct",tp_rank="1"} 1790.25
# HELP sglang:num_queue_reqs The number of requests in the waiting queue.
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{dp_rank="0",model_name="Qwen/Qwen2.5-7B-Instruct",tp_rank="0"} 3.0
sglang:num_queue_reqs{dp_rank="1",model_name="Qwen/Qwen2.5-7B-Instruct",tp_rank="1"} 0.0
# HELP sglang:cache_hit_rate The prefix cache hit rate.
# TYPE sglang:cache_hit_rate gauge
sglang:cache_hit_rate{dp_rank="0",model_name="Qwen/Qwen2.5-7B-Instruct",tp_rank="0"} 0.41
sglang:cache_hit_rate{dp_rank="1",model_name="Qwen/Qwen2.5-7B-Instruct",tp_rank="1"} 0.37
# HELP sglang:num_retracted_reqs The number of retracted requests.
# TYPE sglang:num_retracted_reqs gauge
sglang:num_retracted_reqs{dp_rank="0",model_name="Qwen/Qwen2.5-7B-Instruct",tp_rank="0"} 0.0
sglang:num_retracted_reqs{dp_rank="1",model_name="Qwen/Qwen2.5-7B-Instruct",tp_rank="1"} 1.0
# HELP sglang:prompt_tokens_total Number of prefill tokens processed.
# TYPE sglang:prompt_tokens_total counter
sglang:prompt_tokens_total{model_name="Qwen/Qwen2.5-7B-Instruct"} 4.882260e+06
sglang:prompt_tokens_created{model_name="Qwen/Qwen2.5-7B-Instruct"} 1.7518e+09
# HELP sglang:generation_tokens_total Number of generation tokens processed.
# TYPE sglang:generation_tokens_total counter
sglang:generation_tokens_total{model_name="Qwen/Qwen2.5-7B-Instruct"} 1.397950e+05
sglang:generation_tokens_created{model_name="Qwen/Qwen2.5-7B-Instruct"} 1.7518e+09
# HELP sglang:cached_tokens_total Number of cached prompt tokens.
# TYPE sglang:cached_tokens_total counter
sglang:cached_tokens_total{model_name="Qwen/Qwen2.5-7B-Instruct"} 1.903081e+06
# HELP sglang:num_requests_total Number of requests processed.
# TYPE sglang:num_requests_total counter
sglang:num_requests_total{model_name="Qwen/Qwen2.5-7B-Instruct"} 1523.0
# HELP sglang:num_aborted_requests_total Number of requests aborted.
# TYPE sglang:num_aborted_requests_total counter
sglang:num_aborted_requests_total{model_name="Qwen/Qwen2.5-7B-Instruct"} 17.0
# HELP sglang:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE sglang:time_to_first_token_seconds histogram
sglang:time_to_first_token_seconds_bucket{le="0.1",model_name="Qwen/Qwen2.5-7B-Instruct"} 402.0
sglang:time_to_first_token_seconds_bucket{le="0.25",model_name="Qwen/Qwen2.5-7B-Instruct"} 1187.0
sglang:time_to_first_token_seconds_bucket{le="0.5",model_name="Qwen/Qwen2.5-7B-Instruct"} 1431.0
sglang:time_to_first_token_seconds_bucket{le="1.0",model_name="Qwen/Qwen2.5-7B-Instruct"} 1498.0
sglang:time_to_first_token_seconds_bucket{le="2.5",model_name="Qwen/Qwen2.5-7B-Instruct"} 1523.0
sglang:time_to_first_token_seconds_bucket{le="+Inf",model_name="Qwen/Qwen2.5-7B-Instruct"} 1523.0
sglang:time_to_first_token_seconds_sum{model_name="Qwen/Qwen2.5-7B-Instruct"} 287.625
sglang:time_to_first_token_seconds_count{model_name="Qwen/Qwen2.5-7B-Instruct"} 1523.0
sglang:time_to_first_token_seconds_created{model_name="Qwen/Qwen2.5-7B-Instruct"} 1.7518e+09
# HELP sglang:inter_token_latency_seconds Histogram of inter-token latency in seconds.
# TYPE sglang:inter_token_latency_seconds histogram
sglang:inter_token_latency_seconds_bucket{le="0.01",model_name="Qwen/Qwen2.5-7B-Instruct"} 51020.0
sglang:inter_token_latency_seconds_bucket{le="0.02",model_name="Qwen/Qwen2.5-7B-Instruct"} 121877.0
sglang:inter_token_latency_seconds_bucket{le="0.04",model_name="Qwen/Qwen2.5-7B-Instruct"} 137911.0
sglang:inter_token_latency_seconds_bucket{le="+Inf",model_name="Qwen/Qwen2.5-7B-Instruct"} 138272.0
sglang:inter_token_latency_seconds_sum{model_name="Qwen/Qwen2.5-7B-Instruct"} 2176.5
sglang:inter_token_latency_seconds_count{model_name="Qwen/Qwen2.5-7B-Instruct"} 138272.0
# HELP sglang:e2e_request_latency_seconds Histogram of End-to-end request latency in seconds
# TYPE sglang:e2e_request_latency_seconds histogram
sglang:e2e_request_latency_seconds_bucket{le="1.0",model_name="Qwen/Qwen2.5-7B-Instruct"} 211.0
sglang:e2e_request_latency_seconds_bucket{le="2.0",model_name="Qwen/Qwen2.5-7B-Instruct"} 804.0
sglang:e2e_request_latency_seconds_bucket{le="5.0",model_name="Qwen/Qwen2.5-7B-Instruct"} 1390.0
sglang:e2e_request_latency_seconds_bucket{le="+Inf",model_name="Qwen/Qwen2.5-7B-Instruct"} 1523.0
sglang:e2e_request_latency_seconds_sum{model_name="Qwen/Qwen2.5-7B-Instruct"} 3512.75
sglang:e2e_request_latency_seconds_count{model_name="Qwen/Qwen2.5-7B-Instruct"} 1523.0
# HELP sglang:func_latency_seconds Function latency in seconds
# TYPE sglang:func_latency_seconds histogram
sglang:func_latency_seconds_bucket{le="0.05",name="generate_request"} 1523.0
sglang:func_latency_seconds_bucket{le="+Inf",name="generate_request"} 1523.0
sglang:func_latency_seconds_sum{name="generate_request"} 3.25
sglang:func_latency_seconds_count{name="generate_request"} 1523.0
"""


# --- (a) Parsing a recorded /metrics ------------------------------------------------------------


def test_recorded_metrics_parse_to_exact_values() -> None:
    parsed = sglang.parse_metrics(RECORDED_METRICS)
    assert parsed.model_names == [MODEL]
    assert parsed.values == {
        # Gauges of the two dp ranks: counts and throughput summed, fractions averaged.
        "running_requests": 21.0,
        "queued_requests": 3.0,
        "kv_cache_usage": pytest.approx(0.60),
        "prefix_cache_hit_rate": pytest.approx(0.39),
        "generation_throughput": 3624.75,
        # Counters: the parser names the family without `_total`, the samples keep it.
        "prompt_tokens_total": 4882260.0,
        "generation_tokens_total": 139795.0,
        "cached_tokens_total": 1903081.0,
        "requests_total": 1523.0,
        "aborted_requests_total": 17.0,
        # Histograms: only _sum and _count.
        "ttft_sum": 287.625,
        "ttft_count": 1523.0,
        "itl_sum": 2176.5,
        "itl_count": 138272.0,
        "e2e_sum": 3512.75,
        "e2e_count": 1523.0,
    }


def test_counters_of_several_models_are_summed_and_names_kept() -> None:
    text = (
        "# TYPE sglang:num_requests_total counter\n"
        'sglang:num_requests_total{model_name="a"} 3.0\n'
        'sglang:num_requests_total{model_name="b"} 4.0\n'
        "# TYPE sglang:num_running_reqs gauge\n"
        'sglang:num_running_reqs{model_name="b"} 2.0\n'
        'sglang:num_running_reqs{model_name="a"} NaN\n'
    )
    parsed = sglang.parse_metrics(text)
    assert parsed.values == {"requests_total": 7.0, "running_requests": 2.0}
    assert parsed.model_names == ["a", "b"]


def test_priority_buckets_are_not_counted_twice() -> None:
    # With priority scheduling SGLang adds an aggregate series with priority="".
    text = (
        "# TYPE sglang:num_running_reqs gauge\n"
        'sglang:num_running_reqs{priority="",tp_rank="0"} 14.0\n'
        'sglang:num_running_reqs{priority="1",tp_rank="0"} 10.0\n'
        'sglang:num_running_reqs{priority="5",tp_rank="0"} 4.0\n'
    )
    assert sglang.parse_metrics(text).values == {"running_requests": 14.0}


def test_unparseable_metrics_are_an_error_not_an_exception() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/metrics":
            return httpx.Response(200, text='sglang:num_running_reqs{model_name="a" 1\n')
        return httpx.Response(200, json=[])

    sample = _scrape_mocked(answer)
    assert sample.ok
    assert sample.error.startswith("/metrics: unparseable")
    assert sample.running_requests is None


# --- Fallback routes and the kept subset of server info -----------------------------------------

NEW_SERVER_INFO: dict[str, Any] = {
    "model_path": MODEL,
    "served_model_name": MODEL,
    "tp_size": 2,
    "dp_size": 2,
    "context_length": None,
    "api_key": "sk-secret",
    "mem_fraction_static": 0.88,
    "max_total_num_tokens": 409600,
    "max_req_input_len": 32762,
    "version": "0.5.4",
    "internal_states": [
        {"last_gen_throughput": 1834.5, "memory_usage": {"weight": 7.6}},
        {"last_gen_throughput": 1790.25, "memory_usage": {"weight": 7.6}},
    ],
}


def _scrape_mocked(answer: Any, url: str = "http://sglang:30000/") -> sglang.Sample:
    import asyncio

    async def run() -> sglang.Sample:
        transport = httpx.MockTransport(answer)
        async with httpx.AsyncClient(transport=transport) as client:
            return await sglang.scrape(url, client)

    return asyncio.run(run())


def test_newer_route_names_are_used_when_the_old_ones_are_gone() -> None:
    routes = {
        "/metrics": httpx.Response(200, text=RECORDED_METRICS),
        "/server_info": httpx.Response(200, json=NEW_SERVER_INFO),
        "/v1/loads": httpx.Response(
            200, json={"loads": [{"dp_rank": 0, "num_reqs": 15, "num_waiting_reqs": 3}]}
        ),
    }
    asked: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.path)
        return routes.get(request.url.path, httpx.Response(404, json={"detail": "Not Found"}))

    sample = _scrape_mocked(answer)
    assert sorted(asked) == [
        "/get_load",
        "/get_server_info",
        "/metrics",
        "/server_info",
        "/v1/loads",
    ]
    assert sample.ok and sample.error == ""
    assert sample.upstream_url == "http://sglang:30000"
    assert sample.model_name == MODEL
    assert sample.requests_total == 1523.0
    assert sample.server_info == {
        "version": "0.5.4",
        "model_path": MODEL,
        "served_model_name": MODEL,
        "tp_size": 2,
        "dp_size": 2,
        "context_length": None,
        "max_total_num_tokens": 409600,
        "max_req_input_len": 32762,
        "last_gen_throughput": 3624.75,
    }
    assert sample.load == [{"dp_rank": 0, "num_reqs": 15, "num_waiting_reqs": 3}]


def test_metrics_disabled_is_reachable_with_an_error() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/get_server_info":
            return httpx.Response(200, json=NEW_SERVER_INFO)
        if request.url.path == "/get_load":
            return httpx.Response(200, json=[{"num_reqs": 0}])
        return httpx.Response(404)

    sample = _scrape_mocked(answer)
    assert sample.ok
    assert sample.error == "/metrics: HTTP 404"
    assert sample.model_name == MODEL  # from served_model_name
    assert sample.running_requests is None and sample.requests_total is None


# --- (b) The task against a simulator process ---------------------------------------------------


@pytest.fixture(scope="module")
def sim() -> Iterator[str]:
    with simulator(MODEL, tokens_per_second=2000, ttft_ms=5) as url:
        yield url


def _chat(url: str, max_tokens: int = 8) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "서울의 인구는 몇 명인가요?"}],
        "max_tokens": max_tokens,
    }
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=10)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == max_tokens


@pytest.mark.slow
@pytest.mark.django_db
def test_scrape_task_stores_a_sample_of_the_simulator(sim: str, settings: Any) -> None:
    settings.SGLANG_URL = f"http://127.0.0.1:{free_port()}"  # not asked: a model names its own
    ServedModel.objects.create(name=MODEL, upstream_url=sim + "/")
    ServedModel.objects.create(name="another-name-same-server", upstream_url=sim)
    ServedModel.objects.create(
        name="switched-off", upstream_url="http://10.0.0.1:1", is_active=False
    )

    scrape_sglang.apply().get()
    before = SGLangSample.objects.get()
    assert before.ok, before.error
    _chat(sim)
    _chat(sim)
    scrape_sglang.apply().get()

    after = SGLangSample.objects.latest("scraped_at")
    assert SGLangSample.objects.count() == 2  # one upstream, scraped twice
    assert after.upstream_url == sim
    assert after.ok and after.error == ""
    assert after.model_name == MODEL
    assert after.requests_total is not None and after.requests_total >= 2
    assert after.ttft_count is not None and after.ttft_count >= 2
    assert after.itl_count is not None and after.itl_count >= 2
    assert after.e2e_count is not None and after.e2e_count >= 2
    assert after.generation_tokens_total is not None and after.generation_tokens_total >= 16
    assert after.prompt_tokens_total is not None and after.prompt_tokens_total > 0
    assert after.running_requests == 0 and after.queued_requests == 0
    assert after.kv_cache_usage is not None and after.prefix_cache_hit_rate is not None
    assert after.server_info["version"] == "0.0.0-simulator"
    assert after.server_info["max_total_num_tokens"] == 262144
    assert after.server_info["served_model_name"] == MODEL
    assert "last_gen_throughput" in after.server_info
    assert "simulator" not in after.server_info  # not a dump of every server argument
    assert after.load and after.load[0]["num_reqs"] == 0

    rates = sglang.derived(before, after)
    assert rates["reset"] is False
    assert rates["requests_per_second"] > 0
    assert rates["generation_tokens_per_second"] > 0
    assert rates["ttft_mean_seconds"] >= 0.005  # the simulator waits 5 ms before a first token
    assert rates["itl_mean_seconds"] > 0


# --- (c) A dead upstream ------------------------------------------------------------------------


@pytest.mark.django_db
def test_dead_upstream_gives_a_row_with_the_error(settings: Any) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    settings.SGLANG_URL = dead  # no served models: the setting is scraped
    assert ServedModel.objects.filter(is_active=True).count() == 0

    assert scrape_sglang.apply().get() == 1
    row = SGLangSample.objects.get()
    assert row.upstream_url == dead
    assert not row.ok
    assert "ConnectError" in row.error
    assert row.requests_total is None and row.server_info == {} and row.load == []


@pytest.mark.django_db
def test_blank_upstream_means_the_setting(settings: Any) -> None:
    settings.SGLANG_URL = "http://sglang:8000"
    ServedModel.objects.create(name="a")
    ServedModel.objects.create(name="b", upstream_url="http://sglang:8000/")
    ServedModel.objects.create(name="c", upstream_url="http://other:8000")
    assert sglang.upstream_urls() == ["http://sglang:8000", "http://other:8000"]


# --- (d) Rates between two samples --------------------------------------------------------------

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


def _sample(at: datetime, **totals: float | None) -> SGLangSample:
    return SGLangSample(upstream_url="http://sglang:8000", scraped_at=at, **totals)


def test_derived_rates_and_interval_means() -> None:
    prev = _sample(
        T0,
        requests_total=100,
        aborted_requests_total=1,
        prompt_tokens_total=50_000,
        generation_tokens_total=20_000,
        cached_tokens_total=10_000,
        ttft_sum=20.0,
        ttft_count=100,
        itl_sum=400.0,
        itl_count=19_900,
        e2e_sum=300.0,
        e2e_count=100,
    )
    cur = _sample(
        T0 + timedelta(seconds=10),
        requests_total=120,
        aborted_requests_total=1,
        prompt_tokens_total=60_000,
        generation_tokens_total=24_000,
        cached_tokens_total=14_000,
        ttft_sum=25.0,
        ttft_count=120,
        itl_sum=480.0,
        itl_count=23_880,
        e2e_sum=360.0,
        e2e_count=120,
    )
    assert sglang.derived(prev, cur) == {
        "seconds": 10.0,
        "reset": False,
        "requests_per_second": 2.0,
        "aborted_per_second": 0.0,
        "prompt_tokens_per_second": 1000.0,
        "generation_tokens_per_second": 400.0,
        "prefix_cache_hit_rate": 0.4,
        "ttft_mean_seconds": 0.25,
        "itl_mean_seconds": pytest.approx(80 / 3980),
        "e2e_mean_seconds": 3.0,
    }


def test_derived_after_a_restart_counts_from_zero() -> None:
    # The server restarted between the samples: counters began again at 0. Prompt tokens grew
    # past the old total since, which alone would look like an increase of 500.
    prev = _sample(
        T0, requests_total=1000, prompt_tokens_total=9_500, ttft_sum=200.0, ttft_count=1000
    )
    cur = _sample(
        T0 + timedelta(seconds=5),
        requests_total=4,
        prompt_tokens_total=10_000,
        ttft_sum=1.0,
        ttft_count=4,
    )
    rates = sglang.derived(prev, cur)
    assert rates["reset"] is True
    assert rates["requests_per_second"] == 0.8
    assert rates["prompt_tokens_per_second"] == 2000.0
    assert rates["ttft_mean_seconds"] == 0.25


def test_derived_with_an_unreachable_side_or_no_requests() -> None:
    down = _sample(T0)  # ok=False rows have no totals
    up = _sample(T0 + timedelta(seconds=5), requests_total=4, ttft_sum=1.0, ttft_count=4)
    rates = sglang.derived(down, up)
    assert rates["reset"] is False
    assert rates["requests_per_second"] is None and rates["ttft_mean_seconds"] is None

    idle = _sample(T0 + timedelta(seconds=10), requests_total=4, ttft_sum=1.0, ttft_count=4)
    rates = sglang.derived(up, idle)
    assert rates["requests_per_second"] == 0.0
    assert rates["ttft_mean_seconds"] is None  # no request in the interval
    assert sglang.derived(idle, idle)["requests_per_second"] is None  # no interval


# --- Services and (e) pruning -------------------------------------------------------------------


@pytest.mark.django_db
def test_record_samples_stores_every_field() -> None:
    sample = sglang.Sample(
        upstream_url="http://sglang:8000",
        scraped_at=T0,
        model_name=MODEL,
        running_requests=3.0,
        ttft_sum=1.5,
        server_info={"version": "0.5.4"},
        load=[{"num_reqs": 3}],
    )
    [row] = services.record_samples([sample])
    stored = SGLangSample.objects.get(pk=row.pk)
    assert stored.scraped_at == T0
    assert (stored.running_requests, stored.ttft_sum, stored.queued_requests) == (3.0, 1.5, None)
    assert stored.server_info == {"version": "0.5.4"} and stored.load == [{"num_reqs": 3}]
    assert json.loads(json.dumps(sample.as_fields(), default=str))["model_name"] == MODEL
    assert services.record_samples([]) == []


@pytest.mark.django_db
def test_prune_deletes_only_rows_past_retention(settings: Any) -> None:
    settings.TELEMETRY_RETENTION_DAYS = 14
    now = timezone.now()
    ages = {"old": timedelta(days=15), "edge": timedelta(days=13, hours=23), "new": timedelta()}
    services.record_samples(
        sglang.Sample(upstream_url=f"http://{name}:8000", scraped_at=now - age)
        for name, age in ages.items()
    )

    result = prune.apply().get()

    assert result["sglang_samples"] == 1
    kept = set(SGLangSample.objects.values_list("upstream_url", flat=True))
    assert kept == {"http://edge:8000", "http://new:8000"}


# --- The admin ----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_admin_lists_samples_read_only(admin_client: Any) -> None:
    services.record_samples(
        [
            sglang.Sample(
                upstream_url="http://sglang:8000",
                scraped_at=T0,
                running_requests=21,
                kv_cache_usage=0.625,
                prefix_cache_hit_rate=0.39,
                generation_throughput=3624.75,
            ),
            sglang.Sample(upstream_url="http://down:8000", scraped_at=T0, ok=False, error="x"),
        ]
    )
    base = "/admin/telemetry/sglangsample/"
    page = admin_client.get(base, {"ok__exact": "1", "upstream_url": "http://sglang:8000"})
    assert page.status_code == 200
    text = page.content.decode()
    assert "62.5%" in text and "39.0%" in text and "3,624.8" in text
    assert "http://down:8000</td>" not in text
    assert admin_client.get(base + "add/").status_code == 403
    row = SGLangSample.objects.get(ok=True)
    assert admin_client.post(base + f"{row.pk}/delete/").status_code == 403
    assert admin_client.get(base + f"{row.pk}/change/").status_code == 200  # view only
