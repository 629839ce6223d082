"""Messages of Django and of third-party apps that our Korean catalogue translates, listed here so
that `makemessages` keeps them in locale/ko.

- "Select %s to view": Django's Korean reads "보기위한 1%s 를(을) 선택" (a stray "1"), the title
  of every read-only admin list (the ledger, the audit events).
- django-axes (login throttling) ships no Korean: its admin pages (access attempts, failures and
  logs) would stay English in the Korean admin.
"""

from django.utils.translation import gettext_noop

OVERRIDDEN = (gettext_noop("Select %s to view"),)

# django-axes: models (axes/models.py) and admin (axes/admin.py), as of django-axes 8.
AXES = (
    gettext_noop("access attempt"),
    gettext_noop("access attempts"),
    gettext_noop("access failure"),
    gettext_noop("access failures"),
    gettext_noop("access log"),
    gettext_noop("access logs"),
    gettext_noop("access attempt expiration"),
    gettext_noop("access attempt expirations"),
    gettext_noop("Access Attempt"),
    gettext_noop("Access lock out"),
    gettext_noop("Attempt Time"),
    gettext_noop("Attempt Remaining"),
    gettext_noop("Clean up expired attempts"),
    gettext_noop("Expires At"),
    gettext_noop("Failed Logins"),
    gettext_noop("Form Data"),
    gettext_noop("GET Data"),
    gettext_noop("HTTP Accept"),
    gettext_noop("IP Address"),
    gettext_noop("Locked Out"),
    gettext_noop("Logout Time"),
    gettext_noop("Meta Data"),
    gettext_noop("Not set"),
    gettext_noop("POST Data"),
    gettext_noop("Path"),
    gettext_noop("Session key hash (sha256)"),
    gettext_noop("The time when access attempt expires and is no longer valid."),
    gettext_noop("User Agent"),
    gettext_noop("Username"),
)
