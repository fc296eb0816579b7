"""The top-level parser, built from :data:`COMMANDS`, and the entry points :func:`main` and :func:`run`."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence

from .. import __version__
from ..errors import UbdCowError
from . import change, compact, compare, create, demo, du, inspect, merge, serve
from .base import (
    EXIT_ERROR,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    EXIT_USAGE,
    Command,
    Handler,
    Output,
    Terminated,
    UsageError,
    report,
)

# The subcommands, in the order ``--help`` lists them. A new command: a module with a Command, and a line here.
COMMANDS: tuple[Command, ...] = (
    inspect.INFO,
    create.CREATE,
    merge.MERGE,
    inspect.MAP,
    inspect.CHECK,
    compare.COMPARE,
    change.REBASE,
    change.DIFF,
    change.CONVERT,
    serve.SERVE,
    du.DU,
    compact.COMPACT,
    demo.DEMO,
)


class Parser(argparse.ArgumentParser):
    """The top-level parser; ``commands`` holds each command's own parser (its usage, its options)."""

    commands: dict[str, argparse.ArgumentParser]


def build_parser() -> Parser:
    """The ``ubdcow`` parser: one subparser a command of :data:`COMMANDS`."""
    parser = Parser(
        prog="ubdcow",
        description="Inspect, create and flatten User-Mode Linux copy-on-write (COW) block images.",
        epilog="Exit codes: 0 success, 1 error, 2 usage error, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM), "
        "70 internal error; check and compare have their own (see their --help); with several COW files, info, map, "
        "check and compact exit with the worst file's code. See docs/cli.md.",
    )
    parser.add_argument("--version", action="version", version=f"ubdcow {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=argparse.ArgumentParser)
    sub.required = True
    parser.commands = {}
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.description, epilog=command.epilog)
        command.arguments(p)
        p.set_defaults(func=command.handler, error_code=command.error_code)
        parser.commands[command.name] = p
    return parser


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Output(args)
    func: Handler = args.func
    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread
        pass
    try:
        return func(args, out)
    except UbdCowError as exc:
        return report(exc, out, args.error_code)
    except UsageError as exc:
        command = parser.commands[args.command]
        command.print_usage(sys.stderr)
        print(f"{command.prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("ubdcow: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print("ubdcow: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_ERROR
    except OSError as exc:  # an error the library did not expect to wrap
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"ubdcow: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _silence_stdout() -> None:
    # The reader went away: keep the interpreter from complaining at exit.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def run() -> None:
    """Console-script entry point."""
    if os.environ.get("UBDCOW_DEBUG"):
        sys.exit(main())
    try:
        code = main()
    except SystemExit:
        raise
    except Exception as exc:  # a bug: one line, not a traceback (UBDCOW_DEBUG=1 shows it)
        print(f"ubdcow: internal error: {type(exc).__name__}: {exc} (set UBDCOW_DEBUG=1 for details)", file=sys.stderr)
        code = EXIT_INTERNAL
    sys.exit(code)
