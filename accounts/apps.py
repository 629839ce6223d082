import axes.apps
from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class AccountsConfig(AppConfig):
    # The default of the two configs here: Django picks one automatically only if marked.
    default = True
    name = "accounts"
    verbose_name = _("Accounts and API keys")

    def ready(self) -> None:
        from accounts import checks  # noqa: F401  (registers the system checks)


class LoginLockoutsConfig(axes.apps.AppConfig):
    """django-axes under a name the admin can show in Korean (its own config has none, so the
    admin's menu read "AXES")."""

    verbose_name = _("Login lockouts")
