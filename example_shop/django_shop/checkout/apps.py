"""The checkout app's configuration."""

from __future__ import annotations

from django.apps import AppConfig


class CheckoutConfig(AppConfig):
    """Checkout requests, and the view that turns each into the shop's order transaction."""

    name = "example_shop.django_shop.checkout"
    label = "checkout"
    verbose_name = "Shop checkout"
