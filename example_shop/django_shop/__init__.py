"""The example shop's Django entry point: a minimal project whose view starts the
order's transaction once its own database transaction has committed.

Run it from the project folder (``example_shop`` and ``celeryconfig`` must import)::

    python -m example_shop.django_shop.manage migrate
    python -m example_shop.django_shop.manage runserver

with a shop worker running (``celery -A example_shop.app worker -Q shop.orders,
shop.payments,shop.inventory,shop.notifications``). Settings: ``settings.py``.
"""
