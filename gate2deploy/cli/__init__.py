"""The `gate2deploy` command: one module per subcommand (Polygraphy's layout).

Each module in SUBCOMMANDS exposes `add_parser(subparsers)` and `run(args) -> int`. A
`UserError` anywhere becomes one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import UserError

SUBCOMMANDS = ["export", "info", "demo", "run", "profile", "build_engine", "sensai_prune"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gate2deploy", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"gate2deploy.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"gate2deploy.cli.{name}":
                continue  # subcommand not built in this checkout
            raise
        module.add_parser(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"gate2deploy {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"gate2deploy {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
