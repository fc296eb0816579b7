"""The top-level parser, built from :data:`COMMANDS`, and the entry points :func:`main` and :func:`run`."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from .. import __version__, _signals
from ..errors import UbdCowError
from . import cat, change, changes, compact, compare, create, demo, du, get, inspect, ls, merge, mount, serve
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
    mount.MOUNT,
    mount.UMOUNT,
    du.DU,
    compact.COMPACT,
    ls.LS,
    cat.CAT,
    get.GET,
    changes.CHANGES,
    demo.DEMO,
)


class ArgumentError(Exception):
    """A usage error found by a parser (``parser``: the command's own, or the top-level one)."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser


class Parser(argparse.ArgumentParser):
    """ubdcow's parsers: a usage error raises :class:`ArgumentError` (``main`` prints it, and the JSON error
    document under ``--json``); ``commands`` holds each command's own parser (the top-level one only)."""

    commands: dict[str, argparse.ArgumentParser]

    def error(self, message: str) -> NoReturn:
        raise ArgumentError(self, message)


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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    parser.commands = {}
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.description, epilog=command.epilog)
        command.arguments(p)
        p.set_defaults(func=command.handler, error_code=command.error_code, option_for=command.option_for)
        parser.commands[command.name] = p
    return parser


def _usage_error(parser: argparse.ArgumentParser, message: str, as_json: bool) -> int:
    """argparse's usage lines (the command's own usage) on stderr; the JSON error document under ``--json``."""
    parser.print_usage(sys.stderr)
    print(f"{parser.prog}: error: {message}", file=sys.stderr)
    if as_json:
        print(json.dumps({"error": f"{parser.prog}: {message}", "hint": None, "exit_code": EXIT_USAGE}, indent=2))
    return EXIT_USAGE


def wants_json(argv: Sequence[str]) -> bool:
    """``--json`` among the options (before a ``--``)."""
    words = list(argv)
    return "--json" in (words[: words.index("--")] if "--" in words else words)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and not any(w.startswith("-") for w in extra) and args.command in argv:
            # a PATH after an option (``ls DISK --partition 2 /etc``): argparse gives an optional list of
            # positionals nothing once an option comes first, so parse the command's words intermixed
            words = argv[argv.index(args.command) + 1 :]
            with contextlib.suppress(TypeError):  # a parser that cannot be (none today)
                vars(args).update(vars(parser.commands[args.command].parse_intermixed_args(words)))
                extra = []
        if extra:  # an option no parser knew: the command's usage, not the top-level one
            parser.commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    except ArgumentError as exc:
        return _usage_error(exc.parser, str(exc), wants_json(argv))
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
    except UsageError as exc:
        return _usage_error(parser.commands[args.command], str(exc), out.json and not out.documented)
    except KeyboardInterrupt:
        _signals.undo_all()  # clean-ups the signal kept from starting
        return out.failure("interrupted", None, EXIT_INTERRUPTED)
    except Terminated:
        _signals.undo_all()
        return out.failure("terminated", None, EXIT_TERMINATED)
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_ERROR
    except OSError as exc:  # an error the library did not expect to wrap
        where = f"{exc.filename}: " if exc.filename else ""
        return out.failure(f"{where}{exc.strerror or exc}", None, EXIT_ERROR)
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
            message = f"internal error: {type(exc).__name__}: {exc}"
            print(f"ubdcow: {message} (set UBDCOW_DEBUG=1 for details)", file=sys.stderr)
            code = EXIT_INTERNAL
            if wants_json(sys.argv[1:]):  # the JSON document, unless the command had begun to write one
                print(json.dumps({"error": message, "hint": "set UBDCOW_DEBUG=1 for details", "exit_code": code}))
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
