"""Business failures: a rule of the shop said no. Each rolls the order back."""

from __future__ import annotations


class ShopRuleBroken(Exception):
    """A business rule refused the step (not a fault of the system)."""


class InvalidOrder(ShopRuleBroken):
    """The order itself is malformed: no items, a quantity below 1, and so on."""


class UnknownCustomer(ShopRuleBroken):
    """No account for this customer."""


class InsufficientFunds(ShopRuleBroken):
    """The customer's balance does not cover the order."""


class UnknownProduct(ShopRuleBroken):
    """No such SKU in the catalog."""


class OutOfStock(ShopRuleBroken):
    """Not enough units of a SKU left to reserve."""


class EmailRefused(ShopRuleBroken):
    """The mail server refused the customer's address."""
