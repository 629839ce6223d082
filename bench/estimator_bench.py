"""The token estimator's error before and after the per-model refit, per tokenizer.

    DEBUG=1 .venv/bin/python -m bench.estimator_bench \
        --corpus ../shared/data/ko_instructions.jsonl [--gguf gemma-3-270m-q4_k_m.gguf]

For each record (instruction, input and output joined by newlines) the exact count of each
tokenizer (the bundled Qwen2.5 one; a Gemma tokenizer read from a GGUF when given) beside the
estimator's ("default" family: what a model without a tokenizer gets; "qwen" family). The refit
(tokenlimit/estimator_fit.py) is fitted on the even records, as the ledger would provide them,
and measured on the odd ones. Prints mean absolute error and mean signed error per record.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenlimit.estimator_fit import apply, fit
from tokenlimit.tokens import EstimatingCounter, get_counter, qwen_tokenizer_dir

# What every model without a tokenizer was estimated with before issue 13: "1 Hangul syllable
# ~ 1.2 tokens" and rough factors for the rest, no units.
RULE_OF_THUMB = {
    "hangul": 1.2, "jamo": 1.0, "latin": 0.3, "digit": 0.5, "cjk": 1.3, "space": 0.1,
    "punct": 0.7, "other": 1.5,
}  # fmt: skip


def rule_of_thumb() -> EstimatingCounter:
    counter = EstimatingCounter("default")
    counter.factors, counter.units, counter.blanks = dict(RULE_OF_THUMB), None, False
    return counter


def records(path: Path, limit: int) -> list[str]:
    texts = []
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            row = json.loads(line)
            texts.append("\n".join(str(row.get(k, "")) for k in ("instruction", "input", "output")))
            if len(texts) >= limit:
                break
    return texts


def errors(pairs: list[tuple[int, int]], scale: float = 1.0, offset: float = 0.0) -> str:
    rel = [(apply(e, scale, offset) - r) / r for e, r in pairs if r > 0]
    mean_abs = sum(abs(x) for x in rel) / len(rel)
    mean_signed = sum(rel) / len(rel)
    return f"{mean_abs * 100:5.1f} % abs, {mean_signed * 100:+5.1f} % signed"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--gguf", default="")
    parser.add_argument("--limit", type=int, default=100_000)
    options = parser.parse_args()
    texts = records(options.corpus, options.limit)
    tokenizers = {"Qwen2.5 (bundled)": get_counter("bench-qwen", str(qwen_tokenizer_dir()))}
    if options.gguf:
        tokenizers["Gemma 3 (GGUF)"] = get_counter("bench-gemma", options.gguf)
    print(f"{len(texts)} records")
    estimators = {"rule of thumb": rule_of_thumb(), "default": EstimatingCounter("default")}
    for family, estimator in estimators.items():
        estimates = [estimator.count_text(t) for t in texts]
        for name, counter in tokenizers.items():
            exact = [counter.count_text(t) for t in texts]
            pairs = list(zip(estimates, exact, strict=True))
            train, test = pairs[0::2], pairs[1::2]
            fitted = fit(train)
            after = errors(test, fitted.scale, fitted.offset) if fitted else "no fit"
            print(
                f"{family:13s} vs {name:18s}: before {errors(test)}; "
                f"after refit {after}"
                + (f" (×{fitted.scale:.3f} {fitted.offset:+.1f})" if fitted else "")
            )


if __name__ == "__main__":
    main()
