"""Settings for the whole project, read from the environment through small strict helpers.

Every knob has an embedded default so that a fresh clone runs on one box (SQLite, no Redis,
eager Celery); production sets DATABASE_URL, REDIS_URL and SECRET_KEY. A malformed value stops
the process at start-up with the variable's name rather than surfacing later as a strange bug.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from django.core.exceptions import ImproperlyConfigured
from django.utils.translation import gettext_lazy as _

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("LIMITER_VAR_DIR", BASE_DIR / "var"))

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_str(name: str, default: str) -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    if raw.strip().lower() in _TRUE:
        return True
    if raw.strip().lower() in _FALSE:
        return False
    raise ImproperlyConfigured(f"{name} must be one of {sorted(_TRUE | _FALSE)}, got {raw!r}")


def env_int(name: str, default: int, *, minimum: int = 0) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ImproperlyConfigured(f"{name} must be at least {minimum}, got {value}")
    return value


def env_float(
    name: str, default: float, *, minimum: float = 0.0, maximum: float = math.inf
) -> float:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a number, got {raw!r}") from None
    if value < minimum:
        raise ImproperlyConfigured(f"{name} must be at least {minimum}, got {value}")
    if value > maximum:
        raise ImproperlyConfigured(f"{name} must be at most {maximum}, got {value}")
    return value


def env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = os.environ.get(name, default)
    if value not in choices:
        raise ImproperlyConfigured(f"{name} must be one of {choices}, got {value!r}")
    return value


def env_list(name: str, default: str = "") -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


def env_rate(name: str, default: str) -> str:
    """A DRF throttle rate such as `120/min`, checked now rather than on the first request."""
    value = env_str(name, default)
    count, _, unit = value.partition("/")
    if not count.isdigit() or unit not in ("s", "sec", "m", "min", "h", "hour", "d", "day"):
        raise ImproperlyConfigured(f"{name} must look like 120/min (per s, min, hour, day)")
    return value


def env_networks(name: str) -> tuple[str, ...]:
    """Comma-separated addresses or CIDR networks, checked now rather than on first use."""
    items = tuple(env_list(name))
    for item in items:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ImproperlyConfigured(f"{name}: {item!r} is not an address or network") from None
    return items


def database_from_url(url: str) -> dict[str, Any]:
    """`sqlite:///path` or `postgres://user:pw@host:port/name?opt=v` → DATABASES entry."""
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        path = unquote(parts.path)
        if not path or path == "/":
            raise ImproperlyConfigured(f"DATABASE_URL {url!r} names no SQLite file")
        # sqlite:///relative/file and sqlite:////abs/file, as dj-database-url reads them.
        name = path[1:]
        return {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": name if Path(name).is_absolute() else str(BASE_DIR / name),
            # SQLite serialises writers; a generous timeout lets the ledger flusher and the
            # admin share the file without "database is locked" errors.
            "OPTIONS": {"timeout": 20, "transaction_mode": "IMMEDIATE"},
            # A file, not memory, so that server processes started by the tests see the data;
            # one per test run, so that two runs on one checkout do not share it.
            "TEST": {"NAME": str(VAR_DIR / f"test-{os.getpid()}.sqlite3")},
        }
    if parts.scheme in ("postgres", "postgresql", "pgsql"):
        options: dict[str, Any] = dict(parse_qsl(parts.query))
        pool = env_bool("DATABASE_POOL", True)
        if pool:
            # Per process; a request holds a connection only while it runs its queries.
            options["pool"] = {
                "min_size": env_int("DATABASE_POOL_MIN_SIZE", 1),
                "max_size": env_int("DATABASE_POOL_MAX_SIZE", 20, minimum=1),
                "timeout": env_float("DATABASE_POOL_TIMEOUT", 10.0, minimum=0.1),
            }
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": unquote(parts.path.lstrip("/")) or "postgres",
            "USER": unquote(parts.username or ""),
            "PASSWORD": unquote(parts.password or ""),
            "HOST": parts.hostname or "",
            "PORT": str(parts.port or ""),
            # Django's ASGI handler runs every request in a new thread, and connections belong
            # to a thread: persistent connections are never reused there, the pool is.
            "CONN_MAX_AGE": 0 if pool else env_int("DATABASE_CONN_MAX_AGE", 60),
            "CONN_HEALTH_CHECKS": not pool,
            "OPTIONS": options,
        }
    raise ImproperlyConfigured(f"DATABASE_URL scheme {parts.scheme!r} is not sqlite or postgres")


DEBUG = env_bool("DEBUG", False)
# The development default is refused by accounts.checks when DEBUG is off.
DEVELOPMENT_SECRET_KEY = "dev-only-insecure-secret-key-change-me"
SECRET_KEY = env_str("SECRET_KEY", DEVELOPMENT_SECRET_KEY)
# Rotation (docs/operations.md): the new key in SECRET_KEY, the old one here until every
# session and signed link made with it has expired; comma-separated.
SECRET_KEY_FALLBACKS = env_list("SECRET_KEY_FALLBACKS")
# Never "*" by default: in development this machine's names, in production the operator's own
# (accounts.checks refuses to start without them). The API ignores Host; the admin, the pages and
# the websocket's origin check (telemetry/routing.py) do not.
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]" if DEBUG else "")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS")

# Behind a TLS-terminating proxy, HTTPS=1 switches on what `manage.py check --deploy` asks for;
# each part can be turned down on its own (README, "Settings").
HTTPS = env_bool("HTTPS", False)
if HTTPS:
    # The proxy tells us the client's scheme; it must set (not pass through) this header.
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", True)
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 365 * 24 * 3600)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", True)
    SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", True)
X_FRAME_OPTIONS = "DENY"

# Login throttling (django-axes) for the admin and every login page: after LOGIN_FAILURE_LIMIT
# wrong passwords for one username from one address, that pair is locked out for
# LOGIN_LOCKOUT_MINUTES (a correct password included). Client addresses are the ASGI server's:
# behind a proxy, uvicorn's --forwarded-allow-ips makes them the real ones.
AXES_FAILURE_LIMIT = env_int("LOGIN_FAILURE_LIMIT", 5, minimum=1)
AXES_COOLOFF_TIME = timedelta(minutes=env_int("LOGIN_LOCKOUT_MINUTES", 15, minimum=1))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_TEMPLATE = "accounts/lockout.html"
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    # intcomma: thousands separators on every page (token counts run into the millions).
    "django.contrib.humanize",
    "accounts.apps.LoginLockoutsConfig",  # django-axes, named for the admin
    "rest_framework",
    "drf_spectacular",
    # Swagger UI and Redoc as static files of a package: operators run behind firewalls.
    "drf_spectacular_sidecar",
    "channels",
    "accounts",
    "quotas",
    "gateway",
    "telemetry",
    "api",
    "portal",
]

MIDDLEWARE = [
    # First, so that every line logged for the request carries its id.
    "limiter_site.middleware.RequestIdMiddleware",
    "django.middleware.security.SecurityMiddleware",
    # Static files (the admin's CSS, Swagger UI) from the ASGI server itself, right after the
    # security headers and before anything that reads a session.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.locale.LocaleMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as django-axes requires: it turns a locked-out login into its lockout page.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "limiter_site.urls"
# The web pages' login (Django's own views and session; axes throttles it like the admin's).
# An SSO login (OIDC through a maintained library such as mozilla-django-oidc) would add its
# backend to AUTHENTICATION_BACKENDS and a button to templates/registration/login.html.
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "portal:usage"
LOGOUT_REDIRECT_URL = "login"
ASGI_APPLICATION = "limiter_site.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "django.template.context_processors.i18n",
            ],
        },
    },
]

DATABASE_URL = env_str("DATABASE_URL", f"sqlite:///{VAR_DIR / 'limiter.sqlite3'}")
DATABASES = {"default": database_from_url(DATABASE_URL)}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Unset: everything runs in one process (in-memory channel layer, eager Celery, in-process
# limiter). Set: Redis is shared by every gateway replica and worker.
REDIS_URL = env_str("REDIS_URL", "")

if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL]},
        }
    }
    CELERY_BROKER_URL = REDIS_URL
    CELERY_TASK_ALWAYS_EAGER = False
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    CELERY_BROKER_URL = "memory://"
    CELERY_TASK_ALWAYS_EAGER = True
CELERY_TASK_EAGER_PROPAGATES = True
# The console's live feed (/ws/stats/) re-checks its listener's session and staff status this
# often: a deactivated, demoted or logged-out staff member is cut off within this many seconds.
STATS_RECHECK_SECONDS = env_float("STATS_RECHECK_SECONDS", 30.0, minimum=1.0)
# Several deployments (or test runs) sharing one Redis keep their tasks apart by queue name.
CELERY_TASK_DEFAULT_QUEUE = env_str("CELERY_QUEUE", "celery")
# Without Redis there is no worker and no beat: the gateway process runs the beat schedule
# itself (gateway/embedded_beat.py). Tests turn it off and run tasks explicitly.
EMBEDDED_BEAT = env_bool("EMBEDDED_BEAT", True)
CELERY_TIMEZONE = "Asia/Seoul"
# Beat: SGLang telemetry every TELEMETRY_SCRAPE_SECONDS, usage roll-ups every minute, pruning
# of raw data past its retention hourly.
TELEMETRY_SCRAPE_SECONDS = env_float("TELEMETRY_SCRAPE_SECONDS", 5.0, minimum=0.5)
TELEMETRY_RETENTION_DAYS = env_int("TELEMETRY_RETENTION_DAYS", 14, minimum=1)
LEDGER_RETENTION_DAYS = env_int("LEDGER_RETENTION_DAYS", 90, minimum=1)
# The ledger's Redis stream (REDIS_URL set): gateways append, `drain_ledger` writes the database.
LEDGER_STREAM = env_str("LEDGER_STREAM", "ledger:events")
# A worker that took entries and died: after this long another worker writes them.
LEDGER_CLAIM_IDLE_SECONDS = env_float("LEDGER_CLAIM_IDLE_SECONDS", 30.0, minimum=0.1)
LEDGER_DRAIN_SECONDS = env_float("LEDGER_DRAIN_SECONDS", 1.0, minimum=0.1)
# Readiness warns when a usage event has waited longer than this to reach the database.
LEDGER_PENDING_WARNING_SECONDS = env_float("LEDGER_PENDING_WARNING_SECONDS", 60.0, minimum=1.0)
# Events in the stream must survive a Redis restart: "require" checks `appendonly yes`
# (CONFIG GET) at start and in readiness; "trust" is for a managed Redis that persists but
# hides CONFIG.
LEDGER_REDIS_PERSISTENCE = env_choice("LEDGER_REDIS_PERSISTENCE", "require", ("require", "trust"))
# Gateways keep what they shipped to the stream this long, and ship it again if Redis restarts
# meanwhile: the append-only file is written up to a second or two after Redis acknowledged.
LEDGER_SHIPPED_RETENTION_SECONDS = env_float("LEDGER_SHIPPED_RETENTION_SECONDS", 60.0, minimum=5.0)
# --- Quota alerts (quotas/alerts.py, telemetry/alerts.py) and the email that carries them -------
# Django's email settings; without DEBUG mail goes out by SMTP, with DEBUG it is printed.
EMAIL_BACKEND = env_str(
    "EMAIL_BACKEND",
    "django.core.mail.backends.console.EmailBackend"
    if DEBUG
    else "django.core.mail.backends.smtp.EmailBackend",
)
EMAIL_HOST = env_str("EMAIL_HOST", "localhost")
EMAIL_PORT = env_int("EMAIL_PORT", 25, minimum=1)
EMAIL_HOST_USER = env_str("EMAIL_HOST_USER", "")
EMAIL_HOST_PASSWORD = env_str("EMAIL_HOST_PASSWORD", "")
EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", False)
# A mail server that stops answering must not hold the alert check (and, in the quick start,
# the embedded beat) for long.
EMAIL_TIMEOUT = env_float("EMAIL_TIMEOUT", 10.0, minimum=0.1)
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL", "token-limiter@localhost")
# Where users open the portal, for the link in alert emails; empty leaves the link out.
PORTAL_BASE_URL = env_str("PORTAL_BASE_URL", "http://localhost:8080" if DEBUG else "").rstrip("/")
if PORTAL_BASE_URL and urlsplit(PORTAL_BASE_URL).scheme not in ("http", "https"):
    raise ImproperlyConfigured("PORTAL_BASE_URL must start with http:// or https://")
# Off: users may give a webhook URL, and the server would POST to whatever address they typed
# (an internal service included: a server-side request forgery risk). Turn on only where the
# workers' outbound traffic is restricted.
QUOTA_ALERT_WEBHOOKS = env_bool("QUOTA_ALERT_WEBHOOKS", False)
QUOTA_ALERT_CHECK_SECONDS = env_float("QUOTA_ALERT_CHECK_SECONDS", 60.0, minimum=5.0)
ESTIMATOR_REFIT_SECONDS = env_float("ESTIMATOR_REFIT_SECONDS", 3600.0, minimum=60.0)
CELERY_BEAT_SCHEDULE = {
    "check-quota-alerts": {
        "task": "telemetry.tasks.check_quota_alerts",
        "schedule": QUOTA_ALERT_CHECK_SECONDS,
        "options": {"expires": QUOTA_ALERT_CHECK_SECONDS * 0.9},
    },
    "drain-ledger": {"task": "quotas.tasks.drain_ledger", "schedule": LEDGER_DRAIN_SECONDS},
    "scrape-sglang": {
        "task": "telemetry.tasks.scrape_sglang",
        "schedule": TELEMETRY_SCRAPE_SECONDS,
    },
    # Queued runs older than the next one are dropped rather than piling up behind a slow one.
    "roll-up-usage": {
        "task": "telemetry.tasks.roll_up_usage",
        "schedule": 60.0,
        "options": {"expires": 55},
    },
    "prune": {"task": "telemetry.tasks.prune", "schedule": 3600.0},
    # The estimator of models without a tokenizer, corrected from what their upstream reported.
    "refit-estimators": {
        "task": "telemetry.tasks.refit_estimators",
        "schedule": ESTIMATOR_REFIT_SECONDS,
        "options": {"expires": ESTIMATOR_REFIT_SECONDS * 0.9},
    },
}

LANGUAGE_CODE = "ko"
LANGUAGES = [("ko", _("Korean")), ("en", _("English"))]
LOCALE_PATHS = [BASE_DIR / "locale"]
TIME_ZONE = "Asia/Seoul"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
# The container image collects the static files at build time into a read-only STATIC_ROOT
# outside LIMITER_VAR_DIR (a volume there would hide them).
STATIC_ROOT = Path(env_str("STATIC_ROOT", str(VAR_DIR / "static")))
# `collectstatic` fills STATIC_ROOT (deploy/quickstart.sh does); without it (a test run, a
# developer's server) WhiteNoise finds the files in the apps and packages themselves.
WHITENOISE_USE_FINDERS = env_bool("STATIC_FROM_APPS", True)


# --- The REST API (api/) ------------------------------------------------------------------------
# Clients authenticate with their API key or a session; operators with a staff session or an
# operator token. Errors in one JSON shape (api/errors.py). Throttled per user in the shared
# cache (Redis when REDIS_URL is set, so every replica counts together).
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "api.authentication.ApiKeyAuthentication",
        "api.authentication.OperatorTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["api.permissions.IsClient"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    "DEFAULT_THROTTLE_CLASSES": ["api.throttling.ApiUserThrottle"],
    "DEFAULT_THROTTLE_RATES": {
        "client": env_rate("API_THROTTLE_CLIENT", "120/min"),
        "operator": env_rate("API_THROTTLE_OPERATOR", "600/min"),
    },
    "DEFAULT_SCHEMA_CLASS": "api.schema.ApiAutoSchema",
    "EXCEPTION_HANDLER": "api.errors.exception_handler",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
    # `?format=csv` is our usage export's parameter, not DRF's renderer switch.
    "URL_FORMAT_OVERRIDE": None,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Korean SGLang Token Limiter API",
    "DESCRIPTION": _(
        "Usage, limits and keys for clients; users, plans, keys, models and usage for "
        "operators. The OpenAI-compatible endpoints (/v1/…) are documented by OpenAI's own "
        "reference; this is everything else. Errors: see the Error schema."
    ),
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SCHEMA_PATH_PREFIX": r"/api/v1",
    "COMPONENT_SPLIT_REQUEST": True,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "ENUM_NAME_OVERRIDES": {},
}

# --- The gateway (gateway/) -------------------------------------------------------------------
# Where SGLang (or the bundled simulator) listens; a model may name its own upstream in the admin.
# The server's root, as gateway.models.normalize_upstream_url makes a model's: a pasted
# OpenAI base URL (…/v1) would otherwise turn every request into /v1/v1/… (a 404).
SGLANG_URL = env_str("SGLANG_URL", "http://127.0.0.1:8000").rstrip("/").removesuffix("/v1")
GATEWAY_MAX_BODY_BYTES = env_int("GATEWAY_MAX_BODY_BYTES", 1024 * 1024, minimum=1024)
# A body that stops arriving (a Content-Length that lies, a stalled upload) is answered 408.
GATEWAY_BODY_TIMEOUT_SECONDS = env_float("GATEWAY_BODY_TIMEOUT_SECONDS", 15.0, minimum=0.1)
# The most one chat template render may take on a request's messages (tokenlimit/chat_templates.py):
# real templates take about 40 µs a message, so 2 s is 50,000 messages.
GATEWAY_TEMPLATE_BUDGET_SECONDS = env_float("GATEWAY_TEMPLATE_BUDGET_SECONDS", 2.0, minimum=0.05)
# Upper bound for `n` (choices per request): each one is generated and reserved separately.
GATEWAY_MAX_CHOICES = env_int("GATEWAY_MAX_CHOICES", 8, minimum=1)
# /metrics and /health/ready: a bearer token and/or client addresses (CIDR) allowed to read them.
GATEWAY_MONITORING_TOKEN = env_str("GATEWAY_MONITORING_TOKEN", "")
if GATEWAY_MONITORING_TOKEN and len(GATEWAY_MONITORING_TOKEN) < 24:
    raise ImproperlyConfigured("GATEWAY_MONITORING_TOKEN must be at least 24 characters long")
GATEWAY_MONITORING_ALLOWED_IPS = env_networks("GATEWAY_MONITORING_ALLOWED_IPS")
# A revoked key must stop working within 5 s, so cached key lookups live at most this long.
GATEWAY_KEY_CACHE_SECONDS = env_float("GATEWAY_KEY_CACHE_SECONDS", 4.0)
if GATEWAY_KEY_CACHE_SECONDS > 5:
    raise ImproperlyConfigured("GATEWAY_KEY_CACHE_SECONDS above 5 would let revoked keys live on")
GATEWAY_UPSTREAM_CONNECT_TIMEOUT = env_float("GATEWAY_UPSTREAM_CONNECT_TIMEOUT", 5.0, minimum=0.1)
# Longest silence tolerated between two bytes from the upstream (a slow first token included).
GATEWAY_UPSTREAM_READ_TIMEOUT = env_float("GATEWAY_UPSTREAM_READ_TIMEOUT", 300.0, minimum=0.1)
GATEWAY_UPSTREAM_POOL_SIZE = env_int("GATEWAY_UPSTREAM_POOL_SIZE", 1000, minimum=1)
# The tokenizer self-check (gateway/self_check.py): a few max_tokens=1 probes per model to its
# upstream at start-up, on every change of a model's counting settings, and this often.
GATEWAY_SELF_CHECK = env_bool("GATEWAY_SELF_CHECK", True)
GATEWAY_SELF_CHECK_SECONDS = env_float("GATEWAY_SELF_CHECK_SECONDS", 3600.0, minimum=10.0)
# Ledger rows are written in batches by a background thread, never on the request path.
GATEWAY_LEDGER_FLUSH_SECONDS = env_float("GATEWAY_LEDGER_FLUSH_SECONDS", 0.5, minimum=0.01)
GATEWAY_LEDGER_MAX_PENDING = env_int("GATEWAY_LEDGER_MAX_PENDING", 1_000_000, minimum=100)
# Usage events are spooled here (one file per process) until shipped: a crash loses none.
LEDGER_SPOOL_DIR = Path(env_str("LEDGER_SPOOL_DIR", str(VAR_DIR / "ledger-spool")))
# A stream's output so far is written ahead this often: what a gateway killed mid-stream bills.
GATEWAY_LEDGER_CHECKPOINT_SECONDS = env_float(
    "GATEWAY_LEDGER_CHECKPOINT_SECONDS", 2.0, minimum=0.05
)
# How often a gateway looks for spools of dead gateways on its host (and once at start).
GATEWAY_LEDGER_ADOPT_SECONDS = env_float("GATEWAY_LEDGER_ADOPT_SECONDS", 10.0, minimum=0.1)

# The fair queue of models with places upstream (gateway/scheduling.py): requests waiting per
# model at most (more get 503), and how often a waiting request asks for its turn.
GATEWAY_QUEUE_MAX_WAITING = env_int("GATEWAY_QUEUE_MAX_WAITING", 1000, minimum=1)
GATEWAY_QUEUE_POLL_SECONDS = env_float("GATEWAY_QUEUE_POLL_SECONDS", 0.02, minimum=0.001)
# Requests of one user on a model with places that may await their first token at once, per
# gateway (gateway/prefill_gate.py: a burst of long prompts must not hold up others' short
# ones); 0: no limit.
GATEWAY_QUEUE_PREFILLS_PER_USER = env_int("GATEWAY_QUEUE_PREFILLS_PER_USER", 2, minimum=0)
# How long the new requests of a user who already has one on a model with places may wait for
# other users' only requests there to get their first tokens (gateway/prefill_gate.py: an
# interactive prompt prefilled in a step of its own, not beside a long one); 0: off.
GATEWAY_QUEUE_FIRST_REQUEST_HOLD_SECONDS = env_float(
    "GATEWAY_QUEUE_FIRST_REQUEST_HOLD_SECONDS", 1.0, minimum=0.0, maximum=10.0
)
# As the servers' --schedule-low-priority-values-first: the queue then serves a plan's lower
# priority values first (SGLang's default, and this one's: higher first).
GATEWAY_QUEUE_LOW_PRIORITY_VALUES_FIRST = env_bool("GATEWAY_QUEUE_LOW_PRIORITY_VALUES_FIRST", False)
# How often a gateway reads the load of each server of a model with several (gateway/routing.py).
GATEWAY_ROUTING_POLL_SECONDS = env_float("GATEWAY_ROUTING_POLL_SECONDS", 1.0, minimum=0.05)
# The most of a model's places kept from any one user (gateway/scheduling.py): a place for each
# other user seen in the last minute, so their requests start while one user keeps it full.
GATEWAY_QUEUE_HEADROOM = env_float("GATEWAY_QUEUE_HEADROOM", 0.125, minimum=0.0, maximum=0.9)

# Per-user labels on the gateway's Prometheus series: off, as users are unbounded.
GATEWAY_METRICS_PER_USER = env_bool("GATEWAY_METRICS_PER_USER", False)

# --- Limits (tokenlimit/limiter*.py) -----------------------------------------------------------
# Calendar days for tokens-per-day start at midnight here.
LIMITER_TIME_ZONE = env_str("LIMITER_TIME_ZONE", "Asia/Seoul")
# Redis down: "closed" refuses with 503, "open" admits and logs. Decided within the timeout.
LIMITER_ON_REDIS_FAILURE = env_choice("LIMITER_ON_REDIS_FAILURE", "closed", ("closed", "open"))
# Redis unreachable (refused, reset, no route) fails at once or within the connect timeout; a
# Redis that answers slowly (a burst, a busy event loop) gets the longer reply timeout.
LIMITER_REDIS_CONNECT_TIMEOUT = env_float("LIMITER_REDIS_CONNECT_TIMEOUT", 0.5, minimum=0.01)
LIMITER_REDIS_REPLY_TIMEOUT = env_float("LIMITER_REDIS_REPLY_TIMEOUT", 2.0, minimum=0.01)
# Connections per gateway process; a burst beyond it waits for a free one (within the reply
# timeout) instead of failing.
LIMITER_REDIS_POOL_SIZE = env_int("LIMITER_REDIS_POOL_SIZE", 64, minimum=1)
# Lets several deployments (or test runs) share one Redis without sharing counters.
LIMITER_REDIS_PREFIX = env_str("LIMITER_REDIS_PREFIX", "lim")
# The limiter's state (the hot path: one script call a request) on a Redis of its own, e.g. a
# Redis Cluster (LIMITER_REDIS_CLUSTER=1; any node's URL, the others are discovered). A user's
# keys share one hash slot, so each call runs on one node. Default: REDIS_URL. The ledger
# stream, Celery's broker and the channel layer stay on REDIS_URL: Celery's Redis transport
# does not speak the cluster protocol.
LIMITER_REDIS_URL = env_str("LIMITER_REDIS_URL", "")
LIMITER_REDIS_CLUSTER = env_bool("LIMITER_REDIS_CLUSTER", False)
# The REST API's throttle counts live in this cache (api/throttling.py).
if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            # Shares the limiter's prefix: deployments (and test runs) on one Redis stay apart.
            "KEY_PREFIX": LIMITER_REDIS_PREFIX + ":cache",
            "TIMEOUT": 300,
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
# A reservation's lease: renewed every third of it while the request runs; a dead gateway's
# reservations and parallel slots are released when it runs out.
LIMITER_LEASE_SECONDS = env_float("LIMITER_LEASE_SECONDS", 60.0, minimum=1.0)
# Reserved for the completion when a request sets no max_tokens (capped by remaining context).
LIMITER_DEFAULT_MAX_TOKENS = env_int("LIMITER_DEFAULT_MAX_TOKENS", 4096, minimum=1)
# ...unless the user's windows allow less: then what they allow, down to this many tokens a
# choice (below it, a 429 with the time until that much is free), sent upstream as max_tokens.
LIMITER_MIN_COMPLETION_TOKENS = env_int("LIMITER_MIN_COMPLETION_TOKENS", 16, minimum=1)

# LOG_FORMAT=json: one JSON object a line (for Loki, Elasticsearch, CloudWatch…); plain for a
# terminal. Both carry the request id (the `x-request-id` answered to the client and kept in the
# ledger row) and are redacted: no API key, token or password reaches a log (tokenlimit/
# log_context.py).
LOG_FORMAT = env_choice("LOG_FORMAT", "plain", ("plain", "json"))
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"request_id": {"()": "tokenlimit.log_context.RequestIdFilter"}},
    "formatters": {
        "plain": {
            "()": "tokenlimit.log_context.PlainFormatter",
            "format": "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s",
        },
        "json": {
            "()": "tokenlimit.log_context.JsonFormatter",
            "format": "%(asctime)s %(levelname)s %(name)s %(request_id)s %(message)s",
        },
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": LOG_FORMAT,
            "filters": ["request_id"],
        }
    },
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {
        "django.db.backends": {"level": "INFO"},
        # The telemetry scraper's httpx client logs every request at INFO: three lines every
        # TELEMETRY_SCRAPE_SECONDS said nothing an operator needs (failures still log).
        "httpx": {"level": "WARNING"},
        "httpcore": {"level": "WARNING"},
        # uvicorn set up its own handlers before loading us; ours replace them, so that its
        # lines (start, stop, access) have the same format as every other.
        "uvicorn": {"handlers": ["console"], "level": "INFO", "propagate": False},
        "uvicorn.error": {"handlers": [], "propagate": True},
        "uvicorn.access": {"handlers": ["console"], "level": "INFO", "propagate": False},
    },
}
# Python's warnings too (a library's deprecation), rather than as raw lines on stderr.
logging.captureWarnings(True)
# Celery's worker and beat log through the configuration above instead of their own format.
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
