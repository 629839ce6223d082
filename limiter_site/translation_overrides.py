"""Messages of Django itself that our Korean catalogue translates again, because Django's own
Korean is wrong; listed here so that `makemessages` keeps them in locale/ko.

- "Select %s to view": Django's Korean reads "보기위한 1%s 를(을) 선택" (a stray "1"), the title
  of every read-only admin list (the ledger, the audit events).
"""

from django.utils.translation import gettext_noop

OVERRIDDEN = (gettext_noop("Select %s to view"),)
