"""Refitting a model's token estimator from what its upstream reported.

A model without a tokenizer is counted by the estimator (tokenlimit.tokens.EstimatingCounter):
character classes with factors calibrated on one tokenizer family. On another family it is off
by a roughly constant factor (the issue's Gemma measurement: +32 % on average), which the
ledger shows: every row with upstream usage holds the upstream's prompt count beside the
gateway's estimate. `fit` turns those pairs into a scale and an offset,

    reported ≈ scale × estimate + offset,

by least squares after dropping the worst 5 % of rows by ratio on each side (a row with a huge
attached document must not swing it), within bounds, and only when it lowers the mean absolute
error. The gateway applies it on top of the fit in force when the rows were counted (`compose`):
rows are only taken from after that fit was stored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

MIN_ROWS = 30
SCALE_BOUNDS = (0.25, 4.0)
OFFSET_BOUNDS = (-500.0, 500.0)
TRIM = 0.05  # the share of rows dropped at each end of the ratio distribution


@dataclass(frozen=True)
class Fit:
    scale: float
    offset: float
    rows: int
    error_before: float  # mean absolute error relative to the reported count, 0–1
    error_after: float

    def as_dict(self) -> dict[str, float]:
        return {
            "scale": round(self.scale, 6),
            "offset": round(self.offset, 3),
            "rows": float(self.rows),
            "error_before": round(self.error_before, 6),
            "error_after": round(self.error_after, 6),
        }


def apply(estimate: int, scale: float = 1.0, offset: float = 0.0) -> int:
    """An estimate corrected by a fit; at least 1 for a non-empty prompt."""
    if estimate <= 0:
        return estimate
    return max(1, int(scale * estimate + offset + 0.5))


def mean_relative_error(pairs: Sequence[tuple[int, int]], scale: float, offset: float) -> float:
    if not pairs:
        return 0.0
    return sum(abs(apply(e, scale, offset) - r) / r for e, r in pairs) / len(pairs)


def fit(pairs: Sequence[tuple[int, int]]) -> Fit | None:
    """(estimate, reported) pairs → the fit, or None: too few rows, or no improvement."""
    usable = [(e, r) for e, r in pairs if e > 0 and r > 0]
    if len(usable) < MIN_ROWS:
        return None
    usable.sort(key=lambda pair: pair[1] / pair[0])
    cut = int(len(usable) * TRIM)
    kept = usable[cut : len(usable) - cut] if cut else usable
    n = len(kept)
    mean_e = sum(e for e, _ in kept) / n
    mean_r = sum(r for _, r in kept) / n
    spread = sum((e - mean_e) ** 2 for e, _ in kept)
    if spread > 0:
        scale = sum((e - mean_e) * (r - mean_r) for e, r in kept) / spread
        offset = mean_r - scale * mean_e
    else:  # every estimate the same: a ratio is all that can be known
        scale, offset = mean_r / mean_e, 0.0
    scale = min(max(scale, SCALE_BOUNDS[0]), SCALE_BOUNDS[1])
    offset = min(max(offset, OFFSET_BOUNDS[0]), OFFSET_BOUNDS[1])
    before = mean_relative_error(usable, 1.0, 0.0)
    after = mean_relative_error(usable, scale, offset)
    if after >= before:
        return None
    return Fit(scale, offset, len(usable), before, after)


def compose(old_scale: float, old_offset: float, new: Fit) -> tuple[float, float]:
    """The fit to store when `new` was fitted on estimates already corrected by the old one:
    new(old(x)) = s'(s·x + o) + o'."""
    scale = new.scale * old_scale
    offset = new.scale * old_offset + new.offset
    return (
        min(max(scale, SCALE_BOUNDS[0]), SCALE_BOUNDS[1]),
        min(max(offset, OFFSET_BOUNDS[0]), OFFSET_BOUNDS[1]),
    )
