"""`manage.py calibrate_tokens`: fit the token estimator's factors to a real tokenizer.

    manage.py calibrate_tokens --tokenizer NAME_OR_PATH --corpus FILE.jsonl
        [--family NAME] [--limit N] [--units N] [--write]

Counts every record of the corpus with the tokenizer, fits the estimator's per-class factors
(quotas/calibration.py) and compares three estimators against the exact counts: the fitted one,
the original design's rule of thumb and the factors now shipped for the family. `--write` prints
the fitted FAMILY_FACTORS and FAMILY_UNITS entries to paste into tokenlimit/tokens.py; no file is
changed.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils.translation import gettext as _

from quotas.calibration import (
    DEFAULT_UNITS,
    FEATURES,
    Calibration,
    CorpusError,
    ErrorStats,
    Progress,
    calibrate,
    derive_units,
    display_columns,
    format_factors,
    format_units,
    read_corpus,
)
from tokenlimit.tokens import FAMILY_FACTORS, TokenizerCounter, family_of, get_counter


def _positive(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError(value)
    return number


def _non_negative(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError(value)
    return number


def _pad(text: str, width: int, *, left: bool) -> str:
    fill = " " * max(0, width - display_columns(text))
    return text + fill if left else fill + text


class Command(BaseCommand):
    # Neither the database nor the project's other checks matter for a calibration.
    requires_system_checks: list[str] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Translated here, not as a lazy class attribute: argparse needs a real str.
        self.help = _(
            "Fit the token estimator's per-class factors to a real tokenizer on a JSON-lines "
            "corpus and compare it with the rule of thumb and the shipped factors."
        )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--tokenizer",
            required=True,
            help=_("Tokenizer directory or Hugging Face name (loaded offline; must be exact)."),
        )
        parser.add_argument(
            "--corpus",
            required=True,
            type=Path,
            help=_(
                "JSON lines; a record's text is instruction, input and output joined by "
                'newlines, or its "text" field.'
            ),
        )
        parser.add_argument(
            "--family",
            default="",
            help=_("Estimator family to compare with and to write (default: from the tokenizer)."),
        )
        parser.add_argument(
            "--limit", type=_positive, help=_("Use only the first N records."), metavar="N"
        )
        parser.add_argument(
            "--units",
            type=_non_negative,
            default=DEFAULT_UNITS,
            metavar="N",
            help=_(
                "How many multi-syllable units to derive from the tokenizer "
                "(default %(default)s; 0: character classes only)."
            ),
        )
        parser.add_argument(
            "--write",
            action="store_true",
            help=_("Print the fitted factors and units as Python for tokenlimit/tokens.py."),
        )

    def handle(self, *args: Any, **options: Any) -> None:
        name: str = options["tokenizer"]
        corpus: Path = options["corpus"]
        family: str = options["family"] or family_of(name)
        if family not in FAMILY_FACTORS:
            raise CommandError(
                _("Unknown estimator family %(family)r; known: %(known)s.")
                % {"family": family, "known": ", ".join(sorted(FAMILY_FACTORS))}
            )
        try:
            texts = read_corpus(corpus, options["limit"])
        except CorpusError as exc:
            raise CommandError(str(exc)) from exc
        if not texts:
            raise CommandError(
                _("The corpus %(path)s has no records with text.") % {"path": corpus}
            )
        counter = self._tokenizer(name)

        exact: list[int] = []
        uses: Counter[int] = Counter()
        progress = Progress(len(texts), self._progress_write, _("Counting tokens"))
        for text in texts:
            exact.append(counter.count_text(text))
            if options["units"]:
                uses.update(counter.encode(text))
            progress.update()
        progress.close()

        units = derive_units(uses, lambda token: counter.decode([token]), options["units"])
        result = calibrate(texts, exact, units, family)
        self._report(result, name, corpus)
        if options["write"]:
            self._write(result, corpus)

    def _tokenizer(self, name: str) -> TokenizerCounter:
        counter = get_counter(name, tokenizer=name)
        # get_counter falls back to the bundled Qwen files or the estimator: neither is `name`.
        if not isinstance(counter, TokenizerCounter) or counter.source != f"tokenizer:{name}":
            raise CommandError(
                _(
                    "Cannot load the tokenizer %(name)r (a directory with tokenizer files, or a "
                    "name already in the local Hugging Face cache); calibration needs exact counts."
                )
                % {"name": name}
            )
        return counter

    def _progress_write(self, text: str) -> None:
        self.stderr.write(text, style_func=lambda s: s, ending="")
        self.stderr.flush()

    def _report(self, result: Calibration, name: str, corpus: Path) -> None:
        out = self.stdout.write
        out(
            _(
                "%(records)s records from %(corpus)s: %(chars)s characters, %(tokens)s tokens "
                "counted exactly by %(name)s."
            )
            % {
                "records": f"{result.records:,}",
                "corpus": corpus,
                "chars": f"{result.characters:,}",
                "tokens": f"{result.exact_tokens:,}",
                "name": name,
            }
        )
        out("")
        rows: list[tuple[str, ErrorStats]] = [
            (
                _("fitted: NNLS on this corpus, %(units)d units") % {"units": len(result.units)},
                result.fitted,
            ),
            (
                _("rule of thumb: tokens = 1.2 × Hangul syllables + len(non-Hangul text) / 4"),
                result.rule,
            ),
            (
                _('shipped: FAMILY_FACTORS["%(family)s"]') % {"family": result.family},
                result.shipped,
            ),
        ]
        header = (_("estimator"), _("mean |error|"), _("p95 |error|"), _("total drift"))
        cells = [(label, f"{s.mean:.2%}", f"{s.p95:.2%}", f"{s.drift:+.2%}") for label, s in rows]
        widths = [max(display_columns(row[i]) for row in [header, *cells]) for i in range(4)]
        for row in [header, tuple("-" * w for w in widths), *cells]:
            out("  ".join(_pad(cell, widths[i], left=i == 0) for i, cell in enumerate(row)))
        out("")
        out(
            _(
                "Errors are per record: |estimate − exact| / exact. "
                "Drift: (Σ estimate − Σ exact) / Σ exact."
            )
        )
        fitted = ", ".join(f"{feature}={result.factors[feature]}" for feature in FEATURES)
        out(_("Fitted factors: %(factors)s") % {"factors": fitted})
        if result.kept:
            kept = ", ".join(
                f"{feature} ({result.class_totals[feature]:,})" for feature in result.kept
            )
            out(
                _("Too rare in this corpus to fit, kept at the shipped factor: %(classes)s.")
                % {"classes": kept}
            )

    def _write(self, result: Calibration, corpus: Path) -> None:
        out = self.stdout.write
        out("")
        note = _("fitted by calibrate_tokens on %(corpus)s (%(records)s records)") % {
            "corpus": corpus.name,
            "records": f"{result.records:,}",
        }
        out(f"# FAMILY_FACTORS: {note}")
        out(format_factors(result.family, result.factors))
        out(f"# FAMILY_UNITS: {note}")
        out(format_units(result.family, result.units))
