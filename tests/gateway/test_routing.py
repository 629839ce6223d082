"""The router's choices for a model with several servers (gateway/routing.py): affinity,
balance, ejection and recovery. Time is injected; the real servers are in
test_routing_gateway.py."""

from __future__ import annotations

import collections

import pytest

from gateway.caches import ModelInfo
from gateway.routing import (
    AFFINITY_SLACK,
    EJECT_AFTER,
    EJECT_SECONDS,
    Router,
    reported_load,
    routing_key,
)

A, B, C = "http://a:8000", "http://b:8000", "http://c:8000"


def model(*urls: str) -> ModelInfo:
    return ModelInfo("m", (), urls[0], "", 32768, None, 300.0, upstream_urls=urls)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def router(clock: Clock) -> Router:
    return Router(clock)


def test_one_server_is_the_answer_with_no_bookkeeping(router: Router) -> None:
    assert router.choose(model(A), "u:1") == A
    assert router.choose(model(A), "u:1", frozenset({A})) == ""
    assert router.servers == {}


def test_a_key_keeps_its_server_and_keys_spread(router: Router) -> None:
    two = model(A, B)
    chosen = {f"u:{n}": router.choose(two, f"u:{n}") for n in range(400)}
    assert all(router.choose(two, key) == url for key, url in chosen.items())
    spread = collections.Counter(chosen.values())
    assert spread[A] > 120 and spread[B] > 120, spread


def test_a_server_leaving_moves_only_its_keys(router: Router) -> None:
    three = model(A, B, C)
    before = {f"u:{n}": router.choose(three, f"u:{n}") for n in range(300)}
    router.refused(C)
    after = {key: router.choose(three, key) for key in before}
    moved = [key for key in before if before[key] != after[key]]
    assert moved and all(before[key] == C for key in moved)
    assert C not in after.values()


def test_the_preferred_server_is_left_only_when_much_busier(router: Router) -> None:
    two = model(A, B)
    key = next(f"u:{n}" for n in range(100) if router.choose(two, f"u:{n}") == A)
    router.reading(B, 10)
    router.reading(A, 10 + AFFINITY_SLACK)  # busier, within the slack: stays
    assert router.choose(two, key) == A
    router.reading(A, 10 + AFFINITY_SLACK + 1)  # past the slack, but not 1.5 times
    assert router.choose(two, key) == A
    router.reading(A, 16)
    router.reading(B, 2)  # past both
    assert router.choose(two, key) == B


def test_requests_sent_since_a_reading_count_as_load(router: Router) -> None:
    two = model(A, B)
    key = next(f"u:{n}" for n in range(100) if router.choose(two, f"u:{n}") == A)
    router.reading(A, 0)
    router.reading(B, 0)
    for _ in range(AFFINITY_SLACK + 1):
        router.started(A)
    assert router.choose(two, key) == B
    router.reading(A, 0)  # the server's own count now: they ended
    assert router.choose(two, key) == A


def test_a_refused_server_is_ejected_then_tried_again(router: Router, clock: Clock) -> None:
    two = model(A, B)
    router.refused(A)
    assert all(router.choose(two, f"u:{n}") == B for n in range(50))
    clock.now += EJECT_SECONDS + 0.1  # the ejection ran out: one may try it again
    assert A in {router.choose(two, f"u:{n}") for n in range(50)}
    router.refused(A)  # still refusing: twice as long
    clock.now += EJECT_SECONDS + 0.1
    assert not router.healthy(A)
    clock.now += EJECT_SECONDS
    assert router.healthy(A)
    router.answered(A)  # it took a request: the next ejection is short again
    router.refused(A)
    clock.now += EJECT_SECONDS + 0.1
    assert router.healthy(A)


def test_failed_readings_eject_and_an_answer_recovers(router: Router) -> None:
    for _ in range(EJECT_AFTER - 1):
        router.reading(A, None)
    assert router.healthy(A)
    router.reading(A, None)
    assert not router.healthy(A)
    router.reading(A, 3)  # the active check answered
    assert router.healthy(A)
    assert router.servers[A].ejections == 0


def test_when_every_server_is_out_all_are_tried(router: Router) -> None:
    two = model(A, B)
    router.refused(A)
    router.refused(B)
    assert router.choose(two, "u:1") in (A, B)
    assert router.choose(two, "u:1", frozenset({A})) == B
    assert router.choose(two, "u:1", frozenset({A, B})) == ""


def test_load_readings_are_sglangs_per_rank_counts() -> None:
    assert reported_load([{"dp_rank": 0, "num_reqs": 3, "num_waiting_reqs": 1}]) == 3
    assert reported_load([{"num_reqs": 3}, {"num_reqs": 4}]) == 7
    assert reported_load({"num_reqs": 2}) == 2
    assert reported_load({"loads": [{"num_reqs": 2}, {"num_reqs": 1}]}) == 3  # /v1/loads
    bad_bodies: list[object] = [
        [{"num_reqs": -1}], [{"num_reqs": "3"}], [{}], ["x"], None, [{"num_reqs": True}],
    ]  # fmt: skip
    for bad in bad_bodies:
        assert reported_load(bad) is None
    assert reported_load([{"num_reqs": 10**12}]) == 1_000_000


def test_the_routing_key_is_the_system_prompt_else_the_user() -> None:
    two = model(A, B)
    system = {"messages": [{"role": "system", "content": "당신은 친절한 상담원입니다."},
                           {"role": "user", "content": "안녕"}]}  # fmt: skip
    assert routing_key(two, 1, system) == routing_key(two, 2, system)
    assert routing_key(two, 1, system).startswith("s:")
    other = {"messages": [{"role": "system", "content": "다른 지시"}]}
    assert routing_key(two, 1, other) != routing_key(two, 1, system)
    plain = {"messages": [{"role": "user", "content": "안녕"}]}
    assert routing_key(two, 7, plain) == "u:7"
    assert routing_key(two, 7, {"prompt": "x"}) == "u:7"
    lone = {"messages": [{"role": "system", "content": "\ud800"}]}
    assert routing_key(two, 7, lone).startswith("s:")
    assert routing_key(model(A), 7, system) == ""
