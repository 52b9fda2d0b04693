"""The Django side's own record of a checkout."""

from __future__ import annotations

from django.db import models

# The order service's column sizes (example_shop/services/orders.py): a request the
# order service could not store is refused here, before anything is saved.
CUSTOMER_ID_MAX_LENGTH = 64
EMAIL_MAX_LENGTH = 254


class CheckoutRequest(models.Model):
    """A checkout as this web app received it.

    ``order_id`` and ``transaction_id`` stay empty until the order's transaction
    was started, which happens only once the row is committed: a request whose
    Django transaction rolls back never starts one.
    """

    customer_id = models.CharField(max_length=CUSTOMER_ID_MAX_LENGTH)
    email = models.CharField(max_length=EMAIL_MAX_LENGTH)
    items = models.JSONField(help_text='[{"sku": str, "quantity": int}]')
    created_at = models.DateTimeField(auto_now_add=True)
    order_id = models.CharField(max_length=36, null=True, blank=True, unique=True)
    transaction_id = models.UUIDField(null=True, blank=True, unique=True)

    def __str__(self) -> str:
        return f"checkout {self.pk} by {self.customer_id} (order {self.order_id or 'not started'})"
