"""The web pages: the end user's portal at the root, the staff console under console/."""

from django.urls import include, path

from portal import key_views, usage_views

app_name = "portal"

urlpatterns = [
    path("", usage_views.usage, name="usage"),
    path("usage.csv", usage_views.usage_csv, name="usage_csv"),
    path("requests/", usage_views.request_history, name="requests"),
    path("limits/", usage_views.limits_guide, name="limits"),
    path("keys/", key_views.keys, name="keys"),
    path("keys/<int:key_id>/revoke/", key_views.revoke_key, name="key_revoke"),
    path("alerts/", include("portal.alert_urls")),
    path("console/", include("portal.console_urls")),
]
