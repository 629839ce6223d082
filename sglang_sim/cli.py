"""The SGLang simulator's command line: `python -m sglang_sim [options]`, without Django.

`manage.py simulate_sglang` takes the same options from here and calls the same `serve()`, so the
two cannot drift apart. The user-visible strings go through a `_` parameter: the Django command
passes Django's gettext (Korean by default, from locale/ko), `python -m sglang_sim` shows them
untranslated. Because they are written as `_("…")` literals, `manage.py makemessages` still finds
them here, although this package imports no Django.
"""

from __future__ import annotations

import logging
import os
from argparse import ArgumentParser
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sglang_sim.jobs import DEFAULT_MODEL, ENGINES, KINDS, SimulatorConfig
from sglang_sim.server import serve

Translate = Callable[[str], str]


def untranslated(text: str) -> str:
    return text


class OptionError(ValueError):
    """An option value the simulator refuses (already translated)."""


def describe(_: Translate = untranslated) -> str:
    return _(
        "Run an SGLang SIMULATOR: SGLang's HTTP API and metrics with a canned Korean answer, "
        "for machines without a GPU. It is not a model. Test hooks: see sglang_sim/server.py."
    )


def add_arguments(parser: ArgumentParser, _: Translate = untranslated) -> None:
    defaults = SimulatorConfig()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=_("Served model name (also picks the tokenizer)."),
    )
    parser.add_argument(
        "--tokenizer", default="", help=_("Tokenizer directory or name (default: by model).")
    )
    parser.add_argument(
        "--tokens-per-second",
        type=float,
        default=defaults.tokens_per_second,
        help=_("Tokens per second per request (default %(default)s); 0: as fast as possible."),
    )
    parser.add_argument(
        "--ttft-ms",
        type=float,
        default=defaults.ttft_ms,
        help=_("Time to first token in milliseconds (default %(default)s)."),
    )
    parser.add_argument("--context-length", type=int, default=defaults.context_length)
    parser.add_argument(
        "--max-total-tokens",
        type=int,
        default=defaults.max_total_tokens,
        help=_("KV cache size reported in metrics."),
    )
    parser.add_argument(
        "--max-running-requests",
        type=int,
        default=defaults.max_running_requests,
        help=_("Requests generating at once; more wait in the queue. 0 means no limit."),
    )
    parser.add_argument(
        "--answer-tokens",
        type=int,
        default=defaults.answer_tokens,
        help=_("Tokens in a chat answer without max_tokens (default %(default)s)."),
    )

    parser.add_argument(
        "--kind",
        choices=KINDS,
        default=defaults.kind,
        help=_(
            "Which server to play: sglang (its whole API), or openai-generic (only /v1/*: no "
            "/health, no /metrics, no usage in streams)."
        ),
    )
    parser.add_argument(
        "--chat-template",
        default="",
        help=_("A Jinja chat template file to render prompts with, instead of the tokenizer's."),
    )
    gpu = parser.add_argument_group(_("GPU-like engine (--engine gpu, sglang_sim/engine.py)"))
    gpu.add_argument(
        "--engine",
        choices=ENGINES,
        default=defaults.engine,
        help=_(
            "fixed: each request at --tokens-per-second however many run; gpu: continuous "
            "batching, a step time growing with the batch, prefill, KV budget, prefix cache."
        ),
    )
    for flag, help_text in (
        ("--step-base-ms", _("Decode step time at batch 1 (default %(default)s).")),
        ("--step-per-request-ms", _("Added to a step per running request (default %(default)s).")),
        ("--prefill-ms-per-token", _("Prefill time per uncached token (default %(default)s).")),
    ):  # fmt: skip
        dest = flag[2:].replace("-", "_")
        gpu.add_argument(flag, type=float, default=getattr(defaults, dest), help=help_text)
    gpu.add_argument(
        "--chunked-prefill-size", type=int, default=defaults.chunked_prefill_size,
        help=_("Prompt tokens prefilled per step at most (default %(default)s)."),
    )  # fmt: skip
    gpu.add_argument(
        "--disable-radix-cache", action="store_true", help=_("No prefix cache (as SGLang's flag).")
    )
    gpu.add_argument(
        "--enable-priority-scheduling", action="store_true",
        help=_("Serve the queue by each request's `priority` (larger first), as SGLang does."),
    )  # fmt: skip
    gpu.add_argument(
        "--schedule-low-priority-values-first", action="store_true",
        help=_("With priority scheduling: lower values first."),
    )  # fmt: skip
    gpu.add_argument(
        "--max-queued-requests", type=int, default=defaults.max_queued_requests,
        help=_("Requests waiting at most; more are refused with 503. 0 means no limit."),
    )  # fmt: skip


def config_from_options(options: Mapping[str, Any], _: Translate = untranslated) -> SimulatorConfig:
    """The configuration from parsed options (argparse dests); OptionError for a bad value."""
    for name in ("tokens_per_second", "ttft_ms", "max_running_requests", "step_base_ms",
                 "step_per_request_ms", "prefill_ms_per_token", "max_queued_requests"):  # fmt: skip
        if options[name] < 0:
            raise OptionError(
                _("--%(name)s must not be negative") % {"name": name.replace("_", "-")}
            )
    for name in ("context_length", "max_total_tokens", "answer_tokens", "chunked_prefill_size"):
        if options[name] < 1:
            raise OptionError(_("--%(name)s must be positive") % {"name": name.replace("_", "-")})
    template = ""
    if options.get("chat_template"):
        try:
            template = Path(options["chat_template"]).read_text(encoding="utf-8")
        except OSError as exc:
            raise OptionError(
                _("--chat-template: cannot read %(path)s (%(error)s)")
                % {"path": options["chat_template"], "error": exc.strerror}
            ) from None
    return SimulatorConfig(
        kind=options.get("kind") or "sglang",
        chat_template=template,
        model=options["model"],
        tokens_per_second=options["tokens_per_second"],
        ttft_ms=options["ttft_ms"],
        tokenizer=options["tokenizer"],
        context_length=options["context_length"],
        max_total_tokens=options["max_total_tokens"],
        max_running_requests=options["max_running_requests"],
        answer_tokens=options["answer_tokens"],
        engine=options["engine"],
        step_base_ms=options["step_base_ms"],
        step_per_request_ms=options["step_per_request_ms"],
        prefill_ms_per_token=options["prefill_ms_per_token"],
        chunked_prefill_size=options["chunked_prefill_size"],
        radix_cache=not options["disable_radix_cache"],
        priority_scheduling=options["enable_priority_scheduling"],
        low_priority_values_first=options["schedule_low_priority_values_first"],
        max_queued_requests=options["max_queued_requests"],
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m sglang_sim", description=describe())
    add_arguments(parser)
    options = vars(parser.parse_args(argv))
    try:
        config = config_from_options(options)
    except OptionError as exc:
        parser.error(str(exc))
    # Under manage.py, Django's LOGGING sets this up; here the same format and LOG_LEVEL, so the
    # simulator's log reads the same whichever way it was started.
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    serve(config, options["host"], options["port"])
