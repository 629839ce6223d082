"""The staff console (portal/console_views.py): included by portal/urls.py, names in "portal:"."""

from django.urls import path

from portal import console_views

urlpatterns = [path("", console_views.console, name="console")]
