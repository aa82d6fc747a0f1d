"""The `gate2deploy` command: one module per subcommand (Polygraphy's layout).

Each module in SUBCOMMANDS exposes `add_parser(subparsers)` and `run(args) -> int`. A
`UserError` anywhere becomes one line on stderr and exit code 2.

Decisions (issue 17):
- A usage error (unknown flag, missing argument) is one line too, with exit code 2 (argparse
  prints its usage block and then the error; the usage is one `--help` away).
- `sys.exit()` called by the user's model code (a `--model` builder, a module imported for
  it, a forward) does not end gate2deploy silently with that code: it is reported as an
  error naming the file and line that called it, exit code 2.
- SIGTERM is handled like Ctrl-C: the running step unwinds, so an output being written
  (fileio.atomic_path) removes its temporary file, and the process exits with 143
  (128 + SIGTERM) after one line.
"""
from __future__ import annotations

import argparse
import importlib
import signal
import sys
import traceback

from ..errors import UserError

SUBCOMMANDS = ["export", "info", "demo", "run", "profile", "build_engine", "sensai_prune"]


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every `finally` and cleanup runs."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (subparsers inherit the class)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _raise_terminated(signum, frame):
    raise Terminated()


def _exit_site(exc: SystemExit) -> str:
    """file:line of the innermost frame that raised the SystemExit (the caller of sys.exit)."""
    frames = traceback.extract_tb(exc.__traceback__)
    user = [f for f in frames if "/gate2deploy/" not in f.filename.replace("\\", "/")] or frames
    return f"{user[-1].filename}:{user[-1].lineno}" if user else "unknown place"


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="gate2deploy", description=__doc__.splitlines()[0])
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
    previous = None
    try:
        # Only the main thread may install handlers (main() can run inside a test's worker thread).
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:
        pass
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        # one line, whatever a path or a library's message carried (a file name may hold "\n")
        text = str(exc).replace("\r", "\\r").replace("\n", "\\n")
        print(f"gate2deploy {args.command}: error: {text}", file=sys.stderr)
        return exc.exit_code
    except SystemExit as exc:  # gate2deploy never calls sys.exit below main: the user's code did
        print(f"gate2deploy {args.command}: error: the model's code called sys.exit({exc.code!r}) at "
              f"{_exit_site(exc)}; gate2deploy stopped there", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gate2deploy {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"gate2deploy {args.command}: terminated (SIGTERM), nothing left half-written", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
