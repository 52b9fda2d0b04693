"""URLs: ``POST /checkout`` and ``GET /checkout/<id>``."""

from __future__ import annotations

from django.urls import path

from example_shop.django_shop.checkout import views

urlpatterns = [
    path("checkout", views.checkout, name="checkout"),
    path("checkout/<int:checkout_id>", views.checkout_status, name="checkout-status"),
]
