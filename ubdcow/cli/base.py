"""What every command shares: output, sizes, the progress bar, errors, exit codes, common options.

The exit codes are described in :mod:`ubdcow.cli`. A command is a :class:`Command`
record (see ``COMMANDS`` in :mod:`ubdcow.cli.app`).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
from collections.abc import Callable, Sequence
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
        self.json = getattr(args, "json", False)
        self.quiet = getattr(args, "quiet", False)
        self.exact = getattr(args, "bytes", False)
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr

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
        print(json.dumps(obj, indent=2), file=self.stdout)

    def result(self, record: Record, text: str) -> None:
        """``record`` as JSON with ``--json``, else the one line ``text``."""
        if self.json:
            self.dump(record.as_dict())
        else:
            self.line(text)


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


# -- progress ------------------------------------------------------------------
def progress_bar(out: Output, total: int, desc: str) -> Any:
    """A tqdm bar on stderr when it is a terminal and not ``--quiet``; else None."""
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

    def __init__(self, out: Output, total: int, desc: str) -> None:
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


# -- errors --------------------------------------------------------------------
def report(exc: UbdCowError, out: Output, code: int = EXIT_ERROR) -> int:
    """Print an error as one line (plus a hint line) on stderr; return ``code``."""
    print(f"ubdcow: {exc}", file=out.stderr)
    if exc.hint:
        print(f"hint: {exc.hint}", file=out.stderr)
    return code


# -- options shared by the commands ---------------------------------------------
def add_cow(p: argparse.ArgumentParser, help: str = "the COW file") -> None:
    """The positional ``COW`` argument."""
    p.add_argument("cow", metavar="COW", help=help)


def add_cows(p: argparse.ArgumentParser, help: str = "the COW file (several may be given)") -> None:
    """One or more positional ``COW`` arguments (``args.cows``)."""
    p.add_argument("cows", metavar="COW", nargs="+", help=help)


#: ``--help`` epilog of the commands that take several COW files (see :func:`worst`)
SEVERAL_FILES = (
    "Several COW files may be given: each gets its own section (a JSON array with --json; one file gives the "
    "single object, as before), a file that cannot be read is reported on one line and the others are still "
    "processed, and the exit code is the worst of the files' codes"
)


def worst(codes: Sequence[int], order: Sequence[int] = (EXIT_OK, EXIT_ERROR)) -> int:
    """The worst exit code of ``codes``: the one latest in ``order`` (codes not in it count as worst)."""
    rank = {code: i for i, code in enumerate(order)}
    return max(codes, key=lambda c: rank.get(c, len(order)), default=EXIT_OK)


def error_record(path: str, exc: UbdCowError, code: int = EXIT_ERROR) -> dict[str, Any]:
    """What ``--json`` lists for a file that could not be processed among several."""
    return {"file": path, "error": str(exc), "hint": exc.hint, "exit_code": code}


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
    its exit code, ``as_json`` gives its exit code and JSON value. One path
    keeps the single-file behaviour: one JSON object, and an error raised.
    ``blank_lines``: a blank line between the sections (not for one-line results).
    """
    if len(paths) == 1:
        result = compute(paths[0])
        if out.json:
            code, value = as_json(result)
            out.dump(value)
            return code
        return show(result)
    codes: list[int] = []
    values: list[Any] = []
    shown = False
    for path in paths:
        try:
            result = compute(path)
        except UbdCowError as exc:
            codes.append(report(exc, out, error_code))
            values.append(error_record(path, exc, error_code))
            continue
        if out.json:
            code, value = as_json(result)
            values.append(value)
        else:
            if shown and blank_lines:
                out.line()  # a blank line between sections
            code = show(result)
            shown = True
        codes.append(code)
    if out.json:
        out.dump(values)
    return worst(codes, order)


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
