"""`manage.py export_usage --since YYYY-MM-DD --until YYYY-MM-DD [--period day|hour|minute|raw]
[--user NAME] [--output FILE]`: usage by user and period as CSV.

The rows come from telemetry.exports; this command parses arguments, opens the output and
draws the progress bar on stderr (so that the CSV on stdout stays clean).
"""

from __future__ import annotations

import argparse
from datetime import date, datetime
from pathlib import Path
from typing import Any

from django.contrib.auth.models import User
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils.translation import gettext, ngettext

from telemetry.exports import EXPORT_PERIODS, Export, ProgressBar, usage_export, write_csv


def _day(value: str) -> date:
    try:
        return datetime.strptime(value, "%Y-%m-%d").date()
    except ValueError:
        raise argparse.ArgumentTypeError(
            gettext("%(value)r is not a date in the form YYYY-MM-DD") % {"value": value}
        ) from None


class Command(BaseCommand):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Translated here, not as a lazy class attribute: argparse needs a real str.
        self.help = gettext(
            "Export usage by user and period as CSV (UTF-8 with BOM, for Excel): from the "
            "roll-ups, or the raw ledger with --period raw. Dates are days in "
            "LIMITER_TIME_ZONE; both are included."
        )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--since", type=_day, required=True, metavar="YYYY-MM-DD", help=gettext("first day")
        )
        parser.add_argument(
            "--until",
            type=_day,
            required=True,
            metavar="YYYY-MM-DD",
            help=gettext("last day (included)"),
        )
        parser.add_argument(
            "--period",
            choices=EXPORT_PERIODS,
            default="day",
            help=gettext("roll-up period, or raw for the ledger's rows (default: day)"),
        )
        parser.add_argument("--user", metavar="NAME", help=gettext("only this user"))
        parser.add_argument(
            "--output",
            metavar="FILE",
            help=gettext("write to FILE instead of standard output"),
        )

    def handle(
        self,
        *args: Any,
        since: date,
        until: date,
        period: str,
        user: str | None,
        output: str | None,
        **options: Any,
    ) -> None:
        if until < since:
            raise CommandError(
                gettext("--until %(until)s is before --since %(since)s")
                % {"until": until.isoformat(), "since": since.isoformat()}
            )
        owner = None
        if user is not None:
            owner = User.objects.filter(username=user).first()
            if owner is None:
                raise CommandError(gettext("There is no user named %(name)r.") % {"name": user})
        export = usage_export(period=period, since=since, until=until, user=owner)
        bar = None
        if options["verbosity"] >= 1:
            bar = ProgressBar(
                # Plain: stderr's default style on a terminal is the error colour.
                lambda text: self.stderr.write(text, style_func=str, ending=""),
                export.count(),
                interactive=self.stderr.isatty(),
            )
        rows = self._write(export, output, bar)
        if bar is not None:
            bar.finish()
            where = output if output is not None else gettext("standard output")
            done = ngettext(
                "%(rows)d row written to %(where)s.", "%(rows)d rows written to %(where)s.", rows
            ) % {"rows": rows, "where": where}
            self.stderr.write(done, style_func=self.style.SUCCESS)

    def _write(self, export: Export, output: str | None, bar: ProgressBar | None) -> int:
        progress = bar.update if bar is not None else None
        if output is None:
            return write_csv(lambda text: self.stdout.write(text, ending=""), export, progress)
        path = Path(output)
        # Written next to the target and renamed at the end: a failed export leaves no
        # half-written file under the name asked for.
        partial = path.with_name(path.name + ".part")
        try:
            with partial.open("w", encoding="utf-8", newline="") as stream:
                rows = write_csv(stream.write, export, progress)
            partial.replace(path)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise CommandError(
                gettext("Cannot write %(file)s: %(error)s")
                % {"file": output, "error": exc.strerror or exc}
            ) from exc
        return rows
