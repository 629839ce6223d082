"""Fitting the token estimator to a real tokenizer, for `manage.py calibrate_tokens`.

The estimator (`tokenlimit.tokens.EstimatingCounter`) predicts a text's token count as
Σ factor × feature over `tokenlimit.tokens.estimator_features`: how many of the family's
multi-character "units" the text has, how many runs of blanks, and how many characters of each
class are left after both are taken out. Calibration counts every corpus record exactly with the
tokenizer, derives the units from the tokens the tokenizer actually emitted (Hangul words and
endings, optionally with the space before them, ranked by tokens saved) and fits non-negative
factors by least squares on the per-record counts: Lawson & Hanson's NNLS on the normal
equations. There are ten unknowns, so plain Python is fast enough and numpy is not needed.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.utils.translation import gettext as _

from tokenlimit.tokens import (
    BLANK_FEATURE,
    CHAR_CLASSES,
    FAMILY_FACTORS,
    UNIT_FEATURE,
    EstimatingCounter,
    estimate_tokens,
    estimator_features,
    units_pattern,
)

# Every feature the estimator uses, in the order the factors are printed.
FEATURES: tuple[str, ...] = (*CHAR_CLASSES, "other", UNIT_FEATURE, BLANK_FEATURE)
# Features counted in matches rather than characters: always fitted.
_MATCH_FEATURES = (UNIT_FEATURE, BLANK_FEATURE)
# A class seen fewer times than this in the corpus keeps the family's shipped factor: a handful
# of characters cannot pin a factor down, and an unfitted class would otherwise drop to 0.
MIN_CLASS_CHARS = 200
# How many units `calibrate_tokens` derives unless told otherwise.
DEFAULT_UNITS = 400
# A unit: Hangul syllables, optionally after one space (the tokenizer's merge of the space
# before a word); at least two characters, or it would save nothing.
_UNIT = re.compile(" ?[\uac00-\ud7a3]+")
_HANGUL = re.compile("[\uac00-\ud7a3]")
_RECORD_FIELDS = ("instruction", "input", "output")


class CorpusError(ValueError):
    """A corpus that cannot be read; `line` is 1-based when one line is at fault."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line


# --- The corpus --------------------------------------------------------------------------------


def record_text(record: Mapping[str, Any]) -> str:
    """instruction + "\\n" + input + "\\n" + output (missing fields count as ""), or "text"."""
    if not any(name in record for name in _RECORD_FIELDS) and "text" in record:
        return _as_text(record["text"])
    return "\n".join(_as_text(record.get(name)) for name in _RECORD_FIELDS)


def _as_text(value: Any) -> str:
    return "" if value is None else str(value)


def read_corpus(path: Path, limit: int | None = None) -> list[str]:
    """The texts of a JSON-lines corpus, in order; blank lines and empty texts are skipped."""
    texts: list[str] = []
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise CorpusError(
            _("Cannot read the corpus %(path)s: %(error)s")
            % {"path": path, "error": exc.strerror or exc}
        ) from exc
    with handle:
        for number, raw in enumerate(handle, start=1):
            if limit is not None and len(texts) >= limit:
                break
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError alike
                raise CorpusError(
                    _("%(path)s, line %(line)d: not valid JSON (%(error)s)")
                    % {"path": path, "line": number, "error": exc},
                    line=number,
                ) from exc
            if not isinstance(record, dict):
                raise CorpusError(
                    _("%(path)s, line %(line)d: expected a JSON object, got %(type)s")
                    % {"path": path, "line": number, "type": type(record).__name__},
                    line=number,
                )
            text = record_text(record)
            if text:
                texts.append(text)
    return texts


# --- Units -------------------------------------------------------------------------------------


def is_unit(token: str) -> bool:
    """A token worth a unit: two or more Hangul syllables, or one after a space."""
    return len(token) >= 2 and _UNIT.fullmatch(token) is not None


def derive_units(
    token_uses: Mapping[int, int], decode: Callable[[int], str], limit: int
) -> tuple[str, ...]:
    """The `limit` units that save the most tokens: (characters − 1) × times emitted.

    `token_uses` maps token ids to how often the tokenizer emitted them over the corpus.
    """
    if limit <= 0:
        return ()
    savings: Counter[str] = Counter()
    for token_id, uses in token_uses.items():
        token = decode(token_id)
        if is_unit(token):
            savings[token] += (len(token) - 1) * uses
    ranked = sorted(savings.items(), key=lambda item: (-item[1], item[0]))
    return tuple(token for token, _saved in ranked[:limit])


# --- Non-negative least squares ------------------------------------------------------------------


def normal_equations(
    rows: Iterable[Sequence[float]], targets: Iterable[float]
) -> tuple[list[list[float]], list[float]]:
    """XᵀX and Xᵀy, accumulated one row at a time."""
    gram: list[list[float]] = []
    moment: list[float] = []
    for row, target in zip(rows, targets, strict=True):
        if not gram:
            gram = [[0.0] * len(row) for _ in row]
            moment = [0.0] * len(row)
        for i, xi in enumerate(row):
            if not xi:
                continue
            moment[i] += xi * target
            gram_i = gram[i]
            for j, xj in enumerate(row):
                gram_i[j] += xi * xj
    return gram, moment


def nnls(gram: Sequence[Sequence[float]], moment: Sequence[float]) -> list[float]:
    """argmin ‖Xw − y‖² subject to w ≥ 0, from XᵀX and Xᵀy (Lawson & Hanson, 1974).

    Active-set method: start from w = 0, repeatedly free the variable whose gradient most wants
    to grow, solve the unconstrained problem on the free ("passive") variables and step back
    towards the previous point whenever that solution leaves the feasible region.
    """
    # Solved for w'ᵢ = wᵢ·‖xᵢ‖ (unit columns), so a rare class and a common one are equally
    # well conditioned; the sign, and so the constraint, is unchanged.
    n = len(moment)
    norms = [math.sqrt(gram[i][i]) or 1.0 for i in range(n)]
    gram = [[gram[i][j] / (norms[i] * norms[j]) for j in range(n)] for i in range(n)]
    moment = [moment[i] / norms[i] for i in range(n)]
    scale = max((abs(v) for v in moment), default=0.0) or 1.0
    tolerance = 1e-10 * scale
    w = [0.0] * n
    passive: list[int] = []
    refused: set[int] = set()  # variables whose system is singular or that will not move
    for _round in range(10 * n + 10):
        gradient = _gradient(gram, moment, w)
        candidates = [
            i for i in range(n) if i not in passive and i not in refused and gradient[i] > tolerance
        ]
        if not candidates:
            break
        entering = max(candidates, key=gradient.__getitem__)
        passive.append(entering)
        for _inner in range(10 * n + 10):
            solution = _solve_on(gram, moment, passive)
            if solution is None or (solution[entering] <= 0 and w[entering] == 0):
                # Singular with this variable, or numerically unable to grow: leave it at 0.
                passive.remove(entering)
                refused.add(entering)
                break
            if all(solution[i] > 0 for i in passive):
                w = solution
                break
            alpha = min(w[i] / (w[i] - solution[i]) for i in passive if solution[i] <= 0)
            w = [wi + alpha * (si - wi) for wi, si in zip(w, solution, strict=True)]
            for i in list(passive):
                if w[i] <= tolerance * 1e-6:
                    w[i] = 0.0
                    passive.remove(i)
            if entering not in passive:
                break
    return [wi / norm for wi, norm in zip(w, norms, strict=True)]


def _gradient(
    gram: Sequence[Sequence[float]], moment: Sequence[float], w: list[float]
) -> list[float]:
    return [
        m - sum(g * wj for g, wj in zip(row, w, strict=True))
        for row, m in zip(gram, moment, strict=True)
    ]


def _solve_on(
    gram: Sequence[Sequence[float]], moment: Sequence[float], subset: Sequence[int]
) -> list[float] | None:
    """Solve gram[S,S] w_S = moment[S] (zeros outside S); None when singular."""
    size = len(subset)
    matrix = [[float(gram[i][j]) for j in subset] + [float(moment[i])] for i in subset]
    diagonal = max(abs(gram[i][i]) for i in subset)
    for col in range(size):
        pivot = max(range(col, size), key=lambda r: abs(matrix[r][col]))
        if abs(matrix[pivot][col]) <= 1e-10 * diagonal:
            return None
        matrix[col], matrix[pivot] = matrix[pivot], matrix[col]
        head = matrix[col]
        for r in range(col + 1, size):
            factor = matrix[r][col] / head[col]
            if factor:
                row = matrix[r]
                for c in range(col, size + 1):
                    row[c] -= factor * head[c]
    values = [0.0] * size
    for r in range(size - 1, -1, -1):
        row = matrix[r]
        values[r] = (row[size] - sum(row[c] * values[c] for c in range(r + 1, size))) / row[r]
    solution = [0.0] * len(moment)
    for index, value in zip(subset, values, strict=True):
        solution[index] = value
    return solution


def fit_factors(
    rows: Sequence[Mapping[str, float]],
    targets: Sequence[float],
    names: Sequence[str] = FEATURES,
    fixed: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Non-negative factors for `names` minimising Σ (Σ factor × feature − target)².

    Features in `fixed` keep the given factor; the rest are fitted to what they leave over.
    """
    fixed = dict(fixed or {})
    free = [name for name in names if name not in fixed]
    residual = [
        target - sum(factor * row.get(name, 0) for name, factor in fixed.items())
        for row, target in zip(rows, targets, strict=True)
    ]
    gram, moment = normal_equations(
        ([float(row.get(name, 0)) for name in free] for row in rows), residual
    )
    solution = nnls(gram, moment) if gram else [0.0] * len(free)
    fitted = dict(zip(free, solution, strict=True))
    return {name: fixed[name] if name in fixed else fitted[name] for name in names}


# --- Scoring -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorStats:
    """Per-record absolute percentage errors (mean, 95th percentile) and the total's drift."""

    mean: float
    p95: float
    drift: float


def error_stats(estimates: Sequence[float], exact: Sequence[int]) -> ErrorStats:
    """Errors of `estimates` against exact counts; records with 0 exact tokens are left out."""
    pairs = [(e, x) for e, x in zip(estimates, exact, strict=True) if x > 0]
    if not pairs:
        return ErrorStats(0.0, 0.0, 0.0)
    errors = sorted(abs(e - x) / x for e, x in pairs)
    rank = max(0, math.ceil(0.95 * len(errors)) - 1)  # nearest-rank percentile
    total_exact = sum(x for _e, x in pairs)
    drift = (sum(e for e, _x in pairs) - total_exact) / total_exact
    return ErrorStats(sum(errors) / len(errors), errors[rank], drift)


def rule_of_thumb(text: str) -> float:
    """The original design's rule: 1.2 × Hangul syllables + len(non-Hangul text) / 4."""
    syllables = len(_HANGUL.findall(text))
    return 1.2 * syllables + (len(text) - syllables) / 4


# --- The whole calibration -----------------------------------------------------------------------


@dataclass
class Calibration:
    family: str
    records: int
    exact_tokens: int
    characters: int
    units: tuple[str, ...]
    factors: dict[str, float]
    kept: dict[str, float]  # classes too rare to fit, at the shipped factor
    fitted: ErrorStats
    rule: ErrorStats
    shipped: ErrorStats
    class_totals: dict[str, int] = field(default_factory=dict)


def calibrate(
    texts: Sequence[str], exact: Sequence[int], units: Sequence[str], family: str, digits: int = 3
) -> Calibration:
    """Fit the family's factors (rounded to `digits` decimals) and score three estimators."""
    if len(texts) != len(exact):
        raise ValueError("texts and exact counts differ in length")
    pattern = units_pattern(units)
    rows = [estimator_features(text, pattern, blanks=True) for text in texts]
    totals = {name: sum(row.get(name, 0) for row in rows) for name in FEATURES}
    shipped_factors = FAMILY_FACTORS.get(family, FAMILY_FACTORS["default"])
    kept = {
        name: shipped_factors.get(name, 0.0)
        for name in FEATURES
        if name not in _MATCH_FEATURES and totals[name] < MIN_CLASS_CHARS
    }
    factors = fit_factors(rows, exact, FEATURES, fixed=kept)
    factors = {name: round(value, digits) for name, value in factors.items()}
    shipped = EstimatingCounter(family)
    return Calibration(
        family=family,
        records=len(texts),
        exact_tokens=sum(exact),
        characters=sum(len(text) for text in texts),
        units=tuple(units),
        factors=factors,
        kept=kept,
        fitted=error_stats([estimate_tokens(row, factors) for row in rows], exact),
        rule=error_stats([rule_of_thumb(text) for text in texts], exact),
        shipped=error_stats([shipped.count_text(text) for text in texts], exact),
        class_totals=totals,
    )


# --- Output ------------------------------------------------------------------------------------


def format_factors(family: str, factors: Mapping[str, float]) -> str:
    """The factors as a FAMILY_FACTORS entry, to paste into tokenlimit/tokens.py."""
    lines = [f"    {family!r}: {{"]
    lines += [f"        {name!r}: {value!r}," for name, value in factors.items()]
    lines.append("    },")
    return "\n".join(lines).replace("'", '"')


def format_units(family: str, units: Sequence[str], width: int = 80) -> str:
    """The units as a FAMILY_UNITS entry ("▁" for a leading space), to paste into tokens.py.

    `width` counts Hangul as two columns, as ruff does.
    """
    words = [unit.replace(" ", "▁") for unit in units]
    lines: list[str] = []
    current = ""
    for word in words:
        candidate = f"{current}{word} "
        if current and display_columns(candidate) > width:
            lines.append(current)
            candidate = f"{word} "
        current = candidate
    if current:
        lines.append(current.rstrip())
    body = "\n".join(f'        "{line}"' for line in lines) or '        ""'
    return f'    "{family}": (\n{body}\n    ),'


def display_columns(text: str) -> int:
    """Terminal (and ruff) columns: Hangul and other wide characters take two."""
    return sum(2 if unicodedata.east_asian_width(char) in "WF" else 1 for char in text)


class Progress:
    """A one-line progress bar: redrawn with "\\r" whenever the whole percentage changes."""

    def __init__(self, total: int, write: Callable[[str], Any], label: str, width: int = 30):
        self.total = max(total, 1)
        self.done = 0
        self.write = write
        self.label = label
        self.width = width
        self._shown = -1

    def update(self, step: int = 1) -> None:
        self.done += step
        percent = min(100, self.done * 100 // self.total)
        if percent != self._shown:
            self._shown = percent
            filled = self.width * percent // 100
            bar = "#" * filled + "." * (self.width - filled)
            self.write(f"\r{self.label} [{bar}] {percent:3d}% {self.done:,}/{self.total:,}")

    def close(self) -> None:
        self.write("\n")
