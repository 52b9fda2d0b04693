#!/usr/bin/env bash
# The demo: installs celery-tx into .venv and places a few orders in-process on
# the embedded default (a SQLite journal in this folder; no servers).
source "$(dirname "$0")/_venv.sh" "postgres"
exec .venv/bin/python examples/place_order.py "$@"
