"""`manage.py simulate_sglang`: the SGLang simulator (no GPU, no model) for tests and benchmarks."""

from __future__ import annotations

import logging
from argparse import ArgumentParser
from typing import Any

from aiohttp import web
from django.core.management.base import BaseCommand, CommandError
from django.utils.translation import gettext as _

from gateway.simulator import DEFAULT_MODEL, SIMULATOR_KEY, SimulatorConfig, build_app

log = logging.getLogger("gateway.simulator")


class Command(BaseCommand):
    help = _(
        "Run an SGLang SIMULATOR: SGLang's HTTP API and metrics with a canned Korean answer, "
        "for machines without a GPU. It is not a model. Test hooks: see gateway/simulator.py."
    )
    # It touches neither the database nor the project's settings beyond logging, so the
    # project's checks would only slow its start and could stop it for unrelated reasons.
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: ArgumentParser) -> None:
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

    def handle(self, *args: Any, **options: Any) -> None:
        for name in ("tokens_per_second", "ttft_ms", "max_running_requests"):
            if options[name] < 0:
                raise CommandError(
                    _("--%(name)s must not be negative") % {"name": name.replace("_", "-")}
                )
        for name in ("context_length", "max_total_tokens", "answer_tokens"):
            if options[name] < 1:
                raise CommandError(
                    _("--%(name)s must be positive") % {"name": name.replace("_", "-")}
                )
        config = SimulatorConfig(
            model=options["model"],
            tokens_per_second=options["tokens_per_second"],
            ttft_ms=options["ttft_ms"],
            tokenizer=options["tokenizer"],
            context_length=options["context_length"],
            max_total_tokens=options["max_total_tokens"],
            max_running_requests=options["max_running_requests"],
            answer_tokens=options["answer_tokens"],
        )
        run(config, options["host"], options["port"])


def run(config: SimulatorConfig, host: str, port: int) -> None:
    app = build_app(config)
    log.info(
        "SGLang SIMULATOR (no model, no GPU: a canned Korean answer) for %s on http://%s:%d; "
        "%s tokens/s, TTFT %s ms, context %d, counting with %s",
        config.model,
        host,
        port,
        config.tokens_per_second or "unlimited",
        config.ttft_ms,
        config.context_length,
        app[SIMULATOR_KEY].counter.source,
    )
    # handler_cancellation: a client disconnect cancels the handler, which aborts generation
    # the way SGLang aborts on disconnect. A short shutdown_timeout: streams may be mid-answer.
    web.run_app(
        app,
        host=host,
        port=port,
        handler_cancellation=True,
        access_log=None,
        print=None,
        shutdown_timeout=1.0,
    )
