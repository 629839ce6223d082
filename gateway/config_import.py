"""Importing config/sglang_korean.yaml and config/korean_users.yaml (the original design's formats).

Every file is read and checked before the database is touched; then all of them are applied in
one transaction, the server file first, because its default_limits are what users without a
`tph` inherit. A file sets every field its format has (a field left out of a user entry means
the plan's value), but never silently over an operator's edit: a value changed in the admin
since the last import is kept and reported as a conflict unless `--file-wins`
(gateway/config_state.py). What the formats do not have (max_parallel_requests, allowed models,
whether a model is active) stays as the admin set it. Re-importing an unchanged file writes
nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from django.conf import settings
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils.functional import Promise
from django.utils.translation import gettext
from django.utils.translation import gettext_lazy as _

from accounts import services as accounts
from accounts.models import ApiKey
from gateway import services as served_models
from gateway.config_state import ConfigState
from gateway.models import CONFIG_KINDS, ServedModel
from quotas import services as quotas
from quotas.models import Plan, UserQuota

INT32_MAX = 2**31 - 1  # PositiveIntegerField on PostgreSQL
INT64_MAX = 2**63 - 1  # PositiveBigIntegerField
# The admin shows an 11-character prefix; a shorter key would be shown almost whole.
MIN_KEY_LENGTH = 20

# The formats' short names → Plan / UserQuota fields.
LIMIT_NAMES = {
    "rpm": "requests_per_minute",
    "tpm": "tokens_per_minute",
    "tph": "tokens_per_hour",
    "daily": "tokens_per_day",
    "cooldown_minutes": "cooldown_minutes",
}
SERVER = "server"
USERS = "users"
KIND_LABELS = {SERVER: _("server configuration"), USERS: _("users configuration")}
TALLY_LABELS = {
    "plans": _("Plans"),
    "models": _("Served models"),
    "users": _("Users"),
    "api_keys": _("API keys"),
}
# ConfigImport.kind → what the command calls one such object.
KIND_NAMES = dict(CONFIG_KINDS)


class ConfigError(Exception):
    """A file cannot be imported; the message names the file and the entry."""

    def __init__(self, file: str, entry: str, message: str) -> None:
        super().__init__(f"{file}: {entry}: {message}" if entry else f"{file}: {message}")


class Invalid(Exception):
    """A value failed its check; `key` is the dotted path below the checked value."""

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(message)
        self.key = key


Check = Callable[[Any], Any]
Note = tuple[str, Promise]  # (entry, why the value is not stored)


@dataclass(frozen=True)
class Field:
    check: Check | None = None
    fields: Mapping[str, Field] | None = None  # a section with exactly these keys
    required: bool = False
    # Set for values that are checked but not stored: where the running system takes them from.
    note: Promise | None = None


def _join(*parts: str) -> str:
    return ".".join(part for part in parts if part)


# --- Checks -----------------------------------------------------------------------------------


def _integer(minimum: int = 0, maximum: int = INT32_MAX) -> Check:
    def check(value: Any) -> int:
        # bool is an int subclass in Python: `rpm: yes` must not become 1.
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            if minimum == 0:
                message = gettext("expected a non-negative integer, got %(value)r")
            elif minimum == 1:
                message = gettext("expected a positive integer, got %(value)r")
            else:
                message = gettext("expected an integer of at least %(minimum)d, got %(value)r")
            raise Invalid(message % {"value": value, "minimum": minimum})
        if value > maximum:
            message = gettext("expected at most %(maximum)d, got %(value)r")
            raise Invalid(message % {"maximum": maximum, "value": value})
        return value

    return check


def _number(maximum: float) -> Check:
    def check(value: Any) -> float:
        # `not 0 < value` also refuses NaN.
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not 0 < value <= maximum
        ):
            message = gettext("expected a number above 0 and at most %(maximum)s, got %(value)r")
            raise Invalid(message % {"maximum": maximum, "value": value})
        return float(value)

    return check


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise Invalid(gettext("expected a string, got %(value)r") % {"value": value})
    return value


def _name(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise Invalid(gettext("expected a non-empty string, got %(value)r") % {"value": value})
    return value


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise Invalid(gettext("expected true or false, got %(value)r") % {"value": value})
    return value


def _names(value: Any) -> list[str]:
    if not isinstance(value, list):
        raise Invalid(gettext("expected a list of names, got %(value)r") % {"value": value})
    for index, item in enumerate(value):
        try:
            _name(item)
        except Invalid as exc:
            raise Invalid(str(exc), key=str(index)) from None
    if len(set(value)) != len(value):
        raise Invalid(gettext("a name is listed twice: %(value)r") % {"value": value})
    return list(value)


def _scalar(value: Any) -> Any:
    if value is not None and not isinstance(value, str | int | float | bool):
        message = gettext("expected a string, number, boolean or null, got %(value)r")
        raise Invalid(message % {"value": value})
    return value


def _mapping(value: Any) -> dict[Any, Any]:
    if not isinstance(value, dict):
        raise Invalid(gettext("expected a mapping, got %(value)r") % {"value": value})
    return value


def _check_section(value: Any, fields: Mapping[str, Field]) -> dict[str, Any]:
    data = _mapping(value)
    for key in data:
        if key not in fields:
            message = gettext("unknown field (expected one of: %(known)s)")
            raise Invalid(message % {"known": ", ".join(fields)}, key=str(key))
    for key, spec in fields.items():
        if spec.required and key not in data:
            raise Invalid(gettext("this field is required"), key=key)
    return {key: _check_field(fields[key], item, key) for key, item in data.items()}


def _check_field(spec: Field, value: Any, key: str) -> Any:
    try:
        if spec.fields is not None:
            return _check_section(value, spec.fields)
        assert spec.check is not None
        return spec.check(value)
    except Invalid as exc:
        raise Invalid(str(exc), key=_join(key, exc.key)) from None


def _sglang_args(value: Any) -> dict[str, Any]:
    # SGLang has hundreds of launch arguments, so unknown names are allowed here (they are not
    # ours to know); the ones this file documents are type-checked, the rest must be scalars.
    args = _mapping(value)
    for key, item in args.items():
        if not isinstance(key, str):
            raise Invalid(gettext("expected an argument name"), key=str(key))
        _check_field(Field(SGLANG_ARGS.get(key, _scalar)), item, key)
    return args


def _username(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise Invalid(gettext("expected a user name (a string), got %(value)r") % {"value": value})
    max_length = User._meta.get_field("username").max_length or 150
    if len(value) > max_length:
        message = gettext("a user name has at most %(length)d characters")
        raise Invalid(message % {"length": max_length})
    try:
        User.username_validator(value)
    except ValidationError as exc:
        raise Invalid(" ".join(exc.messages)) from None
    return value


def _users(value: Any) -> dict[str, dict[str, Any]]:
    checked = {}
    for name, entry in _mapping(value).items():
        try:
            checked[_username(name)] = _check_section(entry, USER_FIELDS)
        except Invalid as exc:
            raise Invalid(str(exc), key=_join(str(name), exc.key)) from None
    return checked


def key_entry(raw_key: Any) -> str:
    """How an error names a key: by its visible prefix, so that no secret lands in a log."""
    return accounts.visible_prefix(str(raw_key)) + "…"


def _api_keys(value: Any) -> dict[str, str]:
    keys = _mapping(value)
    for raw_key, username in keys.items():
        _check_key(raw_key)
        try:
            _username(username)
        except Invalid as exc:
            raise Invalid(str(exc), key=key_entry(raw_key)) from None
    return keys


def _check_key(raw_key: Any) -> None:
    usable = isinstance(raw_key, str) and len(raw_key) >= MIN_KEY_LENGTH
    if not usable or any(char.isspace() for char in raw_key):
        message = gettext("an API key must be a string of at least %(length)d characters")
        raise Invalid(message % {"length": MIN_KEY_LENGTH}, key=key_entry(raw_key))
    if raw_key in accounts.QUICK_START_KEYS:
        # Published in the README: fine for a first try, refused anywhere that is not one.
        if not settings.DEBUG:
            message = gettext("a published quick-start key; it is imported only with DEBUG=1")
            raise Invalid(message, key=key_entry(raw_key))
        return
    reason = accounts.weak_key_reason(raw_key)
    if reason is not None:
        raise Invalid(reason, key=key_entry(raw_key))


# --- The two formats ----------------------------------------------------------------------------

LIMIT_FIELDS = {
    "rpm": Field(_integer()),
    "tpm": Field(_integer()),
    "tph": Field(_integer(maximum=INT64_MAX)),
    "daily": Field(_integer(maximum=INT64_MAX)),
    "cooldown_minutes": Field(_integer()),
}
USER_FIELDS = {**LIMIT_FIELDS, "description": Field(_text)}
SGLANG_ARGS: dict[str, Check] = {
    "served_model_name": _name,
    "tp_size": _integer(1),
    "dp_size": _integer(1),
    "mem_fraction_static": _number(1.0),
    "max_running_requests": _integer(1),
    "schedule_policy": _name,
    "chunked_prefill_size": _integer(-1),  # -1 turns chunked prefill off
    "kv_cache_dtype": _name,
    "enable_metrics": _boolean,
    "enable_cache_report": _boolean,
}
_SGLANG_URL = _("taken from the environment: SGLANG_URL (or a model's upstream URL in the admin)")
SERVER_FILE: dict[str, Field] = {
    "server": Field(
        fields={
            "host": Field(
                _name,
                note=_(
                    "taken from the environment: the address you pass to daphne "
                    "(-b; GATEWAY_HOST in deploy/quickstart.sh)"
                ),
            ),
            "port": Field(
                _integer(1, 65535),
                note=_(
                    "taken from the environment: the port you pass to daphne "
                    "(-p; GATEWAY_PORT in deploy/quickstart.sh)"
                ),
            ),
            "workers": Field(
                _integer(1),
                note=_("not used by the gateway: run that many gateway processes instead"),
            ),
        }
    ),
    "sglang_server": Field(
        required=True,
        fields={
            "host": Field(_name, note=_SGLANG_URL),
            "port": Field(_integer(1, 65535), note=_SGLANG_URL),
            "model_path": Field(_name, required=True),
            "aliases": Field(_names),
            "sglang_args": Field(
                _sglang_args,
                note=_("not used by the gateway: arguments for launching SGLang"),
            ),
        },
    ),
    "storage": Field(
        fields={
            "redis_url": Field(_text, note=_("taken from the environment: REDIS_URL")),
            "database_url": Field(_text, note=_("taken from the environment: DATABASE_URL")),
        }
    ),
    "default_limits": Field(fields=LIMIT_FIELDS),
    "tokenizer": Field(
        fields={
            "model_name": Field(_name),
            "max_length": Field(_integer(1)),
            "korean_factor": Field(_number(10.0)),
            "cache_dir": Field(
                _text,
                note=_(
                    "taken from the environment: HF_HOME (tokenizers are read from the local "
                    "Hugging Face cache, never downloaded)"
                ),
            ),
        }
    ),
    "performance": Field(
        fields={
            "max_concurrent_requests": Field(
                _integer(1),
                note=_(
                    "not used by the gateway: SGLang's max_running_requests bounds concurrency, "
                    "and a plan's max parallel requests bounds each user"
                ),
            ),
            "request_timeout": Field(_number(86400.0)),
            "stream_chunk_timeout": Field(
                _number(86400.0),
                note=_("taken from the environment: GATEWAY_UPSTREAM_READ_TIMEOUT"),
            ),
        }
    ),
}
USERS_FILE: dict[str, Field] = {"users": Field(_users), "api_keys": Field(_api_keys)}


# --- Reading --------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys instead of silently keeping the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[Any] = set()
        for key_node, _value in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r}",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str) -> dict[str, Any]:
    try:
        with Path(path).open(encoding="utf-8") as stream:
            data = yaml.load(stream, Loader=_StrictLoader)  # a SafeLoader: no arbitrary objects
    except OSError as exc:
        message = gettext("cannot read the file: %(error)s")
        raise ConfigError(path, "", message % {"error": exc.strerror or exc}) from None
    except UnicodeDecodeError:
        raise ConfigError(path, "", gettext("the file is not UTF-8 text")) from None
    except yaml.YAMLError as exc:
        raise ConfigError(path, "", gettext("invalid YAML: %(error)s") % {"error": exc}) from None
    if data is None:
        raise ConfigError(path, "", gettext("the file is empty"))
    if not isinstance(data, dict):
        message = gettext("expected a mapping at the top level, got %(value)r")
        raise ConfigError(path, "", message % {"value": data})
    return data


def _kind(path: str, data: dict[str, Any]) -> str:
    server, users = set(data) & set(SERVER_FILE), set(data) & set(USERS_FILE)
    if server and users:
        message = gettext("mixes the server format (%(server)s) and the users format (%(users)s)")
        raise ConfigError(
            path, "", message % {"server": ", ".join(sorted(server)), "users": ", ".join(users)}
        )
    if not server and not users:
        message = gettext(
            "not a known configuration: expected top-level keys from %(server)s "
            "(server file) or %(users)s (users file)"
        )
        raise ConfigError(
            path, "", message % {"server": ", ".join(SERVER_FILE), "users": ", ".join(USERS_FILE)}
        )
    return SERVER if server else USERS


def _check_file(path: str, data: dict[str, Any], fields: Mapping[str, Field]) -> dict[str, Any]:
    try:
        return _check_section(data, fields)
    except Invalid as exc:
        raise ConfigError(path, exc.key, str(exc)) from None


def _notes(data: Mapping[str, Any], fields: Mapping[str, Field], prefix: str = "") -> list[Note]:
    found = []
    for key, value in data.items():
        spec = fields[key]
        if spec.note is not None:
            found.append((_join(prefix, key), spec.note))
        if spec.fields is not None:
            found += _notes(value, spec.fields, _join(prefix, key))
    return found


# --- What the files say ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerConfig:
    file: str
    default_limits: dict[str, int]
    model_name: str
    model_fields: dict[str, Any]
    notes: list[Note]


@dataclass(frozen=True)
class UserEntry:
    name: str
    limits: dict[str, int | None]  # None: no override, the plan's value
    description: str


@dataclass(frozen=True)
class KeyEntry:
    raw_key: str
    username: str

    @property
    def entry(self) -> str:
        return _join("api_keys", key_entry(self.raw_key))

    @property
    def name(self) -> str:
        # Lets the admin's key list tell the public quick-start keys apart at a glance.
        return "quick-start" if self.raw_key in accounts.QUICK_START_KEYS else "config"


@dataclass(frozen=True)
class UsersConfig:
    file: str
    users: list[UserEntry]
    keys: list[KeyEntry]


@dataclass(frozen=True)
class Configs:
    files: list[tuple[str, str]]  # (path, kind) in the order given
    server: ServerConfig | None
    users: list[UsersConfig]


def _server_config(path: str, data: dict[str, Any]) -> ServerConfig:
    server = data["sglang_server"]
    tokenizer = data.get("tokenizer", {})
    performance = data.get("performance", {})
    # SGLang serves a model as --served-model-name if given, else as --model-path.
    name = server.get("sglang_args", {}).get("served_model_name") or server["model_path"]
    tokenizer_name = tokenizer.get("model_name") or server["model_path"]
    defaults = {f.name: f.default for f in ServedModel._meta.concrete_fields}
    model_fields = {
        "aliases": server.get("aliases", []),
        # Blank means "the served model name", which the token counter tries first anyway.
        "tokenizer": "" if tokenizer_name == name else tokenizer_name,
        "context_length": tokenizer.get("max_length", defaults["context_length"]),
        "korean_factor": tokenizer.get("korean_factor"),
        "request_timeout_seconds": performance.get(
            "request_timeout", defaults["request_timeout_seconds"]
        ),
    }
    limits = {LIMIT_NAMES[key]: value for key, value in data.get("default_limits", {}).items()}
    return ServerConfig(path, limits, name, model_fields, _notes(data, SERVER_FILE))


def _users_config(path: str, data: dict[str, Any]) -> UsersConfig:
    users = [
        UserEntry(
            name=name,
            limits={field: entry.get(key) for key, field in LIMIT_NAMES.items()},
            description=entry.get("description", ""),
        )
        for name, entry in data.get("users", {}).items()
    ]
    keys = [KeyEntry(raw, username) for raw, username in data.get("api_keys", {}).items()]
    return UsersConfig(path, users, keys)


def _check_across(files: Sequence[UsersConfig]) -> None:
    """A user or key defined twice would flip on every import; a key needs a defined user."""
    user_file: dict[str, str] = {}
    key_file: dict[str, str] = {}
    for config in files:
        for user in config.users:
            if user.name in user_file:
                message = gettext("also defined in %(file)s") % {"file": user_file[user.name]}
                raise ConfigError(config.file, _join("users", user.name), message)
            user_file[user.name] = config.file
    for config in files:
        for key in config.keys:
            if key.raw_key in key_file:
                message = gettext("also defined in %(file)s") % {"file": key_file[key.raw_key]}
                raise ConfigError(config.file, key.entry, message)
            key_file[key.raw_key] = config.file
            if key.username not in user_file:
                message = gettext("unknown user %(user)r: not under users: in any imported file")
                raise ConfigError(config.file, key.entry, message % {"user": key.username})


def _unique(paths: Iterable[str]) -> list[str]:
    seen: set[Path] = set()
    unique = []
    for path in paths:
        resolved = Path(path).resolve()
        if resolved not in seen:
            seen.add(resolved)
            unique.append(path)
    return unique


def load_configs(paths: Iterable[str]) -> Configs:
    """Read and check every file; nothing touches the database."""
    files: list[tuple[str, str]] = []
    server: ServerConfig | None = None
    users: list[UsersConfig] = []
    for path in _unique(paths):
        data = read_yaml(path)
        kind = _kind(path, data)
        files.append((path, kind))
        if kind == USERS:
            users.append(_users_config(path, _check_file(path, data, USERS_FILE)))
        elif server is not None:
            message = gettext("only one server configuration per import (already given: %(file)s)")
            raise ConfigError(path, "", message % {"file": server.file})
        else:
            server = _server_config(path, _check_file(path, data, SERVER_FILE))
    _check_across(users)
    return Configs(files, server, users)


# --- Applying -------------------------------------------------------------------------------------


@dataclass
class Tally:
    created: int = 0
    updated: int = 0
    unchanged: int = 0


@dataclass
class ImportReport:
    files: list[tuple[str, str]]
    notes: list[tuple[str, str, Promise]]  # (file, entry, note)
    tallies: dict[str, Tally] = field(default_factory=dict)
    state: ConfigState = field(default_factory=ConfigState)
    dry_run: bool = False

    def count(self, what: str, *, created: bool, changed: bool) -> None:
        tally = self.tallies.setdefault(what, Tally())
        if created:
            tally.created += 1
        elif changed:
            tally.updated += 1
        else:
            tally.unchanged += 1

    @property
    def changed(self) -> int:
        return sum(t.created + t.updated for t in self.tallies.values())

    @property
    def unchanged(self) -> int:
        return sum(t.unchanged for t in self.tallies.values())


def import_config(
    paths: Iterable[str], *, dry_run: bool = False, file_wins: bool = False
) -> ImportReport:
    """Check every file, then apply them all in one transaction (server file first). What an
    operator changed in the admin is kept unless `file_wins` (gateway/config_state.py);
    `dry_run` rolls everything back and leaves the report of what would change."""
    configs = load_configs(paths)
    notes = (
        [(configs.server.file, *note) for note in configs.server.notes] if configs.server else []
    )
    with transaction.atomic():
        report = ImportReport(configs.files, notes, state=ConfigState.load(file_wins=file_wins))
        report.dry_run = dry_run
        if configs.server is not None:
            _apply_server(configs.server, report)
        users = _apply_users(configs.users, report)
        _apply_keys(configs.users, users, report)
        if dry_run:
            transaction.set_rollback(True)
    return report


def _apply_server(config: ServerConfig, report: ImportReport) -> None:
    state, file = report.state, config.file
    plan = Plan.objects.filter(name=quotas.DEFAULT_PLAN_NAME).first()
    limits = config.default_limits
    current = {f: getattr(plan, f) for f in limits} if plan is not None else None
    applied = state.to_apply("plan", quotas.DEFAULT_PLAN_NAME, current, limits)
    changed = quotas.set_plan_limits(
        quotas.default_plan(), actor=None, actor_label="import_config", **applied
    )
    state.remember("plan", quotas.DEFAULT_PLAN_NAME, file, limits)
    report.count("plans", created=plan is None, changed=changed)
    fields = config.model_fields
    existing = ServedModel.objects.filter(name=config.model_name).first()
    current = {f: getattr(existing, f) for f in fields} if existing is not None else None
    applied = state.to_apply("model", config.model_name, current, fields)
    model, created, changed = served_models.set_served_model(config.model_name, **applied)
    state.remember("model", config.model_name, file, fields)
    report.count("models", created=created, changed=changed)
    try:
        losers = served_models.take_model_aliases(model, actor_label="import_config")
    except ValueError as exc:
        raise ConfigError(config.file, "sglang_server.aliases", str(exc)) from None
    for _model in losers:
        report.count("models", created=False, changed=True)


def _apply_users(configs: Sequence[UsersConfig], report: ImportReport) -> dict[str, User]:
    if not configs:
        return {}
    # Without a server file in this import, users join the default plan as it stands.
    plan = quotas.default_plan()
    state = report.state
    quotas_by_user = {
        q.user.get_username(): q
        for q in UserQuota.objects.select_related("user", "plan").filter(
            user__username__in=[e.name for c in configs for e in c.users]
        )
    }
    users = {}
    for config in configs:
        for entry in config.users:
            user, created = accounts.get_or_create_user(entry.name)
            wanted = {"plan": plan.name, **entry.limits, "description": entry.description}
            quota = quotas_by_user.get(entry.name)
            current = None
            if quota is not None:
                current = {f: getattr(quota, f) for f in wanted if f != "plan"}
                current["plan"] = quota.plan.name
            applied = state.to_apply("user", entry.name, current, wanted)
            # A plan kept from the admin stays: set_user_quota always sets one.
            kept_plan = quota.plan if quota is not None and "plan" not in applied else plan
            limits = {f: v for f, v in applied.items() if f not in ("plan", "description")}
            _quota, changed = quotas.set_user_quota(
                user,
                kept_plan,
                actor=None,
                actor_label="import_config",
                description=applied.get("description"),
                **limits,
            )
            state.remember("user", entry.name, config.file, wanted)
            report.count("users", created=created, changed=changed)
            users[entry.name] = user
    return users


def _apply_keys(
    configs: Sequence[UsersConfig], users: Mapping[str, User], report: ImportReport
) -> None:
    state = report.state
    keys = [(config.file, key) for config in configs for key in config.keys]
    hashes = [accounts.hash_key(key.raw_key) for _, key in keys]
    # One query up front tells "created" from "updated"; import_api_key only says "changed".
    existing = {
        k.key_hash: k for k in ApiKey.objects.select_related("user").filter(key_hash__in=hashes)
    }
    for (file, key), key_hash in zip(keys, hashes, strict=True):
        found = existing.get(key_hash)
        label = accounts.visible_prefix(key.raw_key)
        wanted = {"user": key.username, "name": key.name}
        current = {"user": found.user.get_username(), "name": found.name} if found else None
        applied = state.to_apply("api_key", label, current, wanted)
        changed = False
        if found is None or applied:
            owner = users[key.username] if found is None or "user" in applied else found.user
            name = key.name if found is None or "name" in applied else found.name
            # A key revoked in the admin stays revoked: import_api_key never un-revokes.
            _key, changed = accounts.import_api_key(
                owner, key.raw_key, name, actor=None, actor_label="import_config"
            )
        state.remember("api_key", label, file, wanted)
        report.count("api_keys", created=found is None, changed=changed)
