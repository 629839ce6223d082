"""`manage.py launch_sglang [--config FILE] [--print | --exec | --json]`: start SGLang (on the GPU
host, with the `sglang` extra installed) as the configuration file describes it, with what the
gateway needs. gateway/sglang_launch.py translates the arguments."""

from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.utils.translation import gettext as _

from gateway.config_import import ConfigError, read_yaml
from gateway.sglang_launch import add_arguments, emit, launch_command


class Command(BaseCommand):
    help = _("Start SGLang as config/sglang_korean.yaml describes it (or print the command).")

    def add_arguments(self, parser: ArgumentParser) -> None:
        add_arguments(parser, _)

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            data = read_yaml(options["config"])
        except ConfigError as exc:
            raise CommandError(str(exc)) from None
        server = data.get("sglang_server")
        if not isinstance(server, dict) or "model_path" not in server:
            raise CommandError(_("%(file)s has no sglang_server.model_path") % {
                "file": options["config"],
            })  # fmt: skip
        try:
            launch = launch_command(
                server,
                python=options["python"],
                host=options["host"],
                port=options["port"],
                _=_,
            )
        except ValueError as exc:
            raise CommandError(f"{options['config']}: sglang_args.{exc}") from None
        for note in launch.notes:
            self.stderr.write(self.style.WARNING(f"sglang_args.{note}"))
        emit(launch, options, self.stdout)
