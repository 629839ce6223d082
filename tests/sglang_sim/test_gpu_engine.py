"""The simulator's GPU-like engine (`--engine gpu`) as a real process: continuous batching (one
forward pass serves every running request), the KV budget and the queue, the prefix cache,
priorities and the queue cap. Counted in steps and orders, never in seconds."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.procs import simulator, wait_until
from tests.sglang_sim.test_simulator import MODEL, metrics

pytestmark = pytest.mark.slow
SYSTEM = "당신은 친절한 한국어 비서입니다. " * 12  # a shared system prompt of a few blocks


def gpu(*extra: str) -> Any:
    return simulator(MODEL, extra=("--engine", "gpu", *extra))


def ask(url: str, text: str, tokens: int, **body: Any) -> httpx.Response:
    payload = {"model": MODEL, "max_tokens": tokens,
               "messages": [{"role": "system", "content": SYSTEM},
                            {"role": "user", "content": text}], **body}  # fmt: skip
    return httpx.post(f"{url}/v1/chat/completions", json=payload, timeout=60)


def together(calls: list[Any]) -> list[Any]:
    """Run the calls at once (threads), results in order."""
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        results[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


def stats(url: str) -> dict[str, Any]:
    return dict(httpx.get(f"{url}/sim/stats").json())


@pytest.fixture(scope="module")
def batched() -> Iterator[str]:
    # Steps slow enough that 8 requests sent together are all in the queue for the first one.
    with gpu("--step-base-ms", "20", "--step-per-request-ms", "0") as url:
        yield url


def test_one_step_serves_the_whole_batch(batched: str) -> None:
    before = stats(batched)["steps"]
    answers = together([lambda i=i: ask(batched, f"질문 {i}", 30) for i in range(8)])
    assert all(a.json()["usage"]["completion_tokens"] == 30 for a in answers)
    steps = stats(batched)["steps"] - before
    # Eight requests of thirty tokens: thirty-odd forward passes (arrivals spread over a few),
    # where one request at a time would take 240.
    assert 30 <= steps <= 60, steps
    assert stats(batched)["peak_running"] == 8


def test_a_one_request_batch_takes_a_step_per_request() -> None:
    with gpu("--step-base-ms", "5", "--max-running-requests", "2") as url:
        before = stats(url)["steps"]
        together([lambda i=i: ask(url, f"질문 {i}", 10) for i in range(6)])
        steps = stats(url)["steps"] - before
        assert stats(url)["peak_running"] == 2
        assert steps >= 30, steps  # three rounds of ten: the queue waited for places


def test_the_kv_budget_limits_the_batch_and_the_rest_queues() -> None:
    # Each request needs its prompt (~150 tokens) and 200 answer tokens: two fit in 800.
    with gpu("--max-total-tokens", "800", "--step-base-ms", "10") as url:
        seen: dict[str, float] = {"queued": 0.0, "running": 0.0}
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                values = metrics(url)
                seen["queued"] = max(seen["queued"], values["sglang:num_queue_reqs"])
                seen["running"] = max(seen["running"], values["sglang:num_running_reqs"])
                load = httpx.get(f"{url}/get_load").json()[0]
                assert load["num_reqs"] >= load["num_waiting_reqs"]
                time.sleep(0.05)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            answers = together([lambda i=i: ask(url, f"긴 답 {i}", 200) for i in range(5)])
        finally:
            done.set()
            watcher.join()
        assert all(a.status_code == 200 for a in answers)
        assert stats(url)["peak_running"] == 2
        assert seen["queued"] >= 1 and seen["running"] == 2
        # A request larger than the whole pool is refused, not queued forever.
        assert ask(url, "너무 긴 답", 790).status_code == 400


def test_a_repeated_system_prompt_hits_the_prefix_cache() -> None:
    with gpu() as url:
        first = ask(url, "첫 질문입니다.", 4).json()["usage"]
        second = ask(url, "두 번째 질문입니다.", 4).json()["usage"]
        cached = second["prompt_tokens_details"]["cached_tokens"]
        assert (first.get("prompt_tokens_details") or {}).get("cached_tokens", 0) == 0
        # The shared system prompt, by whole blocks of 16 tokens, less than the whole prompt.
        assert cached >= 48 and cached % 16 == 0 and cached < second["prompt_tokens"]
        assert metrics(url)["sglang:cache_hit_rate"] > 0
    with gpu("--disable-radix-cache") as url:
        ask(url, "첫 질문입니다.", 4)
        usage = ask(url, "두 번째 질문입니다.", 4).json()["usage"]
        assert (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0) == 0


def in_engine(url: str) -> float:
    """Requests the engine holds: running and queued."""
    values = metrics(url)
    return values["sglang:num_running_reqs"] + values["sglang:num_queue_reqs"]


def in_order(url: str, calls: list[tuple[str, Any]]) -> list[httpx.Response]:
    """Start each call once the ones before it are running or queued (the engine's own
    counts, not sleeps), all running together."""
    results: list[httpx.Response] = []
    threads = []
    for index, (_, call) in enumerate(calls):
        thread = threading.Thread(target=lambda call=call: results.append(call()))
        thread.start()
        threads.append(thread)
        wait_until(f"call {index} in the engine", lambda n=index + 1: in_engine(url) >= n)
    for thread in threads:
        thread.join(timeout=120)
    return results


def test_priority_scheduling_serves_the_higher_priority_first() -> None:
    with gpu("--max-running-requests", "1", "--enable-priority-scheduling",
             "--step-base-ms", "10") as url:  # fmt: skip
        finished: list[str] = []

        def tagged(name: str, priority: int, tokens: int) -> httpx.Response:
            answer = ask(url, name, tokens, priority=priority)
            finished.append(name)
            return answer

        # "busy" holds the only place; "low" then "high" queue behind it, in that order.
        in_order(url, [
            ("busy", lambda: tagged("busy", 0, 200)),
            ("low", lambda: tagged("low", 1, 5)),
            ("high", lambda: tagged("high", 9, 5)),
        ])  # fmt: skip
        assert finished == ["busy", "high", "low"]
        bad = ask(url, "x", 1, priority="high")
        assert bad.status_code == 400


def test_a_full_queue_refuses_with_503() -> None:
    with gpu("--max-running-requests", "1", "--max-queued-requests", "1",
             "--step-base-ms", "10") as url:  # fmt: skip
        holders = []
        for count, tokens in enumerate((300, 5), start=1):
            holder = threading.Thread(target=lambda t=tokens: ask(url, "대기열", t))
            holder.start()
            holders.append(holder)
            wait_until("in the engine", lambda n=count: in_engine(url) >= n)
        refused = ask(url, "대기열", 5)
        assert refused.status_code == 503
        for holder in holders:
            holder.join(timeout=60)
