"""/api/v1/…: the REST API, its OpenAPI schema, and Swagger UI / Redoc (from the sidecar
package's static files, so they work behind a firewall)."""

from __future__ import annotations

from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView
from rest_framework.permissions import AllowAny
from rest_framework.routers import SimpleRouter

from api import client_views, operator_views

operator = SimpleRouter(trailing_slash=False)
operator.register("users", operator_views.UserViewSet, basename="operator-user")
operator.register("plans", operator_views.PlanViewSet, basename="operator-plan")
operator.register("keys", operator_views.KeyViewSet, basename="operator-key")
operator.register("models", operator_views.ServedModelViewSet, basename="operator-model")

# The schema and its viewers are public: they describe the API, not anyone's data.
docs = {"permission_classes": [AllowAny], "authentication_classes": [], "throttle_classes": []}

urlpatterns = [
    path("me", client_views.MeView.as_view(), name="api-me"),
    path("usage", client_views.UsageView.as_view(), name="api-usage"),
    path("requests", client_views.RequestListView.as_view(), name="api-requests"),
    path("keys", client_views.KeyListView.as_view(), name="api-keys"),
    path("keys/<int:pk>", client_views.KeyDetailView.as_view(), name="api-key"),
    path("keys/<int:pk>/revoke", client_views.KeyRevokeView.as_view(), name="api-key-revoke"),
    path("models", client_views.ModelListView.as_view(), name="api-models"),
    path("operator/", include(operator.urls)),
    path(
        "operator/users/<int:pk>/quota", operator_views.QuotaView.as_view(), name="operator-quota"
    ),
    path("operator/usage", operator_views.UsageView.as_view(), name="operator-usage"),
    path("operator/usage/top", operator_views.TopUsersView.as_view(), name="operator-top"),
    path("operator/upstreams", operator_views.UpstreamView.as_view(), name="operator-upstreams"),
    path("schema", SpectacularAPIView.as_view(**docs), name="api-schema"),
    path("docs", SpectacularSwaggerView.as_view(url_name="api-schema", **docs), name="api-docs"),
    path(
        "redoc",
        SpectacularRedocView.as_view(url_name="api-schema", template_name="api/redoc.html", **docs),
        name="api-redoc",
    ),
    # Anything else under /api/v1/ is a JSON 404, never Django's HTML page.
    re_path(r"^.*$", client_views.NotFoundView.as_view(), name="api-not-found"),
]
