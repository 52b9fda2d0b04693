"""``python -m example_shop demo [--orders N] ...`` and ``python -m example_shop serve``."""

from __future__ import annotations

import sys

from example_shop import isolation

USAGE = (
    "usage: python -m example_shop demo [--orders N] [--concurrency N] [--help]\n"
    "       python -m example_shop serve [--port 5000] [--smtp-port 8025] [--help]"
)


def main(argv: list[str]) -> int:
    """Dispatch to the sub-command; 2 for an unknown one, as argparse does."""
    if argv and argv[0] == "serve":
        from example_shop import serve  # noqa: PLC0415  (imports Flask: only when asked)

        return serve.main(argv[1:])
    if not argv or argv[0] != "demo":
        print(USAGE, file=sys.stderr)
        return 2
    if not {"--no-worker", "-h", "--help"} & set(argv[1:]):
        isolation.isolate_run()  # before the app is configured: it reads the folder and queues
    from example_shop import demo  # noqa: PLC0415  (after the isolation, see above)

    return demo.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
