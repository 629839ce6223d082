"""`manage.py import_config` with the shipped config/ files, changed copies and broken ones."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
import yaml
from django.conf import settings
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import translation

from accounts.models import ApiKey
from accounts.services import QUICK_START_KEYS, hash_key, revoke_api_keys
from gateway.models import ServedModel
from quotas.models import Plan, UserQuota
from quotas.services import load_key_grant
from tokenlimit.limiter import Limits

CONFIG = Path(settings.BASE_DIR) / "config"
SERVER_FILE = str(CONFIG / "sglang_korean.yaml")
USERS_FILE = str(CONFIG / "korean_users.yaml")
MODEL = "Qwen/Qwen2.5-7B-Instruct"

# name → (rpm, tpm, tph override or None, daily, cooldown)
USERS = {
    "admin": (120, 25000, 1_500_000, 5_000_000, 1),
    "한국어개발자": (80, 15000, 900_000, 3_000_000, 1),
    "사용자1": (30, 5000, 300_000, 1_000_000, 3),
    "개발자1": (60, 10000, None, 2_000_000, 2),
    "테스트": (15, 2000, None, 200_000, 2),
}
KEYS = {
    "sk-admin-korean-key-123": "admin",
    "sk-dev-korean-key-456": "한국어개발자",
    "sk-user1-korean-key-def": "사용자1",
    "sk-dev1-korean-key-789": "개발자1",
    "sk-test-korean-key-stu": "테스트",
}
DEFAULT_TPH = 500_000

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def english() -> Iterator[None]:
    # The assertions read the msgids; a Korean catalogue must not break them.
    with translation.override("en"):
        yield


@pytest.fixture(autouse=True)
def first_try(settings: Any) -> None:
    # The shipped users file holds the published quick-start keys: imported with DEBUG only
    # (as deploy/quickstart.sh runs it). Tests of DEBUG off set it themselves.
    settings.DEBUG = True


# What an operator should choose: 32 random URL-safe bytes, as the admin generates.
STRONG_KEY = "sk-q3X8vN1cLr5TzA0wKb7YhE2mJ9uPgD4sFo6iRl_Vt-8"


def run(*paths: str) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command("import_config", *paths, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def shipped(path: str) -> dict[str, Any]:
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def write(tmp_path: Path, name: str, data: Any) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return str(path)


def row_counts() -> dict[str, int]:
    return {
        model.__name__: model.objects.count()
        for model in (User, UserQuota, ApiKey, Plan, ServedModel)
    }


def assert_shipped_state() -> None:
    plan = Plan.objects.get(name="default")
    assert (
        plan.requests_per_minute,
        plan.tokens_per_minute,
        plan.tokens_per_hour,
        plan.tokens_per_day,
        plan.cooldown_minutes,
    ) == (40, 8000, 500_000, 1_000_000, 2)

    model = ServedModel.objects.get()
    assert model.name == MODEL
    assert model.aliases == ["korean-qwen"]
    assert model.tokenizer == ""  # same as the served name: the counter tries that first
    assert model.context_length == 32768
    assert model.korean_factor == pytest.approx(1.15)
    assert model.request_timeout_seconds == 300.0
    assert model.upstream_url == ""  # SGLANG_URL from the environment wins
    assert model.is_active

    assert UserQuota.objects.count() == len(USERS)
    for name, (rpm, tpm, tph, daily, cooldown) in USERS.items():
        quota = UserQuota.objects.select_related("user", "plan").get(user__username=name)
        assert quota.plan == plan
        assert quota.requests_per_minute == rpm
        assert quota.tokens_per_minute == tpm
        assert quota.tokens_per_hour == tph
        assert quota.tokens_per_day == daily
        assert quota.cooldown_minutes == cooldown
        assert quota.max_parallel_requests is None
        assert quota.description  # Korean text from the file

    assert ApiKey.objects.count() == len(KEYS)
    for raw_key, name in KEYS.items():
        key = ApiKey.objects.get(key_hash=hash_key(raw_key))
        assert key.user.username == name
        assert key.imported
        assert key.prefix == raw_key[:11]
        assert raw_key not in {key.name, key.prefix, key.key_hash}
        grant = load_key_grant(hash_key(raw_key))
        assert grant is not None
        assert grant.username == name
        assert grant.is_usable_now()
        rpm, tpm, tph, daily, cooldown = USERS[name]
        assert grant.limits == Limits(
            requests_per_minute=rpm,
            tokens_per_minute=tpm,
            tokens_per_hour=tph if tph is not None else DEFAULT_TPH,
            tokens_per_day=daily,
            cooldown_minutes=cooldown,
            max_parallel_requests=8,
        )


def test_imports_every_value_of_the_shipped_files(settings: Any) -> None:
    out, err = run(SERVER_FILE, USERS_FILE)

    assert_shipped_state()
    assert "Users: 5 created, 0 updated, 0 unchanged" in out
    assert "API keys: 5 created, 0 updated, 0 unchanged" in out
    assert "Done: 12 changed, 0 unchanged." in out
    assert "server.port: taken from the environment" in out
    assert "storage.database_url: taken from the environment: DATABASE_URL" in out
    assert err == ""
    for raw_key in KEYS:
        assert raw_key not in out


def test_users_without_tph_inherit_the_default_limits() -> None:
    run(SERVER_FILE, USERS_FILE)

    for name in ("개발자1", "테스트"):
        quota = UserQuota.objects.get(user__username=name)
        assert quota.tokens_per_hour is None
        assert quota.effective_limits().tokens_per_hour == 500_000


def test_argument_order_does_not_matter() -> None:
    out, _err = run(USERS_FILE, SERVER_FILE)

    assert_shipped_state()
    assert "Done: 12 changed" in out


def test_second_import_reports_and_writes_nothing() -> None:
    run(SERVER_FILE, USERS_FILE)
    before = row_counts()

    with CaptureQueriesContext(connection) as queries:
        out, _err = run(SERVER_FILE, USERS_FILE)

    writes = [
        q["sql"]
        for q in queries.captured_queries
        if q["sql"].lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE"))
    ]
    assert writes == []
    assert "Done: 0 changed, 12 unchanged." in out
    assert row_counts() == before
    assert_shipped_state()


def test_a_changed_file_updates_in_place(tmp_path: Path) -> None:
    run(SERVER_FILE, USERS_FILE)
    ids = {name: User.objects.get(username=name).pk for name in USERS}
    model_id = ServedModel.objects.get().pk
    server, users = shipped(SERVER_FILE), shipped(USERS_FILE)
    server["default_limits"]["tph"] = 600_000
    server["sglang_server"]["aliases"] = ["korean-qwen", "qwen"]
    server["tokenizer"]["model_name"] = "/models/qwen-tokenizer"
    users["users"]["사용자1"]["rpm"] = 45
    del users["users"]["사용자1"]["tph"]
    users["users"]["사용자1"]["description"] = "바뀐 설명"
    users["api_keys"]["sk-test-korean-key-stu"] = "개발자1"

    out, _err = run(write(tmp_path, "s.yaml", server), write(tmp_path, "u.yaml", users))

    assert {name: User.objects.get(username=name).pk for name in USERS} == ids
    model = ServedModel.objects.get()
    assert model.pk == model_id
    assert model.aliases == ["korean-qwen", "qwen"]
    assert model.tokenizer == "/models/qwen-tokenizer"
    quota = UserQuota.objects.get(user__username="사용자1")
    assert quota.requests_per_minute == 45
    assert quota.tokens_per_hour is None  # left out: back to the plan's value
    assert quota.description == "바뀐 설명"
    assert quota.effective_limits().tokens_per_hour == 600_000
    grant = load_key_grant(hash_key("sk-test-korean-key-stu"))
    assert grant is not None and grant.username == "개발자1"
    assert grant.limits.tokens_per_hour == 600_000
    assert "Plans: 0 created, 1 updated, 0 unchanged" in out
    assert "Users: 0 created, 1 updated, 4 unchanged" in out
    assert "API keys: 0 created, 1 updated, 4 unchanged" in out
    assert "Done: 4 changed" in out


def test_users_alone_join_the_existing_default_plan() -> None:
    Plan.objects.create(name="default", tokens_per_hour=700_000)

    run(USERS_FILE)

    grant = load_key_grant(hash_key("sk-dev1-korean-key-789"))
    assert grant is not None and grant.limits.tokens_per_hour == 700_000
    assert not ServedModel.objects.exists()


def test_the_same_file_twice_is_imported_once() -> None:
    out, _err = run(USERS_FILE, USERS_FILE, SERVER_FILE)

    assert "Users: 5 created" in out


def test_a_revoked_key_stays_revoked() -> None:
    run(SERVER_FILE, USERS_FILE)
    revoke_api_keys(key_ids=list(ApiKey.objects.values_list("pk", flat=True)), actor=None)

    out, _err = run(SERVER_FILE, USERS_FILE)

    assert not ApiKey.objects.filter(revoked_at__isnull=True).exists()
    assert "Done: 0 changed" in out


def test_served_model_name_and_alias_taken_from_another_model(tmp_path: Path) -> None:
    old = ServedModel.objects.create(name="old-qwen", aliases=["korean-qwen", "legacy"])
    server = shipped(SERVER_FILE)
    server["sglang_server"]["sglang_args"]["served_model_name"] = "qwen-7b"

    out, _err = run(write(tmp_path, "s.yaml", server))

    model = ServedModel.objects.get(name="qwen-7b")
    assert model.tokenizer == MODEL  # the served name is not a tokenizer: model_path is
    old.refresh_from_db()
    assert old.aliases == ["legacy"]  # a name means one model
    assert "Served models: 1 created, 1 updated, 0 unchanged" in out


# --- Errors: a clear message naming the file and the entry, and nothing imported -------------

Mutation = Callable[[dict[str, Any]], None]


def _set(*path: str, value: Any) -> Mutation:
    def mutate(data: dict[str, Any]) -> None:
        for key in path[:-1]:
            data = data[key]
        data[path[-1]] = value

    return mutate


def _delete(*path: str) -> Mutation:
    def mutate(data: dict[str, Any]) -> None:
        for key in path[:-1]:
            data = data[key]
        del data[path[-1]]

    return mutate


USERS_ERRORS: list[tuple[Mutation, str]] = [
    (
        _set("users", "사용자1", "rpm", value="fast"),
        "users.사용자1.rpm: expected a non-negative integer, got 'fast'",
    ),
    (
        _set("users", "사용자1", "tpm", value=-5),
        "users.사용자1.tpm: expected a non-negative integer, got -5",
    ),
    (
        _set("users", "테스트", "daily", value=True),
        "users.테스트.daily: expected a non-negative integer, got True",
    ),
    (
        _set("users", "admin", "tph", value=1.5),
        "users.admin.tph: expected a non-negative integer, got 1.5",
    ),
    (
        _set("users", "admin", "rpm", value=2**31),
        "users.admin.rpm: expected at most 2147483647, got 2147483648",
    ),
    (
        _set("users", "사용자1", "description", value=5),
        "users.사용자1.description: expected a string, got 5",
    ),
    (
        _set("users", "사용자1", "speed", value=3),
        "users.사용자1.speed: unknown field (expected one of: rpm, tpm, tph, daily, "
        "cooldown_minutes, description)",
    ),
    (_set("users", "사용자1", value=5), "users.사용자1: expected a mapping, got 5"),
    (_set("groups", value={}), "groups: unknown field (expected one of: users, api_keys)"),
    (
        _set("api_keys", "sk-test-korean-key-stu", value="누구"),
        "api_keys.sk-test-kor…: unknown user '누구': not under users: in any imported file",
    ),
    (
        _set("api_keys", "sk-short", value="admin"),
        "api_keys.sk-short…: an API key must be a string of at least 20 characters",
    ),
]
SERVER_ERRORS: list[tuple[Mutation, str]] = [
    (
        _set("default_limits", "tph", value="many"),
        "default_limits.tph: expected a non-negative integer, got 'many'",
    ),
    (
        _set("server", "port", value="8080"),
        "server.port: expected a positive integer, got '8080'",
    ),
    (_set("server", "port", value=70000), "server.port: expected at most 65535, got 70000"),
    (
        _set("performance", "request_timeout", value=-1),
        "performance.request_timeout: expected a number above 0 and at most 86400.0, got -1",
    ),
    (
        _set("tokenizer", "korean_factor", value=False),
        "tokenizer.korean_factor: expected a number above 0 and at most 10.0, got False",
    ),
    (
        _set("sglang_server", "sglang_args", "tp_size", value=0),
        "sglang_server.sglang_args.tp_size: expected a positive integer, got 0",
    ),
    (
        _set("sglang_server", "sglang_args", "extra", value={"a": 1}),
        "sglang_server.sglang_args.extra: expected a string, number, boolean or null, got {'a': 1}",
    ),
    (
        _set("sglang_server", "aliases", value="korean-qwen"),
        "sglang_server.aliases: expected a list of names, got 'korean-qwen'",
    ),
    (
        _set("sglang_server", "aliases", value=["korean-qwen", ""]),
        "sglang_server.aliases.1: expected a non-empty string, got ''",
    ),
    (_delete("sglang_server", "model_path"), "sglang_server.model_path: this field is required"),
    (_delete("sglang_server"), "sglang_server: this field is required"),
    (
        _set("tokenizer", "vocab", value=1),
        "tokenizer.vocab: unknown field (expected one of: model_name, max_length, "
        "korean_factor, cache_dir)",
    ),
    (_set("storage", "redis_url", value=6379), "storage.redis_url: expected a string, got 6379"),
]


@pytest.mark.parametrize(("mutate", "message"), USERS_ERRORS)
def test_a_bad_users_file_imports_nothing(tmp_path: Path, mutate: Mutation, message: str) -> None:
    users = shipped(USERS_FILE)
    mutate(users)
    path = write(tmp_path, "users.yaml", users)
    before = row_counts()

    with pytest.raises(CommandError) as caught:
        run(SERVER_FILE, path)

    assert str(caught.value) == f"{path}: {message}"
    assert row_counts() == before  # the server file was not applied either


@pytest.mark.parametrize(("mutate", "message"), SERVER_ERRORS)
def test_a_bad_server_file_imports_nothing(tmp_path: Path, mutate: Mutation, message: str) -> None:
    server = shipped(SERVER_FILE)
    mutate(server)
    path = write(tmp_path, "server.yaml", server)
    before = row_counts()

    with pytest.raises(CommandError) as caught:
        run(USERS_FILE, path)

    assert str(caught.value) == f"{path}: {message}"
    assert row_counts() == before


def test_an_invalid_username_is_named(tmp_path: Path) -> None:
    users = shipped(USERS_FILE)
    users["users"]["빈 칸"] = {"rpm": 1}
    path = write(tmp_path, "users.yaml", users)

    with pytest.raises(CommandError, match=r"users\.빈 칸: Enter a valid username"):
        run(path)
    assert row_counts() == dict.fromkeys(row_counts(), 0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("users: [unclosed\n", "invalid YAML: "),
        ("users:\n  사용자1: {rpm: 1}\n  사용자1: {rpm: 2}\n", "found duplicate key '사용자1'"),
        ("", "the file is empty"),
        ("- a\n- b\n", "expected a mapping at the top level, got ['a', 'b']"),
        ("foo: 1\n", "not a known configuration: expected top-level keys from server, "),
        ("users: {}\ndefault_limits: {}\n", "mixes the server format (default_limits) and "),
        (b"users: \xff\n", "the file is not UTF-8 text"),
    ],
)
def test_unreadable_files_are_named(tmp_path: Path, text: str | bytes, message: str) -> None:
    path = tmp_path / "broken.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")

    with pytest.raises(CommandError) as caught:
        run(SERVER_FILE, str(path))

    assert str(caught.value).startswith(f"{path}: ")
    assert message in str(caught.value)
    assert row_counts() == dict.fromkeys(row_counts(), 0)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.yaml")

    with pytest.raises(CommandError) as caught:
        run(SERVER_FILE, missing)

    assert str(caught.value) == f"{missing}: cannot read the file: No such file or directory"
    assert not Plan.objects.exists()


def test_two_server_files_are_refused(tmp_path: Path) -> None:
    copy = write(tmp_path, "copy.yaml", shipped(SERVER_FILE))

    with pytest.raises(CommandError, match="only one server configuration per import"):
        run(SERVER_FILE, copy)


def test_a_user_defined_in_two_files_is_refused(tmp_path: Path) -> None:
    other = write(tmp_path, "other.yaml", {"users": {"사용자1": {"rpm": 1}}})

    with pytest.raises(CommandError) as caught:
        run(USERS_FILE, other)

    assert str(caught.value) == f"{other}: users.사용자1: also defined in {USERS_FILE}"


def test_keys_may_name_users_of_another_imported_file(tmp_path: Path) -> None:
    keys = write(tmp_path, "keys.yaml", {"api_keys": {STRONG_KEY: "사용자1"}})

    run(USERS_FILE, keys)

    grant = load_key_grant(hash_key(STRONG_KEY))
    assert grant is not None and grant.username == "사용자1"


def test_a_failure_while_applying_rolls_everything_back() -> None:
    # The alias the file wants is another model's own name: found only once applying.
    ServedModel.objects.create(name="korean-qwen")
    before = row_counts()

    with pytest.raises(CommandError) as caught:
        run(SERVER_FILE, USERS_FILE)

    assert str(caught.value) == (
        f"{SERVER_FILE}: sglang_server.aliases: korean-qwen is already the name of another "
        "served model"
    )
    assert row_counts() == before


# --- The quick-start keys ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "weak",
    [
        "sk-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",  # long, but one character
        "sk-my-company-key-2026-x",  # 9 characters beyond the 11 the admin shows
        "sk-0123456789abcdef0123456789abcdef",  # 24 hidden hex characters: 96 bits
    ],
)
def test_operator_chosen_keys_need_128_hidden_random_bits(tmp_path: Path, weak: str) -> None:
    keys = write(tmp_path, "keys.yaml", {"users": {"운영": {"rpm": 1}}, "api_keys": {weak: "운영"}})

    with pytest.raises(CommandError, match="at least 128 random bits beyond its first 11"):
        run(keys)
    assert not ApiKey.objects.exists()


def test_a_strong_key_is_imported_with_debug_off(tmp_path: Path, settings: Any) -> None:
    settings.DEBUG = False
    keys = write(
        tmp_path, "keys.yaml", {"users": {"운영": {"rpm": 1}}, "api_keys": {STRONG_KEY: "운영"}}
    )

    run(keys)

    assert load_key_grant(hash_key(STRONG_KEY)) is not None


def test_quick_start_keys_are_refused_with_debug_off(settings: Any) -> None:
    settings.DEBUG = False

    with pytest.raises(CommandError, match="published quick-start key; it is imported only with"):
        run(SERVER_FILE, USERS_FILE)
    assert not ApiKey.objects.exists()


def test_warns_about_quick_start_keys_when_debug_is_off(settings: Any) -> None:
    run(SERVER_FILE, USERS_FILE)  # imported on a first try (DEBUG=1) …
    settings.DEBUG = False  # … and still active once DEBUG is off

    _out, err = run(SERVER_FILE)

    assert "public quick-start keys" in err
    for raw_key in QUICK_START_KEYS:
        assert f"{raw_key[:11]}…" in err
        assert raw_key not in err


def test_no_warning_once_the_quick_start_keys_are_revoked(settings: Any) -> None:
    run(SERVER_FILE, USERS_FILE)
    revoke_api_keys(key_ids=list(ApiKey.objects.values_list("pk", flat=True)), actor=None)
    settings.DEBUG = False

    _out, err = run(SERVER_FILE)

    assert err == ""


def test_no_warning_with_debug_on(settings: Any) -> None:
    settings.DEBUG = True

    _out, err = run(SERVER_FILE, USERS_FILE)

    assert err == ""
