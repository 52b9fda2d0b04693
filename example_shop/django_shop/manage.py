"""Django's command line for the shop: ``python -m example_shop.django_shop.manage <command>``.

Run from the project folder, so ``example_shop`` and ``celeryconfig`` import.
"""

from __future__ import annotations

import os
import sys

from django.core.management import execute_from_command_line


def main() -> None:
    """Run a Django management command with the shop's settings (unless others are set)."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_shop.django_shop.settings")
    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
