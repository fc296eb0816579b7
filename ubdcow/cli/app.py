"""The top-level parser, built from :data:`COMMANDS`, and the entry points :func:`main` and :func:`run`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .. import __version__, _signals
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


def build_parser() -> argparse.ArgumentParser:
    """The ``ubdcow`` parser: one subparser a command of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="ubdcow",
        description="Inspect, create and flatten User-Mode Linux copy-on-write (COW) block images.",
        epilog="Exit codes: 0 success, 1 error, 2 usage error, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM), "
        "70 internal error; check and compare have their own (see their --help); with several COW files, info, map, "
        "check and compact exit with the worst file's code. See docs/cli.md.",
    )
    parser.add_argument("--version", action="version", version=f"ubdcow {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.description, epilog=command.epilog)
        command.arguments(p)
        p.set_defaults(func=command.handler, error_code=command.error_code)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Output(args)
    func: Handler = args.func
    previous = None
    try:
        previous = _signals.install()  # SIGTERM raises Terminated, SIGINT KeyboardInterrupt (see _signals)
    except ValueError:  # not the main thread
        pass
    try:
        return func(args, out)
    except UbdCowError as exc:
        return report(exc, out, args.error_code)
    except KeyboardInterrupt:
        _signals.undo_all()  # clean-ups the signal kept from starting
        print("ubdcow: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        _signals.undo_all()
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
        _signals.undo_all()  # (nothing, unless an error cut a clean-up short)
        if previous is not None:
            _signals.restore(previous)


def _silence_stdout() -> None:
    # The reader went away: keep the interpreter from complaining at exit.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def run() -> None:
    """Console-script entry point.

    The signal handlers are ubdcow's from here to the exit: the first SIGTERM or SIGINT, wherever it lands,
    ends in 143 or 130 (the outer ``try``), and once the exit code is known later ones are ignored.
    """
    debug = bool(os.environ.get("UBDCOW_DEBUG"))
    try:
        try:
            _signals.install()
            code = main()
        except SystemExit as exc:  # argparse: --help, --version, usage errors
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USAGE)
            if isinstance(exc.code, str):
                print(exc.code, file=sys.stderr)
        except Exception as exc:  # a bug: one line, not a traceback (UBDCOW_DEBUG=1 shows it)
            if debug:
                raise
            print(
                f"ubdcow: internal error: {type(exc).__name__}: {exc} (set UBDCOW_DEBUG=1 for details)", file=sys.stderr
            )
            code = EXIT_INTERNAL
        _signals.ignore()
    except KeyboardInterrupt:  # the first signal came outside main's own handling
        _signals.undo_all()
        print("ubdcow: interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except Terminated:
        _signals.undo_all()
        print("ubdcow: terminated", file=sys.stderr)
        code = EXIT_TERMINATED
    sys.exit(code)
