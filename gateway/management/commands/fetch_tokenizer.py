"""`manage.py fetch_tokenizer MODEL`: a model's tokenizer files, never its weights, into the
Hugging Face cache the gateway reads (offline) at start-up.

On a host that can reach a hub (huggingface.co, or a mirror in HF_ENDPOINT), this downloads
through `huggingface_hub.snapshot_download` with an allow-list of tokenizer files only (a few
MB, not the model's GB). Air-gapped hosts: run it where a hub is reachable, then copy the folder
it prints (`models--ORG--NAME`, with its `refs/` and `snapshots/`) into the gateway host's
HF_HUB_CACHE (by default ~/.cache/huggingface/hub).
"""

from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.utils.translation import gettext as _

# What a tokenizer and its chat template are made of (transformers' files for the fast and slow
# tokenizers, sentencepiece models, the separate chat template file newer repositories have);
# config.json and generation_config.json tell the model type and the end-of-turn tokens.
TOKENIZER_PATTERNS = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "*.tiktoken",
    "chat_template.jinja",
    "chat_template.json",
    "config.json",
    "generation_config.json",
)
# Never, even if a pattern above matched one by accident.
WEIGHT_PATTERNS = (
    "*.safetensors",
    "*.bin",
    "*.gguf",
    "*.pt",
    "*.pth",
    "*.h5",
    "*.onnx",
    "*.msgpack",
)


def tokenizer_files(names: list[str]) -> list[str]:
    """Which of a repository's files fetch_tokenizer downloads (huggingface_hub's own filter)."""
    from huggingface_hub.utils import filter_repo_objects

    return list(
        filter_repo_objects(
            names, allow_patterns=list(TOKENIZER_PATTERNS), ignore_patterns=list(WEIGHT_PATTERNS)
        )
    )


class Command(BaseCommand):
    help = _("Download a model's tokenizer files (never its weights) into the Hugging Face cache.")

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("model", help=_("Repository id, e.g. Qwen/Qwen2.5-7B-Instruct."))
        parser.add_argument("--revision", default=None, help=_("Branch, tag or commit."))
        parser.add_argument(
            "--cache-dir", default=None, help=_("Cache folder (default: HF_HUB_CACHE).")
        )

    def handle(self, *args: Any, **options: Any) -> None:
        from huggingface_hub import snapshot_download

        try:
            path = snapshot_download(
                options["model"],
                revision=options["revision"],
                cache_dir=options["cache_dir"],
                allow_patterns=list(TOKENIZER_PATTERNS),
                ignore_patterns=list(WEIGHT_PATTERNS),
            )
        except Exception as exc:  # unreachable hub, unknown or gated repository…
            raise CommandError(
                _("Could not download the tokenizer of %(model)s: %(error)s")
                % {"model": options["model"], "error": f"{type(exc).__name__}: {exc}"[:500]}
            ) from None
        self.stdout.write(_("Tokenizer files of %(model)s: %(path)s") % {
            "model": options["model"], "path": path,
        })  # fmt: skip
        self.stdout.write(
            _(
                "For an air-gapped gateway host, copy the folder that contains snapshots/ (the "
                "models--… folder) into its HF_HUB_CACHE."
            )
        )
