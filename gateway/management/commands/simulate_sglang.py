"""`manage.py simulate_sglang`: the SGLang simulator (no GPU, no model) for tests and benchmarks.

A thin wrapper around the Django-free `sglang_sim` package (`python -m sglang_sim` takes the same
options): the options, their checks and the server all live there; this adds Django's
translations of the help and errors, and Django's logging set-up.
"""

from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.utils.translation import gettext as _

from sglang_sim.cli import OptionError, add_arguments, config_from_options, describe
from sglang_sim.server import serve


class Command(BaseCommand):
    help = describe(_)
    # It touches neither the database nor the project's settings beyond logging, so the
    # project's checks would only slow its start and could stop it for unrelated reasons.
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: ArgumentParser) -> None:
        add_arguments(parser, _)

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            config = config_from_options(options, _)
        except OptionError as exc:
            raise CommandError(str(exc)) from None
        serve(config, options["host"], options["port"])
