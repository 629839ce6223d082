"""The estimator's refit: a scale and an offset from (estimate, reported) pairs."""

from __future__ import annotations

import random

import pytest

from tokenlimit import estimator_fit
from tokenlimit.estimator_fit import MIN_ROWS, Fit, apply, compose, fit
from tokenlimit.tokens import EstimatingCounter


def pairs(scale: float, offset: float, n: int = 200, noise: float = 0.0) -> list[tuple[int, int]]:
    rng = random.Random(5)
    out = []
    for _ in range(n):
        estimate = rng.randrange(20, 2000)
        reported = scale * estimate + offset
        out.append((estimate, max(1, round(reported * (1 + rng.uniform(-noise, noise))))))
    return out


def test_it_recovers_a_known_scale_and_offset() -> None:
    found = fit(pairs(0.76, 12.0))
    assert found is not None
    assert found.scale == pytest.approx(0.76, abs=0.002)
    assert found.offset == pytest.approx(12.0, abs=1.0)
    assert found.error_after < 0.005 < found.error_before


def test_outliers_do_not_swing_it() -> None:
    data = pairs(0.8, 0.0, noise=0.02)
    data += [(100, 5000)] * 5 + [(5000, 10)] * 5  # a few absurd rows
    found = fit(data)
    assert found is not None and found.scale == pytest.approx(0.8, abs=0.02)


def test_too_few_rows_fit_nothing() -> None:
    assert fit(pairs(0.5, 0.0, n=MIN_ROWS - 1)) is None


def test_no_improvement_fits_nothing() -> None:
    assert fit([(100, 100)] * 50) is None


def test_it_stays_within_bounds() -> None:
    found = fit(pairs(9.0, 0.0))
    assert found is not None and found.scale == estimator_fit.SCALE_BOUNDS[1]


def test_a_refit_composes_with_the_fit_in_force() -> None:
    # Rows counted with x → 0.8x + 2 showed the truth at 0.9 × that + 1.
    new = Fit(0.9, 1.0, 100, 0.1, 0.01)
    scale, offset = compose(0.8, 2.0, new)
    assert (scale, offset) == pytest.approx((0.72, 2.8))
    assert scale * 1000 + offset == pytest.approx(0.9 * (0.8 * 1000 + 2.0) + 1.0)


def test_the_estimator_applies_a_fit() -> None:
    plain = EstimatingCounter("default")
    fitted = EstimatingCounter("default", fit=(("offset", 3.0), ("scale", 0.5)))
    chat = [{"role": "user", "content": "대한민국의 수도는 어디인가요? 한 문장으로 답해 주세요."}]
    assert fitted.count_chat(chat) == apply(plain.count_chat(chat), 0.5, 3.0)
    assert fitted.count_text("안녕하세요 반갑습니다") == apply(
        plain.count_text("안녕하세요 반갑습니다"), 0.5
    )
    assert fitted.count_text("") == 0
    assert "refitted" in fitted.source and "refitted" not in plain.source
