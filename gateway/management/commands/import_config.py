"""`manage.py import_config PATH [PATH …]`: load config/*.yaml into the database.

The parsing and checks live in gateway.config_import; this command only reports.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils.translation import gettext, ngettext

from accounts.services import quick_start_keys_in_use
from gateway.config_import import (
    KIND_LABELS,
    KIND_NAMES,
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
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help=gettext("Print what would change, field by field, and change nothing."),
        )
        parser.add_argument(
            "--file-wins",
            action="store_true",
            help=gettext("Apply the file's values also where they were changed in the admin."),
        )

    def handle(self, *args: Any, paths: list[str], **options: Any) -> None:
        try:
            report = import_config(
                paths, dry_run=options["dry_run"], file_wins=options["file_wins"]
            )
        except ConfigError as exc:
            raise CommandError(str(exc)) from exc
        self._changes(report, verbosity=options["verbosity"])
        self._summary(report, verbosity=options["verbosity"])
        self._warn_quick_start_keys()

    def _changes(self, report: ImportReport, verbosity: int) -> None:
        """Field by field: always on a dry run and for conflicts, else with -v 2."""
        for change in report.state.changes:
            if not (report.dry_run or change.conflict or verbosity >= 2):
                continue
            where = f"{KIND_NAMES.get(change.kind, change.kind)} {change.name}: {change.field}"
            values = f"{change.old!r} → {change.new!r}"
            if not change.conflict:
                self.stdout.write(f"  {where}: {values}")
            elif report.state.file_wins:
                line = gettext("%(where)s: changed in the admin, the file wins: %(values)s")
                self.stdout.write(
                    self.style.WARNING("  " + line % {"where": where, "values": values})
                )
            else:
                line = gettext(
                    "%(where)s: changed in the admin to %(admin)r, kept; the file says %(file)r"
                )
                self.stdout.write(self.style.WARNING("  " + line % {
                    "where": where, "admin": change.old, "file": change.new,
                }))  # fmt: skip
        conflicts = len(report.state.conflicts)
        if conflicts and not report.state.file_wins:
            line = ngettext(
                "%(count)d conflict: the admin's value was kept (--file-wins to apply the file's).",
                "%(count)d conflicts: the admin's values were kept (--file-wins to apply the "
                "file's).",
                conflicts,
            )
            self.stdout.write(self.style.WARNING(line % {"count": conflicts}))
        if report.dry_run:
            self.stdout.write(self.style.NOTICE(gettext("Dry run: nothing was changed.")))

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
