"""The Celery app: `celery -A limiter_site worker` / `celery -A limiter_site beat`."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "limiter_site.settings")

app = Celery("limiter_site")
# Without REDIS_URL the settings make every task run eagerly in the calling process.
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
