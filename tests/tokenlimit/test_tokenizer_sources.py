"""Where tokenizers come from: a GGUF file, the Hugging Face cache, a directory without a chat
template, the operator's template."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tokenlimit.tokens import (
    EstimatingCounter,
    TokenizerCounter,
    clear_counters,
    get_counter,
    qwen_tokenizer_dir,
)

ROOT = Path(__file__).resolve().parents[2]
QWEN_DIR = Path(str(qwen_tokenizer_dir()))
SYSTEM = {"role": "system", "content": "당신은 친절한 한국어 비서입니다."}
USER = {"role": "user", "content": "부산에 가는 가장 빠른 방법은?"}
TOOL = {
    "type": "function",
    "function": {"name": "f", "parameters": {"type": "object", "properties": {}}},
}
TEXTS = [
    "안녕하세요. 오늘 서울 날씨가 어떤가요?",
    "  leading spaces\n\n\ttabs 😀 漢字 ㅋㅋㅋ def f(x): return x**2",
    "<|im_start|>user\nhi<|im_end|>",
]


def write_qwen_gguf(path: Path, with_template: bool = True) -> None:
    """A GGUF carrying the bundled Qwen tokenizer (no tensors), as llama.cpp's converter
    writes one: vocabulary, merges, token types, special ids, pre-tokenizer, chat template."""
    import gguf

    data = json.loads((QWEN_DIR / "tokenizer.json").read_text())
    config = json.loads((QWEN_DIR / "tokenizer_config.json").read_text())
    vocab, added = data["model"]["vocab"], {t["id"]: t for t in data["added_tokens"]}
    size = max(max(vocab.values()), max(added)) + 1
    tokens, types = [f"[PAD{i}]" for i in range(size)], [5] * size
    for token, index in vocab.items():
        tokens[index], types[index] = token, 1
    for index, token in added.items():
        tokens[index], types[index] = token["content"], 3 if token["special"] else 4
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(151645)
    writer.add_pad_token_id(151643)
    if with_template:
        writer.add_chat_template(config["chat_template"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def reference() -> TokenizerCounter:
    counter = get_counter("reference", str(QWEN_DIR))
    assert isinstance(counter, TokenizerCounter)
    return counter


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "qwen-tokenizer.gguf"
    write_qwen_gguf(path)
    return path


def test_a_gguf_files_tokenizer_counts_like_the_directory(
    gguf_file: Path, reference: TokenizerCounter
) -> None:
    counter = get_counter("qwen-from-gguf", str(gguf_file))

    assert isinstance(counter, TokenizerCounter) and counter.chat_exact
    assert counter.source == f"tokenizer:{gguf_file}"
    for text in TEXTS:
        assert counter.encode(text) == reference.encode(text)
        assert counter.encode(text, True) == reference.encode(text, True)
    for messages, tools in (([USER], None), ([SYSTEM, USER], None), ([USER], [TOOL])):
        assert counter.count_chat(messages, tools) == reference.count_chat(messages, tools)
    assert counter.vocab_size == reference.vocab_size


def test_a_gguf_without_a_template_counts_chats_with_the_estimator(
    tmp_path: Path, reference: TokenizerCounter
) -> None:
    path = tmp_path / "no-template.gguf"
    write_qwen_gguf(path, with_template=False)
    counter = get_counter("templateless-gguf", str(path))

    assert isinstance(counter, TokenizerCounter) and not counter.chat_exact
    assert counter.count_text(TEXTS[0]) == reference.count_text(TEXTS[0])  # text stays exact


def test_a_tokenizer_without_a_chat_template_never_counts_a_chat_as_zero(
    tmp_path: Path, reference: TokenizerCounter, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "no-template"
    shutil.copytree(QWEN_DIR, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))

    with caplog.at_level("WARNING", logger="tokenlimit.tokens"):
        counter = get_counter("templateless", str(folder))
        get_counter("templateless", str(folder))  # cached: warned once

    assert isinstance(counter, TokenizerCounter)
    assert not counter.chat_exact and "no chat template" in counter.source
    assert counter.problem == "no chat template: chat prompts are estimated"
    estimated = EstimatingCounter("default").count_chat([USER])
    assert counter.count_chat([USER]) == estimated > 0
    assert counter.count_text(TEXTS[0]) == reference.count_text(TEXTS[0])
    with pytest.raises(ValueError):
        counter.encode_chat([USER])
    assert sum("has no chat template" in r.message for r in caplog.records) == 1

    # The operator gives it one: exact again, and a new counter (no restart).
    template = json.loads((QWEN_DIR / "tokenizer_config.json").read_text())["chat_template"]
    fixed = get_counter("templateless", str(folder), chat_template=template)
    assert isinstance(fixed, TokenizerCounter) and fixed.chat_exact
    assert fixed.count_chat([USER]) == reference.count_chat([USER])


def test_the_operators_template_replaces_the_tokenizers(reference: TokenizerCounter) -> None:
    template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant] "
    counter = get_counter("custom", str(QWEN_DIR), chat_template=template)

    assert counter.render_chat([SYSTEM, USER]) == (
        f"[system] {SYSTEM['content']}\n[user] {USER['content']}\n[assistant] "
    )
    assert counter.count_chat([USER]) == reference.count_text(
        f"[user] {USER['content']}\n[assistant] "
    )
    assert get_counter("custom", str(QWEN_DIR)).count_chat([USER]) == reference.count_chat([USER])


def test_a_model_in_the_local_hugging_face_cache_is_found_offline(tmp_path: Path) -> None:
    """What `manage.py fetch_tokenizer` leaves (and what an air-gapped host gets by copying the
    folder): models--ORG--NAME with refs/main and snapshots/<commit>/."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--example-org--korean-llm"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(QWEN_DIR, snapshot)
    # A fetched repository has its config.json (fetch_tokenizer asks for it): transformers
    # reads the model type from it before the tokenizer files when loading from the cache.
    (snapshot / "config.json").write_text('{"model_type": "qwen2"}')
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    code = (
        "from tokenlimit.tokens import get_counter\n"
        "c = get_counter('example-org/korean-llm')\n"
        "print(c.source, c.exact, c.count_text('안녕하세요'))\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    source, exact, count = done.stdout.split()[-3:]
    assert source == "tokenizer:example-org/korean-llm" and exact == "True"
    assert int(count) == get_counter("reference", str(QWEN_DIR)).count_text("안녕하세요")


def test_fetch_tokenizer_asks_for_tokenizer_files_only() -> None:
    from gateway.management.commands.fetch_tokenizer import tokenizer_files

    repository = [
        "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja",
        "model-00001-of-00004.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
        "qwen2.5-7b-instruct-q4_k_m.gguf", "README.md", "LICENSE", "onnx/model.onnx",
    ]  # fmt: skip
    assert sorted(tokenizer_files(repository)) == [
        "chat_template.jinja", "config.json", "generation_config.json", "merges.txt",
        "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json",
    ]  # fmt: skip


def test_fetch_tokenizer_says_why_when_no_hub_answers(tmp_path: Path) -> None:
    env = {
        **os.environ, "DEBUG": "1", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0",
        "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2", "LANGUAGE_CODE": "en",
    }  # fmt: skip
    done = subprocess.run(
        [sys.executable, "manage.py", "fetch_tokenizer", "example-org/korean-llm",
         "--cache-dir", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    assert "example-org/korean-llm" in done.stderr
    assert not any(tmp_path.rglob("*.json"))


@pytest.fixture(autouse=True)
def forget_counters() -> Any:
    yield
    clear_counters()
