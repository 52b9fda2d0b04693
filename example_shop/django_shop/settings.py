"""Django settings for the shop's Django entry point, read from the environment.

- ``DJANGO_SHOP_DATABASE``: the SQLite file for Django's own tables (the checkout
  requests). Default: ``django_shop.sqlite3`` in ``$CELERY_TX_DATA_DIR``
  (``./.celery_tx``), beside the embedded broker and journal.
- ``DJANGO_SHOP_SECRET_KEY``: required for any real deployment; the default is a
  development key, public in this file.
- ``DJANGO_SHOP_DEBUG``: ``1`` turns DEBUG on (off by default).
- ``DJANGO_SHOP_ALLOWED_HOSTS``: comma-separated host names (default: localhost).

The shop's services, the Celery broker and the celery-tx journal are configured
as for the workers (``example_shop/settings.py``, ``celeryconfig.py``): Django's
database holds only this entry point's own records.
"""

from __future__ import annotations

import os

from example_shop import settings as shop_settings

# DEVELOPMENT ONLY: this key is public. Set DJANGO_SHOP_SECRET_KEY in production.
# The "django-insecure-" prefix makes `manage.py check --deploy` flag it.
SECRET_KEY = os.environ.get(
    "DJANGO_SHOP_SECRET_KEY", "django-insecure-example-shop-dev-key-do-not-deploy"
)
DEBUG = os.environ.get("DJANGO_SHOP_DEBUG", "").lower() in ("1", "true", "yes")
ALLOWED_HOSTS = [
    host.strip()
    for host in os.environ.get("DJANGO_SHOP_ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]").split(",")
    if host.strip()
]

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "example_shop.django_shop.checkout",
]

# Django's defaults, minus sessions, auth and messages, which nothing here uses.
# CSRF protection stays on for any view added later; the JSON API opts out (views.py).
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "example_shop.django_shop.urls"
WSGI_APPLICATION = "example_shop.django_shop.wsgi.application"

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("DJANGO_SHOP_DATABASE")
        or str(shop_settings.data_dir() / "django_shop.sqlite3"),
        # Seconds to wait for SQLite's write lock: runserver serves requests from
        # several threads, and a writer must wait for another, not fail at once.
        "OPTIONS": {"timeout": 20},
    }
}
# Deliberately not ATOMIC_REQUESTS: the view opens its own transaction, so its
# on_commit callback (which starts the order) runs before the response is built.
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

USE_TZ = True
TIME_ZONE = "UTC"
USE_I18N = False
