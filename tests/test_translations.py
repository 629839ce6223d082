"""The Korean catalogue (locale/ko): complete, compiled, and used.

Korean is the default language. Both django.po and the compiled django.mo are in the repository,
so that a machine without GNU gettext still shows Korean; these tests catch a .po edited without
recompiling, entries left empty or fuzzy after `makemessages`, and broken placeholders.

This file calls gettext only with variables, never with string literals: `makemessages` scans
tests/ too and would otherwise put these strings into the catalogue.
"""

from __future__ import annotations

import ast
import gettext as gnu_gettext
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from django.conf import settings
from django.utils import translation

from accounts.models import ApiKey
from gateway.models import ServedModel
from quotas.models import Plan, UsageRecord, UserQuota

LOCALE_DIR = Path(settings.BASE_DIR) / "locale"
PO_FILE = LOCALE_DIR / "ko" / "LC_MESSAGES" / "django.po"
MO_FILE = PO_FILE.with_suffix(".mo")


# --- A small .po reader --------------------------------------------------------------------------


@dataclass
class Entry:
    line: int
    msgctxt: str | None = None
    msgid: str = ""
    msgid_plural: str | None = None
    msgstr: dict[int, str] = field(default_factory=dict)  # index 0 for a singular msgstr
    flags: set[str] = field(default_factory=set)
    obsolete: bool = False

    @property
    def key(self) -> str:
        """The key under which the .mo stores the entry."""
        return self.msgid if self.msgctxt is None else f"{self.msgctxt}\x04{self.msgid}"

    def where(self) -> str:
        return f"{PO_FILE.name}:{self.line}: {self.msgid!r}"


_KEYWORD = re.compile(r"^(msgctxt|msgid_plural|msgid|msgstr(?:\[(\d+)\])?)\s+(\".*\")\s*$")


def _unquote(text: str, where: str) -> str:
    value = ast.literal_eval(text)  # a PO string is a C string; these are Python-compatible
    assert isinstance(value, str), where
    return value


def parse_po(path: Path) -> list[Entry]:
    entries: list[Entry] = []
    entry: Entry | None = None
    target: tuple[str, int] | None = None  # which field a continuation line extends

    def finish() -> None:
        nonlocal entry, target
        if entry is not None:
            entries.append(entry)
        entry, target = None, None

    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        obsolete = line.startswith("#~")
        if obsolete:
            line = line[2:].strip()
        if not line:
            finish()
            continue
        if line.startswith("#"):
            if entry is not None and target is not None:
                finish()  # a comment after a msgstr starts the next entry
            if entry is None:
                entry = Entry(line=number)
            if line.startswith("#,"):
                entry.flags.update(flag.strip() for flag in line[2:].split(","))
            continue
        if entry is None:
            entry = Entry(line=number)
        entry.obsolete = entry.obsolete or obsolete
        where = f"{path}:{number}"
        if line.startswith('"'):
            assert target is not None, f"{where}: a string outside any field"
            name, position = target
            value = _unquote(line, where)
            if name == "msgstr":
                entry.msgstr[position] += value
            else:
                setattr(entry, name, getattr(entry, name) + value)
            continue
        match = _KEYWORD.match(line)
        assert match, f"{where}: cannot read {raw!r}"
        keyword, plural_index, text = match.groups()
        if keyword == "msgctxt" and target is not None:
            finish()
            entry = Entry(line=number)
        value = _unquote(text, where)
        if keyword.startswith("msgstr"):
            position = int(plural_index) if plural_index is not None else 0
            entry.msgstr[position] = value
            target = ("msgstr", position)
        else:
            setattr(entry, keyword, value)
            target = (keyword, 0)
    finish()
    return entries


def header(entries: list[Entry]) -> dict[str, str]:
    first = entries[0]
    assert first.msgid == "" and first.msgctxt is None, "the catalogue has no header entry"
    fields = {}
    for line in first.msgstr[0].splitlines():
        name, _sep, value = line.partition(":")
        fields[name.strip()] = value.strip()
    return fields


@pytest.fixture(scope="module")
def all_entries() -> list[Entry]:
    assert PO_FILE.is_file(), f"{PO_FILE} is missing: run makemessages -l ko"
    return parse_po(PO_FILE)


@pytest.fixture(scope="module")
def entries(all_entries: list[Entry]) -> list[Entry]:
    """The live messages: no header, no obsolete (#~) entries."""
    return [e for e in all_entries[1:] if not e.obsolete]


# --- (a) Complete --------------------------------------------------------------------------------


def test_header(all_entries: list[Entry]) -> None:
    fields = header(all_entries)
    assert fields.get("Language") == "ko", fields
    assert fields.get("Content-Type") == "text/plain; charset=UTF-8", fields
    assert fields.get("Plural-Forms") == "nplurals=1; plural=0;", fields
    assert "fuzzy" not in all_entries[0].flags, "a fuzzy header is skipped by msgfmt"


def test_the_parser_reads_the_whole_catalogue(entries: list[Entry]) -> None:
    ids = [e.msgid for e in entries]
    assert len(ids) > 100
    assert len({e.key for e in entries}) == len(ids), "duplicate msgids"
    text = PO_FILE.read_text(encoding="utf-8")
    live = len(re.findall(r"^msgid ", text, flags=re.MULTILINE)) - 1  # minus the header
    assert len(entries) == live


def test_no_entry_is_untranslated_or_fuzzy(entries: list[Entry]) -> None:
    fuzzy = [e.where() for e in entries if "fuzzy" in e.flags]
    empty = [e.where() for e in entries if not e.msgstr or not all(e.msgstr.values())]
    assert not fuzzy, "fuzzy entries (check the translation, then drop the flag):\n" + "\n".join(
        fuzzy
    )
    assert not empty, "untranslated entries:\n" + "\n".join(empty)


def test_plural_entries_have_exactly_one_form(entries: list[Entry]) -> None:
    # Korean has one plural form: msgstr[0] only (nplurals=1).
    for entry in entries:
        expected = {0}
        assert set(entry.msgstr) == expected, entry.where()
        if entry.msgid_plural is None:
            continue
        # The plural's count placeholder must still be there.
        assert _placeholders(entry.msgid_plural) == _placeholders(entry.msgstr[0]), entry.where()


_PERCENT = re.compile(r"%(?:\((\w+)\))?[-#0 +]*\d*(?:\.\d+)?([diouxXeEfFgGcrsa%])")
_BRACES = re.compile(r"(?<!\{)\{(\w*)(?:![rsa])?(?::[^{}]*)?\}(?!\})")


def _placeholders(text: str) -> list[str]:
    found = [f"%({name}){kind}" for name, kind in _PERCENT.findall(text) if kind != "%"]
    found += ["{" + name + "}" for name in _BRACES.findall(text)]
    return sorted(found)


def test_placeholders_are_kept(entries: list[Entry]) -> None:
    # A plural's one Korean form follows its msgid_plural (test above): "this key" / "these
    # %(counter)s keys" is one sentence with the count in Korean.
    broken = [
        f"{e.where()}: {_placeholders(e.msgid)} → {_placeholders(e.msgstr[0])}"
        for e in entries
        if e.msgid_plural is None and _placeholders(e.msgid) != _placeholders(e.msgstr[0])
    ]
    assert not broken, "placeholders differ from the msgid:\n" + "\n".join(broken)


def test_translations_are_korean(entries: list[Entry]) -> None:
    # A msgstr with no Hangul is usually a copied msgid; the few intentional ones are listed.
    same_on_purpose = {"SGLANG_URL (%(url)s)"}
    hangul = re.compile("[\uac00-\ud7a3]")
    latin = [
        e.where()
        for e in entries
        if e.msgid not in same_on_purpose and not hangul.search(e.msgstr[0])
    ]
    assert not latin, "no Korean in:\n" + "\n".join(latin)


# --- (b) Compiled --------------------------------------------------------------------------------


def test_mo_matches_po(entries: list[Entry]) -> None:
    """The committed .mo says what the .po says (run compilemessages after editing the .po)."""
    assert MO_FILE.is_file(), f"{MO_FILE} is missing: run compilemessages -l ko"
    with MO_FILE.open("rb") as stream:
        catalogue = gnu_gettext.GNUTranslations(stream)
    stale = []
    for entry in entries:
        if entry.msgid_plural is not None and entry.msgctxt is not None:
            got = catalogue.npgettext(entry.msgctxt, entry.msgid, entry.msgid_plural, 2)
        elif entry.msgid_plural is not None:
            got = catalogue.ngettext(entry.msgid, entry.msgid_plural, 2)
        elif entry.msgctxt is not None:
            got = catalogue.pgettext(entry.msgctxt, entry.msgid)
        else:
            got = catalogue.gettext(entry.msgid)
        if got != entry.msgstr[0]:
            stale.append(f"{entry.where()}: .mo has {got!r}")
    assert not stale, "django.mo is out of date; run compilemessages -l ko:\n" + "\n".join(stale)
    # Exactly the .po's entries: none missing (a msgstr equal to its msgid would hide that
    # above) and none the .po no longer has. Plural entries are keyed (msgid, index).
    mo_keys = {key[0] if isinstance(key, tuple) else key for key in catalogue._catalog}
    po_keys = {e.key for e in entries} | {""}
    assert mo_keys - po_keys == set(), "django.mo has entries the .po lacks; run compilemessages"
    assert po_keys - mo_keys == set(), "django.po has entries the .mo lacks; run compilemessages"
    assert catalogue.info().get("language") == "ko"


@pytest.mark.skipif(shutil.which("msgfmt") is None, reason="GNU gettext (msgfmt) not installed")
def test_msgfmt_accepts_the_catalogue(tmp_path: Path) -> None:
    # --check also compares the python-format placeholders of every msgid and msgstr.
    result = subprocess.run(
        ["msgfmt", "--check", "-o", str(tmp_path / "django.mo"), str(PO_FILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# --- (c) Used ------------------------------------------------------------------------------------


def verbose(model: type, name: str | None = None) -> str:
    meta = model._meta
    return str(meta.verbose_name if name is None else meta.get_field(name).verbose_name)


@pytest.mark.parametrize(
    ("model", "name", "korean", "english"),
    [
        (ApiKey, None, "API 키", "API key"),
        (ApiKey, "revoked_at", "폐기됨", "revoked"),
        (ApiKey, "tokens_per_day", "일일 토큰", "tokens per day"),
        (Plan, None, "요금제", "plan"),
        (Plan, "tokens_per_minute", "분당 토큰", "tokens per minute"),
        (Plan, "requests_per_minute", "분당 요청", "requests per minute"),
        (Plan, "cooldown_minutes", "쿨다운(분)", "cooldown minutes"),
        (Plan, "max_parallel_requests", "최대 동시 요청", "max parallel requests"),
        (UserQuota, "plan", "요금제", "plan"),
        (UsageRecord, None, "사용 기록", "usage record"),
        (ServedModel, None, "서비스 모델", "served model"),
    ],
)
def test_verbose_names_follow_the_language(
    model: type, name: str | None, korean: str, english: str
) -> None:
    with translation.override("ko"):
        assert verbose(model, name) == korean
    with translation.override("en"):
        assert verbose(model, name) == english


def test_plural_verbose_name() -> None:
    with translation.override("ko"):
        assert str(ApiKey._meta.verbose_name_plural) == "API 키"
    with translation.override("en"):
        assert str(ApiKey._meta.verbose_name_plural) == "API keys"


def test_plural_message() -> None:
    singular, plural = "%(count)d key revoked.", "%(count)d keys revoked."
    with translation.override("ko"):
        assert translation.ngettext(singular, plural, 1) % {"count": 1} == "키 1개를 폐기했습니다."
        assert translation.ngettext(singular, plural, 3) % {"count": 3} == "키 3개를 폐기했습니다."
    with translation.override("en"):
        assert translation.ngettext(singular, plural, 3) % {"count": 3} == "3 keys revoked."


def test_korean_is_the_default() -> None:
    assert settings.LANGUAGE_CODE == "ko"
    assert LOCALE_DIR in [Path(p) for p in settings.LOCALE_PATHS]
    with translation.override(settings.LANGUAGE_CODE):
        assert verbose(ApiKey) == "API 키"


@pytest.mark.django_db
def test_admin_pages_are_korean_by_default(admin_client) -> None:
    url = "/admin/quotas/plan/add/"
    page = admin_client.get(url).content.decode()  # no Accept-Language: LANGUAGE_CODE
    assert "분당 토큰" in page
    assert "쿨다운(분)" in page
    page = admin_client.get(url, headers={"accept-language": "en"}).content.decode()
    assert "tokens per minute" in page.lower()
    assert "분당 토큰" not in page


# --- (d) Known strings are in the catalogue ------------------------------------------------------


@pytest.mark.parametrize(
    "msgid",
    [
        "API key",
        "API keys",
        "Revoke selected keys",
        "%(count)d key revoked.",
        "tokens per minute",
        "cooldown minutes",
        "plan",
        "usage record",
        "served model",
        "Korean",
        "taken from the environment: REDIS_URL",
        "expected a positive integer, got %(value)r",
        "Telemetry",
    ],
)
def test_known_string_is_in_the_catalogue(entries: list[Entry], msgid: str) -> None:
    assert msgid in {e.msgid for e in entries}, f"{msgid!r}: run makemessages -l ko"
