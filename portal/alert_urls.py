"""Quota alerts (portal/alert_views.py): included by portal/urls.py, names in "portal:"."""

from django.urls import path

from portal import alert_views

urlpatterns = [path("", alert_views.alerts, name="alerts")]
