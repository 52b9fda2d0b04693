"""``python -m example_shop demo [--orders N] [--concurrency N]``."""

from __future__ import annotations

import sys

from example_shop import demo

USAGE = "usage: python -m example_shop demo [--orders N] [--concurrency N] [--help]"


def main(argv: list[str]) -> int:
    """Dispatch to the sub-command; 2 for an unknown one, as argparse does."""
    if not argv or argv[0] != "demo":
        print(USAGE, file=sys.stderr)
        return 2
    return demo.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
