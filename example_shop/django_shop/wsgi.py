"""WSGI entry point: ``gunicorn example_shop.django_shop.wsgi`` from the project folder."""

from __future__ import annotations

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_shop.django_shop.settings")

application = get_wsgi_application()
