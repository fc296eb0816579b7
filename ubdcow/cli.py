"""The command line: ``python -m ubdcow COMMAND ...`` (also installed as ``ubdcow``).

Exit codes: 0 success; 1 error (bad input, refused operation, I/O error);
2 usage error; 130 interrupted (Ctrl-C), 143 terminated (SIGTERM), 70 an
internal error (a bug). Commands with their own codes (``check``,
``compare``) document them in their help.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from . import __version__
from .errors import UbdCowError
from .lock import describe_holder

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM, so that cleanup code runs."""


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


def _when(t: int | None) -> str:
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
        return human(n, self.exact)

    def line(self, text: str = "") -> None:
        if not self.quiet:
            print(text, file=self.stdout)

    def table(self, rows: Sequence[tuple[str, str]]) -> None:
        width = max(len(k) for k, _ in rows) + 1
        for key, value in rows:
            self.line(f"{key + ':':<{width}} {value}")

    def dump(self, obj: Any) -> None:
        print(json.dumps(obj, indent=2), file=self.stdout)


# -- commands ----------------------------------------------------------------
def cmd_info(args: argparse.Namespace, out: Output) -> int:
    from .inspect import info

    facts = info(args.cow, backing=args.backing)
    if out.json:
        out.dump(facts)
        return EXIT_OK
    print_info(facts, out)
    return EXIT_OK


def print_info(facts: dict[str, Any], out: Output) -> None:
    """The human form of :func:`ubdcow.info`'s facts."""
    b = facts["backing"]
    order = f", {facts['byteorder']}-endian" if facts["layout"] == "v1" else ""
    if b["exists"] and b["problem"] is None:
        status = f"found at {b['path']}; size and mtime match"
    elif b["exists"]:
        status = f"found at {b['path']}, but: {b['problem']}"
    else:
        status = f"PROBLEM: {b['problem']}"
    share = 100.0 * facts["cow_bytes"] / facts["size"] if facts["size"] else 0.0
    rows = [
        ("file", facts["file"]),
        (
            "format",
            f"{facts['layout']} (version {facts['version']}{order}), sector size {facts['sectorsize']}, "
            f"alignment {facts['alignment']}",
        ),
        (
            "virtual size",
            f"{facts['size']} bytes ({facts['sectors']} sectors)"
            if out.exact
            else f"{out.size(facts['size'])} ({facts['size']} bytes, {facts['sectors']} sectors)",
        ),
        ("backing file", facts["backing_file"] or "(none recorded)"),
        ("backing status", status),
        ("recorded mtime", _when(facts["mtime"])),
    ]
    if b["exists"] and not b["mtime_matches"]:
        rows.append(("backing mtime", _when(b["mtime"])))
    if b["exists"] and not b["size_matches"]:
        rows.append(("backing size", f"{b['size']} bytes (header records {facts['size']})"))
    rows += [
        (
            "written (COW)",
            f"{facts['cow_sectors']} sectors, {out.size(facts['cow_bytes'])}{' bytes' if out.exact else ''} "
            f"({share:.1f}% of the disk)",
        ),
        (
            "bitmap",
            f"{facts['bitmap_len']} bytes at offset {facts['bitmap_offset']}; data area at offset "
            f"{facts['data_offset']}",
        ),
        (
            "file size",
            f"{out.size(facts['apparent_size'])} apparent, {out.size(facts['allocated_size'])} allocated on disk",
        ),
        ("in use", f"yes, locked by {describe_holder(facts['locked_by'])}" if facts["in_use"] else "no"),
    ]
    out.table(rows)
    if b["hint"] and not out.quiet:
        out.line(f"hint: {b['hint']}")


def cmd_create(args: argparse.Namespace, out: Output) -> int:
    from .create import create

    header = create(args.cow, args.backing, overwrite=args.force)
    if out.json:
        from .inspect import info

        out.dump(info(args.cow))
    else:
        out.line(
            f"created {args.cow}: {header.layout} COW file on {header.backing_file} ({out.size(header.size)} virtual)"
        )
    return EXIT_OK


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


def _disk_size(path: str) -> int:
    """The virtual size of a COW file, or the size of a raw image (0 if unknown): a progress bar's total."""
    from .format import read_header

    try:
        return read_header(path).size
    except UbdCowError:
        try:
            return os.stat(path).st_size
        except OSError:
            return 0


def cmd_merge(args: argparse.Namespace, out: Output) -> int:
    from .format import read_header
    from .merge import default_output, merge, stream

    output = args.output or default_output(args.cow)
    with Bar(out, read_header(args.cow).size, "merge") as bar:
        update = bar.update
        if output == "-":
            sys.stdout.flush()
            result = stream(
                args.cow,
                sys.stdout.fileno(),
                backing=args.backing,
                force=args.force,
                progress=update,
                lock=not args.no_lock,
            )
        else:
            result = merge(
                args.cow,
                output,
                backing=args.backing,
                force=args.force,
                overwrite=args.overwrite,
                sparse=not args.no_sparse,
                progress=update,
                lock=not args.no_lock,
            )
    if output == "-":
        out.stdout = out.stderr  # the image owns stdout
    if out.json:
        out.dump(result.as_dict())
    else:
        out.line(
            f"merged {args.cow} -> {result.output}: {out.size(result.size)} "
            f"({out.size(result.cow_bytes)} from the COW file, {out.size(result.backing_bytes)} from the "
            f"backing file; {out.size(result.hole_bytes)} left as holes) in {result.seconds:.2f} s"
        )
    return EXIT_OK


def cmd_map(args: argparse.Namespace, out: Output) -> int:
    from .inspect import iter_map

    extents = iter_map(args.cow)
    if out.json:
        # streamed: a fragmented 2 TiB image has millions of extents
        out.stdout.write("[")
        for i, e in enumerate(extents):
            out.stdout.write(("," if i else "") + "\n  " + json.dumps(e))
        out.stdout.write("\n]\n")
        return EXIT_OK
    totals = {"cow": 0, "zero": 0, "backing": 0}
    out.line(f"{'start':>16} {'length':>16} {'source':<8} {'offset':>16}")
    for e in extents:
        totals[e["source"]] += e["length"]
        out.line(f"{e['start']:>16} {e['length']:>16} {e['source']:<8} {e['offset']:>16}")
    out.line()
    out.line("totals: " + ", ".join(f"{out.size(n)} {name}" for name, n in totals.items()))
    return EXIT_OK


def cmd_check(args: argparse.Namespace, out: Output) -> int:
    from .check import check

    with Bar(out, _disk_size(args.cow), "check") as bar:
        report = check(args.cow, backing=args.backing, progress=bar.update, repair=args.repair, lock=not args.no_lock)
    if out.json:
        out.dump(report.as_dict())
        return report.exit_code
    if args.repair:
        n = report.repaired_pages
        out.line(f"repaired {n} mixed page{'' if n == 1 else 's'}" + (" (made whole, same content)" if n else ""))
    stats = report.stats
    if stats:
        share = 100.0 * stats["written_sectors"] / stats["sectors"] if stats["sectors"] else 0.0
        out.line(
            f"{stats['written_sectors']} of {stats['sectors']} sectors written ({share:.1f}%), "
            f"{stats['hole_sectors']} of them holes in the data area (discarded: they read as zeros)"
        )
    for f in report.findings:
        out.line(f"{f.severity}: {f.message} [{f.code}]")
    warned = any(f.severity == "warning" for f in report.findings)
    verdict = {
        0: "clean" + (" (the warnings above do not make it corrupt)" if warned else ""),
        2: "corruption found",
        3: "the image is fine, but its backing file is missing or does not match: UML would refuse it",
    }[report.exit_code]
    out.line(f"{args.cow}: {verdict}")
    if report.exit_code == 3 and any(f.code == "backing-mtime" for f in report.findings):
        out.line(f"hint: if the backing file's content is unchanged: ubdcow rebase --unsafe {args.cow} --backing PATH")
    if report.mixed_pages:
        out.line(f"hint: make the mixed pages whole (the content stays the same): ubdcow check --repair {args.cow}")
    return report.exit_code


def cmd_compare(args: argparse.Namespace, out: Output) -> int:
    from .compare import compare

    with Bar(out, min(_disk_size(args.a), _disk_size(args.b)), "compare") as bar:
        result = compare(
            args.a,
            args.b,
            backing_a=args.backing_a,
            backing_b=args.backing_b,
            progress=bar.update,
            lock=not args.no_lock,
        )
    if out.json:
        out.dump(result.as_dict())
    elif result.identical:
        out.line("identical")
    elif result.size_a != result.size_b and result.first_difference == min(result.size_a, result.size_b):
        out.line(f"differ: sizes {result.size_a} and {result.size_b}; identical up to the shorter one")
    else:
        out.line(f"differ: first difference at byte offset {result.first_difference}")
    return 0 if result.identical else 1


def cmd_rebase(args: argparse.Namespace, out: Output) -> int:
    from .rebase import rebase

    with Bar(out, 0 if args.unsafe else _disk_size(args.cow), "rebase") as bar:
        result = rebase(
            args.cow,
            args.backing,
            unsafe=args.unsafe,
            old_backing=args.old_backing,
            lock=not args.no_lock,
            progress=bar.update,
        )
    if out.json:
        out.dump(result.as_dict())
    else:
        n, f = result.copied_sectors, result.filled_pages
        copied = "" if result.unsafe else f"; {n} sector{'' if n == 1 else 's'} copied in to keep the content"
        if f:
            copied += f", {f} mixed page{'' if f == 1 else 's'} made whole"
        out.line(f"rebased {args.cow} onto {result.backing_file} (mtime {result.mtime}){copied}")
    return EXIT_OK


def cmd_diff(args: argparse.Namespace, out: Output) -> int:
    from .diff import diff

    with Bar(out, _disk_size(args.base), "diff") as bar:
        result = diff(
            args.base,
            args.modified,
            args.output,
            overwrite=args.overwrite,
            progress=bar.update,
            lock=not args.no_lock,
        )
    if out.json:
        out.dump(result.as_dict())
    else:
        out.line(
            f"wrote {result.output}: {result.pages} pages ({result.sectors} sectors) differ from {args.base} "
            f"({result.zero_sectors} sectors of them zeros, stored as holes)"
        )
    return EXIT_OK


def cmd_convert(args: argparse.Namespace, out: Output) -> int:
    from .convert import convert

    with Bar(out, _disk_size(args.cow), "convert") as bar:
        result = convert(
            args.cow,
            args.output,
            layout=args.layout,
            backing=args.backing,
            overwrite=args.overwrite,
            lock=not args.no_lock,
            progress=bar.update,
        )
    if result.mixed_pages:
        n = result.mixed_pages
        print(
            f"warning: {result.output}: {n} mixed page{'' if n == 1 else 's'} carried over as "
            f"{'it is' if n == 1 else 'they are'} ({result.backing_problem}); the Linux ubd driver misreads "
            f"them: fix with ubdcow check --repair {result.output} once the backing file matches",
            file=out.stderr,
        )
    if out.json:
        out.dump(result.as_dict())
    else:
        filled = f", {result.filled_pages} mixed pages made whole" if result.filled_pages else ""
        out.line(
            f"converted {args.cow} ({result.source_layout}) -> {result.output} ({result.layout}), "
            f"{result.sectors} written sectors carried over{filled}"
        )
    return EXIT_OK


def cmd_demo(args: argparse.Namespace, out: Output) -> int:
    from .demo import run_demo

    return run_demo(out, keep=args.keep)


# -- parser --------------------------------------------------------------------
def _no_lock(p: argparse.ArgumentParser, kind: str = "read") -> None:
    p.add_argument(
        "--no-lock",
        action="store_true",
        help=f"DANGEROUS: skip the {kind} lock that keeps a running guest out (you may copy or corrupt an image "
        "that is changing under you)",
    )


def _common(p: argparse.ArgumentParser, *, json_help: str = "print the result as JSON") -> None:
    p.add_argument("--json", action="store_true", help=json_help)
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("--bytes", action="store_true", help="show sizes as exact byte counts")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ubdcow",
        description="Inspect, create and flatten User-Mode Linux copy-on-write (COW) block images.",
        epilog="Exit codes: 0 success, 1 error, 2 usage error, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM), "
        "70 internal error; check and compare have their own (see their --help). See docs/cli.md.",
    )
    parser.add_argument("--version", action="version", version=f"ubdcow {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser(
        "info",
        help="show a COW file's header, backing file status and sizes",
        description="Show a COW file's header, backing file status, and apparent vs allocated size.",
    )
    p.add_argument("cow", metavar="COW", help="the COW file")
    p.add_argument("--backing", metavar="PATH", help="use this backing file instead of the recorded one")
    _common(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "create",
        help="create an empty COW file on a backing file (like uml_mkcow)",
        description="Create a v3 COW file on BACKING, as uml_mkcow does. The backing file is only read.",
    )
    p.add_argument("cow", metavar="COW", help="the COW file to create")
    p.add_argument("backing", metavar="BACKING", help="the backing file (recorded by absolute path)")
    p.add_argument(
        "-f",
        "--force",
        action="store_true",
        help="replace an existing COW file with a new, empty one (its old content is lost)",
    )
    _common(p)
    p.set_defaults(func=cmd_create)

    p = sub.add_parser(
        "merge",
        help="flatten a COW file into a new raw image (like uml_moo, but safe)",
        description="Write the virtual disk of COW to a new raw image: byte-identical to what a "
        "guest reads, sparse, written to a temporary file and renamed into place. "
        "The backing file is only read.",
    )
    p.add_argument("cow", metavar="COW", help="the COW file")
    p.add_argument(
        "-o",
        "--output",
        metavar="OUTPUT",
        help="the raw image to write (default: COW with its suffix replaced by .img); - streams every byte to "
        "stdout (no temporary file, so --overwrite and --no-sparse do not apply)",
    )
    p.add_argument("--backing", metavar="PATH", help="use this backing file instead of the recorded one")
    p.add_argument(
        "--force", action="store_true", help="merge even if the backing file's size or mtime differs from the header"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    p.add_argument("--no-sparse", action="store_true", help="allocate every byte of the output (no holes)")
    _no_lock(p)
    _common(p)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser(
        "map",
        help="show which source each range of the virtual disk comes from",
        description="List the virtual disk as coalesced extents: cow (data in the COW file), zero "
        "(written as zeros: a hole in the COW file) or backing (read from the backing "
        "file). Only the COW file is read.",
    )
    p.add_argument("cow", metavar="COW", help="the COW file")
    p.add_argument("--backing", metavar="PATH", help="accepted for symmetry; map never reads the backing file")
    _common(p)
    p.set_defaults(func=cmd_map)

    p = sub.add_parser(
        "check",
        help="check a COW file's consistency (exit 0 clean, 2 corrupt, 3 backing mismatch)",
        description="Check the header, the file length, the bitmap (stray bits, the v1/v2 rounding "
        "bug, mixed pages) and the backing file. Exit codes: 0 clean (warnings included), 1 the check "
        "could not run (or --repair was refused), 2 corruption found, 3 only a backing file mismatch "
        "(UML would refuse it).",
    )
    p.add_argument("cow", metavar="COW", help="the COW file")
    p.add_argument("--backing", metavar="PATH", help="check against this backing file instead of the recorded one")
    p.add_argument(
        "--repair",
        action="store_true",
        help="first make every mixed page whole, in place, from the backing file (which must match; only read): "
        "the content stays the same",
    )
    _no_lock(p, "write")
    _common(p)
    p.set_defaults(func=cmd_check, error_code=1)

    p = sub.add_parser(
        "compare",
        help="compare the content of two disks (COW files or raw images)",
        description="Compare two virtual disks byte for byte; each may be a COW file or a raw "
        "image. Exit codes: 0 identical, 1 different, 2 error.",
    )
    p.add_argument("a", metavar="A")
    p.add_argument("b", metavar="B")
    p.add_argument("--backing-a", metavar="PATH", help="backing file for A if it is a COW file")
    p.add_argument("--backing-b", metavar="PATH", help="backing file for B if it is a COW file")
    _common(p)
    _no_lock(p)
    p.set_defaults(func=cmd_compare, error_code=2)

    p = sub.add_parser(
        "rebase",
        help="point a COW file at another backing file (--unsafe: fix an mtime mismatch)",
        description="Make COW use the backing file NEW. By default the virtual disk keeps its "
        "content: sectors that differ between the old and new backing are copied into "
        "the COW file first. With --unsafe only the header changes (the repair for "
        "'mtime mismatch' after a backing image was copied or touched).",
    )
    p.add_argument("cow", metavar="COW", help="the COW file")
    p.add_argument("--backing", metavar="NEW", required=True, help="the new backing file")
    p.add_argument("--unsafe", action="store_true", help="rewrite the header only; do not compare the contents")
    p.add_argument("--old-backing", metavar="PATH", help="the current backing file, if not at its recorded path")
    _no_lock(p, "write")
    _common(p)
    p.set_defaults(func=cmd_rebase)

    p = sub.add_parser(
        "diff",
        help="make a COW file on BASE holding where MODIFIED differs (thin a full copy)",
        description="Create a v3 COW file on BASE whose virtual disk equals MODIFIED, holding only "
        "the sectors that differ (zeros as holes).",
    )
    p.add_argument("base", metavar="BASE", help="the original raw image (the new COW file's backing file)")
    p.add_argument("modified", metavar="MODIFIED", help="the modified image (raw or COW)")
    p.add_argument("-o", "--output", metavar="COW", required=True, help="the COW file to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    _no_lock(p)
    _common(p)
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser(
        "convert",
        help="rewrite a COW file in another layout (default v3)",
        description="Rewrite COW (v1, v2 or broken v3) as a new file of another layout, with the "
        "same content and set bits. The source is not changed.",
    )
    p.add_argument("cow", metavar="COW", help="the COW file")
    p.add_argument("-o", "--output", metavar="NEW", required=True, help="the COW file to write")
    p.add_argument("--layout", choices=["v1", "v2", "v3", "v3-broken"], default="v3", help="(default: v3)")
    p.add_argument(
        "--backing",
        metavar="PATH",
        help="the backing file to fill mixed pages from, if not at its recorded path (only read)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    _no_lock(p)
    _common(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "demo",
        help="a guided tour in a temporary folder",
        description="Build a small backing image and a COW file in a temporary folder and show "
        "what ubdcow does with them.",
    )
    p.add_argument("--keep", metavar="DIR", help="leave the files in DIR instead of a temporary folder")
    _common(p)
    p.set_defaults(func=cmd_demo)
    return parser


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Output(args)
    func: Callable[[argparse.Namespace, Output], int] = args.func
    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread
        pass
    try:
        return func(args, out)
    except UbdCowError as exc:
        return report(exc, out, getattr(args, "error_code", EXIT_ERROR))
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


def report(exc: UbdCowError, out: Output, code: int = EXIT_ERROR) -> int:
    """Print an error as one line (plus a hint line) on stderr; return ``code``."""
    print(f"ubdcow: {exc}", file=out.stderr)
    if exc.hint:
        print(f"hint: {exc.hint}", file=out.stderr)
    return code


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
        code = 70
    sys.exit(code)
