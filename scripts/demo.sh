#!/usr/bin/env bash
# The demo: installs celery-tx and the example shop into .venv, then runs
# `python -m example_shop demo`: a few hundred concurrent orders across four
# services on the embedded default (no servers), a summary, and the shop's
# invariants checked. Arguments go to the demo (--orders N, --concurrency N, --help).
# Point CELERY_BROKER_URL, CELERY_TX_DATABASE_URL and SHOP_DATABASE_URL at
# Redis/RabbitMQ and PostgreSQL to run the same demo there.
source "$(dirname "$0")/_venv.sh" "shop,postgres,redis"
exec .venv/bin/python -m example_shop demo "$@"
