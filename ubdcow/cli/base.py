"""What every command shares: output, sizes, the progress bar, errors, exit codes, common options.

The exit codes are described in :mod:`ubdcow.cli`. A command is a :class:`Command`
record (see ``COMMANDS`` in :mod:`ubdcow.cli.app`).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TextIO, TypeVar

from .._signals import Terminated as Terminated  # (raised on SIGTERM; here for the commands)
from ..errors import UbdCowError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143
EXIT_INTERNAL = 70

T = TypeVar("T")


class UsageError(Exception):
    """A command line the parser accepted but the command refuses (e.g. ``--bind`` without ``--port``): exit 2,
    with the command's usage, as argparse does."""


def human(n: int | None, exact: bool = False) -> str:
    """``1.5 MiB``, or the exact number with ``exact``."""
    if n is None:
        return "-"
    if exact or abs(n) < 1024:
        return f"{n} B" if not exact else str(n)
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        value /= 1024
        if abs(value) < 1024 or unit == "EiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def plural(n: int, word: str) -> str:
    """``1 page``, ``2 pages``."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def when(t: int | None) -> str:
    """A timestamp as ``SECONDS (YYYY-MM-DD HH:MM:SS UTC)``; ``-`` for None."""
    if t is None:
        return "-"
    try:
        stamp = _dt.datetime.fromtimestamp(t, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):
        return str(t)
    return f"{t} ({stamp})"


class Output:
    """Where a command writes: results to stdout, notes to stderr, nothing with ``--quiet``."""

    def __init__(self, args: argparse.Namespace, stdout: TextIO | None = None, stderr: TextIO | None = None) -> None:
        self.args = args
        self.json = getattr(args, "json", False)
        self.quiet = getattr(args, "quiet", False)
        self.exact = getattr(args, "bytes", False)
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        #: a JSON document was (or began to be) written: an error must not write a second one
        self.documented = False

    def size(self, n: int | None) -> str:
        """A size as ``--bytes`` asks: exact, or human."""
        return human(n, self.exact)

    def line(self, text: str = "") -> None:
        """One line on stdout, unless ``--quiet``."""
        if not self.quiet:
            print(text, file=self.stdout)

    def table(self, rows: Sequence[tuple[str, str]]) -> None:
        """``key: value`` lines, the values aligned."""
        width = max(len(k) for k, _ in rows) + 1
        for key, value in rows:
            self.line(f"{key + ':':<{width}} {value}")

    def dump(self, obj: Any) -> None:
        """``obj`` as indented JSON on stdout (even with ``--quiet``)."""
        print(indented_json(obj), file=self.stdout)
        self.documented = True

    def document(self, doc: dict[str, Any], code: int) -> int:
        """Under ``--json``: ``doc`` with its ``exit_code``, the one JSON document of the run; returns ``code``."""
        if self.json:
            self.dump({**doc, "exit_code": code})
        return code

    def result(self, record: Record, text: str, disk: str, code: int = 0, **inputs: str) -> int:
        """``record`` as the JSON document (see :func:`disk_record`) with ``--json``, else the one line ``text``."""
        if self.json:
            return self.document(disk_record(disk, record.as_dict(), **inputs), code)
        self.line(text)
        return code

    def failure(self, message: str, hint: str | None, code: int) -> int:
        """A failure: one line (and a hint line) on stderr, and under ``--json`` the error document on stdout
        (unless one was already written)."""
        print(f"ubdcow: {message}", file=self.stderr)
        if hint:
            print(f"hint: {hint}", file=self.stderr)
        if self.json and not self.documented:
            self.document({"error": message, "hint": hint}, code)
        return code


def indented_json(obj: Any) -> str:
    """``json.dumps(obj, indent=2)``, byte for byte, without the pure-Python encoder's generators (a lab's
    report has some 100,000 values); anything it does not know (or rejects) goes to ``json.dumps`` itself."""
    out: list[str] = []
    try:
        _encode(obj, "\n", out)
    except (TypeError, ValueError, RecursionError):
        return json.dumps(obj, indent=2)
    return "".join(out)


_ESCAPE: Callable[[str], str] = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]
_SCALARS: dict[type, Callable[[Any], str]] = {
    str: _ESCAPE,
    int: int.__repr__,
    bool: lambda o: "true" if o else "false",
    type(None): lambda o: "null",
}


def _encode(o: Any, nl: str, out: list[str]) -> None:
    """``o`` onto ``out`` as ``json.dumps(indent=2)`` writes it at the indentation of ``nl``."""
    scalar = _SCALARS.get(type(o))
    if scalar is not None:
        out.append(scalar(o))
    elif type(o) is float and o - o == 0:  # finite (NaN and infinities: json.dumps)
        out.append(float.__repr__(o))
    elif type(o) is dict and all(type(k) is str for k in o):
        if not o:
            out.append("{}")
            return
        inner, sep = nl + "  ", "{"
        for key, value in o.items():
            scalar = _SCALARS.get(type(value))  # (most values: written here, not by a call each)
            if scalar is not None:
                out.append(sep + inner + _ESCAPE(key) + ": " + scalar(value))
            else:
                out.append(sep + inner + _ESCAPE(key) + ": ")
                _encode(value, inner, out)
            sep = ","
        out.append(nl + "}")
    elif type(o) is list or type(o) is tuple:
        if not o:
            out.append("[]")
            return
        inner, sep = nl + "  ", "["
        for value in o:
            scalar = _SCALARS.get(type(value))
            if scalar is not None:
                out.append(sep + inner + scalar(value))
            else:
                out.append(sep + inner)
                _encode(value, inner, out)
            sep = ","
        out.append(nl + "]")
    else:
        raise TypeError(type(o))


class Record(Protocol):
    """A tool's result: :meth:`as_dict` is what ``--json`` prints."""

    def as_dict(self) -> dict[str, Any]: ...


Handler = Callable[[argparse.Namespace, Output], int]


@dataclass(frozen=True)
class Command:
    """A subcommand: what ``--help`` says of it, its arguments, and the handler that runs it."""

    name: str
    help: str
    description: str
    arguments: Callable[[argparse.ArgumentParser], None]
    handler: Handler
    error_code: int = EXIT_ERROR  # the exit code when the handler raises a UbdCowError
    epilog: str | None = None  # what ``--help`` prints after the options
    #: the option (its dest) that sets the library's keyword ``name`` in a :class:`~ubdcow.errors.Fix` of an error
    #: about ``file``, when it is not the keyword itself (``option_for(name, file, args)``; None: no such option)
    option_for: Callable[[str, str | None, argparse.Namespace], str | None] | None = None


# -- progress ------------------------------------------------------------------
def progress_bar(out: Output, total: int | None, desc: str) -> Any:
    """A tqdm bar on stderr when it is a terminal and not ``--quiet``; else None (``total`` None: no end known)."""
    if out.quiet or not out.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=out.stderr,
        leave=False,
        dynamic_ncols=True,
    )


class Bar:
    """A progress bar (see :func:`progress_bar`) usable as a context manager; ``update`` may be None."""

    def __init__(self, out: Output, total: int | None, desc: str) -> None:
        self.bar = progress_bar(out, total, desc)
        self.update: Callable[[int], Any] | None = self.bar.update if self.bar is not None else None

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def disk_size(path: str) -> int:
    """The virtual size of a COW file, or the size of a raw image (0 if unknown): a progress bar's total."""
    from ..format import read_header

    try:
        return read_header(path).size
    except UbdCowError:
        try:
            return os.stat(path).st_size
        except OSError:
            return 0


# -- JSON ------------------------------------------------------------------------
#: the keys the library's records use for their input file; the JSON documents call it ``disk`` (docs/cli.md)
INPUT_KEYS = ("file",)


def disk_record(disk: str, record: dict[str, Any], **inputs: str) -> dict[str, Any]:
    """A record about the input ``disk`` as JSON: ``disk`` first (plus other ``inputs``, e.g. ``against``),
    then the record's keys but its own name for the input."""
    return {"disk": disk, **inputs, **{k: v for k, v in record.items() if k not in INPUT_KEYS}}


def error_fields(disk: str, exc: UbdCowError, hint: str | None, code: int = EXIT_ERROR) -> dict[str, Any]:
    """``error`` (the problem, without the file name when it is ``disk``'s), ``hint``, ``exit_code``."""
    message = exc.message if exc.filename == disk else str(exc)
    return {"error": message, "hint": hint, "exit_code": code}


# -- hints: whole command lines, built from what the user gave ---------------------
def command_parser(name: str) -> argparse.ArgumentParser:
    """The parser of command ``name`` (the one ``ubdcow NAME`` uses)."""
    from .app import build_parser

    return build_parser().commands[name]


def command_line(
    name: str,
    args: argparse.Namespace | None = None,
    *,
    disk: str | None = None,
    carry: Iterable[str] | None = None,
    set: Mapping[str, object] | None = None,
) -> str:
    """``ubdcow NAME ...``: the command line that runs command ``name`` with the user's ``args`` (all of them,
    or for another command only the dests in ``carry``) and the options ``set`` (dest -> value; True: a flag).
    ``disk`` stands for the COW files of a command that takes several (a hint is about one of them)."""
    parser = command_parser(name)
    given = vars(args) if args is not None else {}
    values: dict[str, object] = {}
    for action in parser._actions:
        dest = action.dest
        if dest in (set or {}):
            values[dest] = (set or {})[dest]
        elif dest in given and (carry is None or dest in carry):
            values[dest] = given[dest]
        if dest == "cows" and disk is not None:
            values[dest] = [disk]
    words: list[str] = []
    options: list[str] = []
    for action in parser._actions:
        value = values.get(action.dest)
        if isinstance(action, argparse._HelpAction) or value is None or value is False:
            continue
        if not action.option_strings:
            words += [str(v) for v in value] if isinstance(value, list) else [str(value)]
        elif value != action.default:
            option = max(action.option_strings, key=len)
            if value is True:
                options.append(option)
            else:  # an option given several times (action="append") is given again once per value
                options += [w for v in (value if isinstance(value, list) else [value]) for w in (option, str(v))]
    if any(w.startswith("-") for w in words):  # a file named like an option: after --
        return shlex.join(["ubdcow", name, *options, "--", *words])
    return shlex.join(["ubdcow", name, *words, *options])


def render_hint(exc: UbdCowError, out: Output, disk: str | None = None) -> str | None:
    """The error's hint for the command that failed: each :class:`~ubdcow.errors.Fix` as the user's command line
    with its options set; a fix whose option this command lacks is left out."""
    args = out.args
    name = getattr(args, "command", None)
    if not exc.fixes or name is None:
        return exc.hint
    option_for: Callable[[str, str | None, argparse.Namespace], str | None] = getattr(args, "option_for", None) or (
        lambda key, _file, _args: key
    )
    dests = {a.dest for a in command_parser(name)._actions}
    parts = [exc.lead] if exc.lead else []
    for fix in exc.fixes:
        chosen: dict[str, object] = {}
        for key, value in fix.options:
            dest = option_for(key, exc.filename, args)
            if dest is None or dest not in dests:
                break
            chosen[dest] = True if value is None else value
        else:
            parts.append(f"{fix.why}: {command_line(name, args, disk=disk, set=chosen)}")
    return "; ".join(parts) or None


# -- errors --------------------------------------------------------------------
def report(exc: UbdCowError, out: Output, code: int = EXIT_ERROR) -> int:
    """Print an error as one line (plus a hint line) on stderr (and the JSON error document); return ``code``."""
    return out.failure(str(exc), render_hint(exc, out), code)


def report_line(exc: UbdCowError, out: Output, disk: str | None = None) -> str | None:
    """An error about one of several inputs (``disk``): its lines on stderr only (the JSON lists it among the
    others); returns the hint."""
    hint = render_hint(exc, out, disk)
    print(f"ubdcow: {exc}", file=out.stderr)
    if hint:
        print(f"hint: {hint}", file=out.stderr)
    return hint


# -- options shared by the commands ---------------------------------------------
def add_cow(p: argparse.ArgumentParser, help: str = "the COW file") -> None:
    """The positional ``COW`` argument."""
    p.add_argument("cow", metavar="COW", help=help)


def add_cows(p: argparse.ArgumentParser, help: str = "the COW file (several may be given)") -> None:
    """One or more positional ``COW`` arguments (``args.cows``)."""
    p.add_argument("cows", metavar="COW", nargs="+", help=help)


#: ``--help`` epilog of the commands that take several COW files (see :func:`worst`)
SEVERAL_FILES = (
    'Several COW files may be given: each gets its own section (with --json: {"disks": [one object per file], '
    '"exit_code": N}, the same shape for one file), a file that cannot be read is reported on one line and the '
    "others are still processed, and the exit code is the worst of the files' codes"
)


def worst(codes: Sequence[int], order: Sequence[int] = (EXIT_OK, EXIT_ERROR)) -> int:
    """The worst exit code of ``codes``: the one latest in ``order`` (codes not in it count as worst)."""
    rank = {code: i for i, code in enumerate(order)}
    return max(codes, key=lambda c: rank.get(c, len(order)), default=EXIT_OK)


def several(
    paths: Sequence[str],
    out: Output,
    compute: Callable[[str], T],
    show: Callable[[T], int],
    as_json: Callable[[T], tuple[int, Any]],
    *,
    error_code: int = EXIT_ERROR,
    order: Sequence[int] = (EXIT_OK, EXIT_ERROR),
    blank_lines: bool = True,
) -> int:
    """Run a command on each of ``paths``; the worst exit code (see :data:`SEVERAL_FILES`).

    ``compute`` makes a file's result, ``show`` prints it for humans and gives
    its exit code, ``as_json`` gives its exit code and JSON record (its
    input named as the library names it, ``file``). With ``--json`` the one
    document is ``{"disks": [...], "exit_code": worst}`` whatever the count.
    ``blank_lines``: a blank line between the sections (not for one-line results).
    """
    codes: list[int] = []
    values: list[dict[str, Any]] = []
    shown = False
    for path in paths:
        try:
            result = compute(path)
        except UbdCowError as exc:
            hint = report_line(exc, out, path)
            codes.append(error_code)
            values.append({"disk": path, **error_fields(path, exc, hint, error_code)})
            continue
        if out.json:
            code, value = as_json(result)
            values.append({**disk_record(path, value), "exit_code": code})
        else:
            if shown and blank_lines:
                out.line()  # a blank line between sections
            code = show(result)
            shown = True
        codes.append(code)
    return out.document({"disks": values}, worst(codes, order))


def add_no_lock(p: argparse.ArgumentParser, kind: str = "read") -> None:
    """``--no-lock``: skip the ``kind`` lock."""
    p.add_argument(
        "--no-lock",
        action="store_true",
        help=f"DANGEROUS: skip the {kind} lock that keeps a running guest out (you may copy or corrupt an image "
        "that is changing under you)",
    )


def add_common(p: argparse.ArgumentParser) -> None:
    """``--json``, ``--quiet`` and ``--bytes``, which every command takes."""
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("--bytes", action="store_true", help="show sizes as exact byte counts")
