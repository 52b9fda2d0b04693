#!/usr/bin/env bash
# The test command: installs what the tests need into .venv, then runs ruff,
# mypy (strict on celery_tx/) and pytest. Extra arguments go to pytest.
source "$(dirname "$0")/_venv.sh" "test,dev,postgres,redis"
source scripts/_browser.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/python -m pytest --durations=15 "$@"
