from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class ApiConfig(AppConfig):
    name = "api"
    verbose_name = _("REST API")

    def ready(self) -> None:
        # Registers the OpenAPI descriptions of our authentication classes (drf-spectacular
        # finds extensions by import).
        from api import schema  # noqa: F401
