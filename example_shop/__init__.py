"""The example shop: placing an order across four services with celery-tx.

- ``services/``: the order, payment, inventory and notification services, each
  with its own database and its action and compensation as participants.
- ``checkout.py``: the transaction that places an order across them.
- ``app.py``: the Celery app and coordinator (``celery -A example_shop.app worker``).
- ``web.py``: the Flask entry point; ``django_shop/``: the Django one.
- ``demo.py``: ``python -m example_shop demo``, hundreds of orders and the
  shop's invariants checked afterwards.
"""
