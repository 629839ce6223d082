from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class PortalConfig(AppConfig):
    """The web pages: the end user's portal (usage, keys, request history, limits, alerts) and
    the staff's live console. Thin views over the other apps' services."""

    name = "portal"
    verbose_name = _("web pages")
