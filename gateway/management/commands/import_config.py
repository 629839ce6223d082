"""`manage.py import_config PATH [PATH …]`: load config/*.yaml into the database.

The parsing and checks live in gateway.config_import; this command only reports.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils.translation import gettext

from accounts.services import quick_start_keys_in_use
from gateway.config_import import (
    KIND_LABELS,
    TALLY_LABELS,
    ConfigError,
    ImportReport,
    import_config,
)


class Command(BaseCommand):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Translated here, not as a lazy class attribute: argparse needs a real str.
        self.help = gettext(
            "Import config/sglang_korean.yaml (default plan, served model) and "
            "config/korean_users.yaml (users, limits, API keys). Safe to run again."
        )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("paths", nargs="+", metavar="PATH", help=gettext("a YAML file"))

    def handle(self, *args: Any, paths: list[str], **options: Any) -> None:
        try:
            report = import_config(paths)
        except ConfigError as exc:
            raise CommandError(str(exc)) from exc
        self._summary(report, verbosity=options["verbosity"])
        self._warn_quick_start_keys()

    def _summary(self, report: ImportReport, verbosity: int) -> None:
        if verbosity < 1:
            return
        for path, kind in report.files:
            self.stdout.write(f"{path}: {KIND_LABELS[kind]}")
        for what, tally in report.tallies.items():
            line = gettext(
                "%(what)s: %(created)d created, %(updated)d updated, %(unchanged)d unchanged"
            )
            self.stdout.write("  " + line % {"what": TALLY_LABELS[what], **vars(tally)})
        if report.notes:
            self.stdout.write(gettext("Checked but not stored:"))
        for path, entry, note in report.notes:
            self.stdout.write(f"  {path}: {entry}: {note}")
        done = gettext("Done: %(changed)d changed, %(unchanged)d unchanged.")
        self.stdout.write(
            self.style.SUCCESS(done % {"changed": report.changed, "unchanged": report.unchanged})
        )

    def _warn_quick_start_keys(self) -> None:
        # The quick-start keys are published in the repository: anyone can use them.
        prefixes = quick_start_keys_in_use()
        if settings.DEBUG or not prefixes:
            return
        message = gettext(
            "The public quick-start keys %(prefixes)s are active while DEBUG is off. Revoke "
            "them in the admin (API keys, action “Revoke selected keys”) and create new keys."
        )
        prefixes_text = ", ".join(f"{prefix}…" for prefix in sorted(prefixes))
        self.stderr.write(self.style.WARNING(message % {"prefixes": prefixes_text}))
