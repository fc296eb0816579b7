"""``info``, ``map`` and ``check``: look at a COW file (``check --repair`` aside, nothing is changed)."""

from __future__ import annotations

import argparse
import itertools
import json
import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ..errors import UbdCowError
from ..lock import describe_holder
from .base import (
    EXIT_ERROR,
    EXIT_OK,
    SEVERAL_FILES,
    Bar,
    Command,
    Output,
    add_common,
    add_cows,
    add_no_lock,
    command_line,
    disk_size,
    error_fields,
    plural,
    report_line,
    several,
    when,
    worst,
)

if TYPE_CHECKING:
    from ..check import CheckReport


# -- info ------------------------------------------------------------------------
def _info_arguments(p: argparse.ArgumentParser) -> None:
    add_cows(p)
    p.add_argument("--backing", metavar="PATH", help="use this backing file instead of the recorded one")
    add_common(p)


def cmd_info(args: argparse.Namespace, out: Output) -> int:
    """``ubdcow info COW ...``: exit 0, or 1 if a file could not be read."""
    from ..inspect import Info, info

    def show(facts: Info) -> int:
        print_info(facts, out)
        return EXIT_OK

    return several(
        args.cows, out, lambda path: info(path, backing=args.backing), show, lambda facts: (EXIT_OK, facts.to_dict())
    )


def _backing_status(b: dict[str, Any]) -> str:
    if b["exists"] and b["problem"] is None:
        return f"found at {b['path']}; size and mtime match"
    if b["exists"]:
        return f"found at {b['path']}, but: {b['problem']}"
    return f"PROBLEM: {b['problem']}"


def _in_use(facts: Mapping[str, Any]) -> str:
    if not facts["in_use"]:
        return "no"
    who = describe_holder(facts["locked_by"])
    if facts["lock"] == "read":
        return f"yes, read-locked by {who} (it only reads: commands that write the file are refused)"
    return f"yes, locked by {who}"


def print_info(facts: Mapping[str, Any], out: Output) -> None:
    """The human form of :func:`ubdcow.info`'s facts."""
    b = facts["backing"]
    order = f", {facts['byteorder']}-endian" if facts["layout"] == "v1" else ""
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
        ("backing status", _backing_status(b)),
    ]
    if b.get("resolved") and b["path"] and b["resolved"] != os.path.abspath(b["path"]):
        what = "the file ubdcow reads" if b["exists"] else "missing"
        rows.append(("resolves to", f"{b['resolved']} (through symbolic links: {what})"))
    rows += [
        ("recorded mtime", when(facts["mtime"])),
    ]
    if b["exists"] and not b["mtime_matches"]:
        rows.append(("backing mtime", when(b["mtime"])))
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
        ("in use", _in_use(facts)),
    ]
    out.table(rows)
    if b["hint"] and not out.quiet:
        out.line(f"hint: {b['hint']}")


INFO = Command(
    "info",
    help="show a COW file's header, backing file status and sizes",
    description="Show a COW file's header, backing file status, and apparent vs allocated size.",
    arguments=_info_arguments,
    handler=cmd_info,
    epilog=SEVERAL_FILES + ": 1 if any file could not be read, else 0.",
)


# -- map -------------------------------------------------------------------------
def _map_arguments(p: argparse.ArgumentParser) -> None:
    add_cows(p)
    p.add_argument("--backing", metavar="PATH", help="accepted for symmetry; map never reads the backing file")
    add_common(p)


def _dump_extents(extents: Iterable[dict[str, Any]], out: Output, indent: str = "") -> None:
    # streamed: a fragmented 2 TiB image has millions of extents (the caller closes the array)
    out.stdout.write("[")
    for i, e in enumerate(extents):
        out.stdout.write(("," if i else "") + "\n  " + indent + json.dumps(e))


def cmd_map(args: argparse.Namespace, out: Output) -> int:
    """``ubdcow map COW ...``: the JSON document is streamed (``{"disks": [{"disk", "extents", "exit_code"}]}``)."""
    from ..inspect import iter_map

    codes = []
    done = 0
    if out.json:
        out.stdout.write('{"disks": [')
        out.documented = True
    for path in args.cows:
        extents = iter_map(path)
        try:
            first = next(extents, None)  # opens the file: its errors come before any of its output
        except UbdCowError as exc:
            hint = report_line(exc, out, path)
            codes.append(EXIT_ERROR)
            if out.json:
                record = {"disk": path, **error_fields(path, exc, hint)}
                out.stdout.write(("," if done else "") + "\n  " + json.dumps(record))
                done += 1
            continue
        stream = itertools.chain([] if first is None else [first], extents)
        code = EXIT_OK
        try:
            if out.json:
                out.stdout.write(("," if done else "") + '\n  {"disk": ' + json.dumps(path) + ', "extents": ')
                try:
                    _dump_extents(stream, out, "  ")
                finally:  # an error while streaming: the document stays whole, the error in this disk's object
                    out.stdout.write("\n  ]")
            else:
                if len(args.cows) > 1:
                    if done:
                        out.line()
                    out.line(f"{path}:")
                _print_map(stream, out)
        except UbdCowError as exc:
            hint = report_line(exc, out, path)
            code = EXIT_ERROR
            if out.json:
                fields = error_fields(path, exc, hint)
                out.stdout.write(", " + json.dumps(fields)[1:-1] + "}")
        else:
            if out.json:
                out.stdout.write(', "exit_code": 0}')
        done += 1
        codes.append(code)
    code = worst(codes)
    if out.json:
        out.stdout.write(f'\n], "exit_code": {code}}}\n')
    return code


def _print_map(extents: Iterable[dict[str, Any]], out: Output) -> None:
    totals = {"cow": 0, "zero": 0, "backing": 0}
    out.line(f"{'start':>16} {'length':>16} {'source':<8} {'offset':>16}")
    for e in extents:
        totals[e["source"]] += e["length"]
        out.line(f"{e['start']:>16} {e['length']:>16} {e['source']:<8} {e['offset']:>16}")
    out.line()
    out.line("totals: " + ", ".join(f"{out.size(n)} {name}" for name, n in totals.items()))


MAP = Command(
    "map",
    help="show which source each range of the virtual disk comes from",
    description="List the virtual disk as coalesced extents: cow (data in the COW file), zero "
    "(written as zeros: a hole in the COW file) or backing (read from the backing "
    "file). Only the COW file is read.",
    arguments=_map_arguments,
    handler=cmd_map,
    epilog=SEVERAL_FILES + " (human output: a 'COW:' line before each table): 1 if any file could not be read.",
)


# -- check -----------------------------------------------------------------------
def _check_arguments(p: argparse.ArgumentParser) -> None:
    add_cows(p)
    p.add_argument("--backing", metavar="PATH", help="check against this backing file instead of the recorded one")
    p.add_argument(
        "--repair",
        action="store_true",
        help="first make every mixed page whole, in place, from the backing file (which must match; only read): "
        "the content stays the same",
    )
    add_no_lock(p, "write")
    add_common(p)


#: the exit codes of check, from best to worst: clean, backing mismatch, could not run, corrupt
CHECK_ORDER = (0, 3, 1, 2)


def cmd_check(args: argparse.Namespace, out: Output) -> int:
    """``ubdcow check COW ...``: exit 0 clean, 2 corrupt, 3 backing file mismatch; the worst of several."""
    from ..check import check

    def compute(path: str) -> CheckReport:
        with Bar(out, disk_size(path), "check") as bar:
            return check(path, backing=args.backing, progress=bar.update, repair=args.repair, lock=not args.no_lock)

    def show(report: CheckReport) -> int:
        _print_check(args, report, out)
        return report.exit_code

    return several(args.cows, out, compute, show, lambda r: (r.exit_code, r.as_dict()), error_code=1, order=CHECK_ORDER)


def _print_check(args: argparse.Namespace, report: CheckReport, out: Output) -> None:
    if args.repair:
        n = report.repaired_pages
        out.line(f"repaired {plural(n, 'mixed page')}" + (" (made whole, same content)" if n else ""))
    stats = report.stats
    if stats:
        share = 100.0 * stats["written_sectors"] / stats["sectors"] if stats["sectors"] else 0.0
        out.line(
            f"{stats['written_sectors']} of {stats['sectors']} sectors written ({share:.1f}%), "
            f"{stats['hole_sectors']} of them holes in the data area (discarded: they read as zeros)"
        )
    for f in report.findings:
        out.line(f"{f.severity}: {f.message} [{f.code}]")
    _check_verdict(args, report.file, report, out)


def _check_verdict(args: argparse.Namespace, cow: str, report: CheckReport, out: Output) -> None:
    warned = any(f.severity == "warning" for f in report.findings)
    verdict = {
        0: "clean" + (" (the warnings above do not make it corrupt)" if warned else ""),
        2: "corruption found",
        3: "the image is fine, but its backing file is missing or does not match: UML would refuse it",
    }[report.exit_code]
    out.line(f"{cow}: {verdict}")
    if report.exit_code == 3 and any(f.code == "backing-mtime" for f in report.findings):
        rebase = command_line(
            "rebase",
            args,
            carry=("backing", "no_lock"),
            set={"cow": cow, "unsafe": True, "backing": args.backing or "PATH"},
        )
        out.line(f"hint: if the backing file's content is unchanged: {rebase}")
    if report.mixed_pages:
        repair = command_line("check", args, disk=cow, set={"repair": True})
        out.line(f"hint: make the mixed pages whole (the content stays the same): {repair}")


CHECK = Command(
    "check",
    help="check a COW file's consistency (exit 0 clean, 2 corrupt, 3 backing mismatch)",
    description="Check the header, the file length, the bitmap (stray bits, the v1/v2 rounding "
    "bug, mixed pages) and the backing file. Exit codes: 0 clean (warnings included), 1 the check "
    "could not run (or --repair was refused), 2 corruption found, 3 only a backing file mismatch "
    "(UML would refuse it).",
    arguments=_check_arguments,
    handler=cmd_check,
    error_code=1,
    epilog=SEVERAL_FILES + ", from best to worst: 0 clean, 3 backing mismatch, 1 could not run, 2 corrupt.",
)
