"""``info``, ``map`` and ``check``: look at a COW file (``check --repair`` aside, nothing is changed)."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from ..lock import describe_holder
from .base import EXIT_OK, Bar, Command, Output, add_common, add_cow, add_no_lock, disk_size, plural, when

if TYPE_CHECKING:
    from ..check import CheckReport


# -- info ------------------------------------------------------------------------
def _info_arguments(p: argparse.ArgumentParser) -> None:
    add_cow(p)
    p.add_argument("--backing", metavar="PATH", help="use this backing file instead of the recorded one")
    add_common(p)


def cmd_info(args: argparse.Namespace, out: Output) -> int:
    """``ubdcow info``."""
    from ..inspect import info

    facts = info(args.cow, backing=args.backing)
    if out.json:
        out.dump(facts)
        return EXIT_OK
    print_info(facts, out)
    return EXIT_OK


def _backing_status(b: dict[str, Any]) -> str:
    if b["exists"] and b["problem"] is None:
        return f"found at {b['path']}; size and mtime match"
    if b["exists"]:
        return f"found at {b['path']}, but: {b['problem']}"
    return f"PROBLEM: {b['problem']}"


def print_info(facts: dict[str, Any], out: Output) -> None:
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
        ("in use", f"yes, locked by {describe_holder(facts['locked_by'])}" if facts["in_use"] else "no"),
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
)


# -- map -------------------------------------------------------------------------
def _map_arguments(p: argparse.ArgumentParser) -> None:
    add_cow(p)
    p.add_argument("--backing", metavar="PATH", help="accepted for symmetry; map never reads the backing file")
    add_common(p)


def cmd_map(args: argparse.Namespace, out: Output) -> int:
    """``ubdcow map``."""
    from ..inspect import iter_map

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


MAP = Command(
    "map",
    help="show which source each range of the virtual disk comes from",
    description="List the virtual disk as coalesced extents: cow (data in the COW file), zero "
    "(written as zeros: a hole in the COW file) or backing (read from the backing "
    "file). Only the COW file is read.",
    arguments=_map_arguments,
    handler=cmd_map,
)


# -- check -----------------------------------------------------------------------
def _check_arguments(p: argparse.ArgumentParser) -> None:
    add_cow(p)
    p.add_argument("--backing", metavar="PATH", help="check against this backing file instead of the recorded one")
    p.add_argument(
        "--repair",
        action="store_true",
        help="first make every mixed page whole, in place, from the backing file (which must match; only read): "
        "the content stays the same",
    )
    add_no_lock(p, "write")
    add_common(p)


def cmd_check(args: argparse.Namespace, out: Output) -> int:
    """``ubdcow check``: exit 0 clean, 2 corrupt, 3 backing file mismatch."""
    from ..check import check

    with Bar(out, disk_size(args.cow), "check") as bar:
        report = check(args.cow, backing=args.backing, progress=bar.update, repair=args.repair, lock=not args.no_lock)
    if out.json:
        out.dump(report.as_dict())
        return report.exit_code
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
    _check_verdict(args.cow, report, out)
    return report.exit_code


def _check_verdict(cow: str, report: CheckReport, out: Output) -> None:
    warned = any(f.severity == "warning" for f in report.findings)
    verdict = {
        0: "clean" + (" (the warnings above do not make it corrupt)" if warned else ""),
        2: "corruption found",
        3: "the image is fine, but its backing file is missing or does not match: UML would refuse it",
    }[report.exit_code]
    out.line(f"{cow}: {verdict}")
    if report.exit_code == 3 and any(f.code == "backing-mtime" for f in report.findings):
        out.line(f"hint: if the backing file's content is unchanged: ubdcow rebase --unsafe {cow} --backing PATH")
    if report.mixed_pages:
        out.line(f"hint: make the mixed pages whole (the content stays the same): ubdcow check --repair {cow}")


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
)
