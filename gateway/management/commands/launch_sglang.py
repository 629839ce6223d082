"""`manage.py launch_sglang [--config FILE] [--print | --exec | --json]`: start SGLang (on the GPU
host, with the `sglang` extra installed) as the configuration file describes it, with what the
gateway needs. gateway/sglang_launch.py translates the arguments."""

from __future__ import annotations

import json
import os
import shlex
import sys
from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.utils.translation import gettext as _

from gateway.config_import import ConfigError, read_yaml
from gateway.sglang_launch import launch_command


class Command(BaseCommand):
    help = _("Start SGLang as config/sglang_korean.yaml describes it (or print the command).")

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--config", default="config/sglang_korean.yaml")
        parser.add_argument("--host", default=None, help=_("Default: sglang_server.host."))
        parser.add_argument(
            "--port", type=int, default=None, help=_("Default: sglang_server.port.")
        )
        parser.add_argument(
            "--python", default=sys.executable, help=_("The Python that has SGLang installed.")
        )
        mode = parser.add_mutually_exclusive_group()
        mode.add_argument("--print", action="store_true", help=_("Print the command (default)."))
        mode.add_argument("--exec", action="store_true", help=_("Replace this process by SGLang."))
        mode.add_argument(
            "--json",
            action="store_true",
            help=_("Print the command as a JSON list (a container's command in compose or Helm)."),
        )

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
        if options["exec"]:
            os.execvp(launch.args[0], launch.args)
        if options["json"]:
            self.stdout.write(json.dumps(launch.args[1:], ensure_ascii=False))
            return
        self.stdout.write(shlex.join(launch.args))
