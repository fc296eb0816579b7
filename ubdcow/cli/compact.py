"""``compact``: give space back in place, without changing what the disk reads."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from .base import (
    SEVERAL_FILES,
    Bar,
    Command,
    Output,
    add_common,
    add_cows,
    add_no_lock,
    command_line,
    disk_size,
    plural,
    several,
)

if TYPE_CHECKING:
    from ..compact import CompactResult


def _arguments(p: argparse.ArgumentParser) -> None:
    add_cows(p)
    p.add_argument("--dry-run", action="store_true", help="only report what would be reclaimed; change nothing")
    p.add_argument("--backing", metavar="PATH", help="use this backing file instead of the recorded one")
    add_no_lock(p, "write")
    add_common(p)


def summary(r: CompactResult, out: Output) -> str:
    """One line: allocated before and after, and the pages."""
    about = "about " if r.dry_run else ""
    would = "would be " if r.dry_run else ""
    parts = [
        f"{plural(r.pages_returned, 'page')} {'would return' if r.dry_run else 'returned'} to the backing file",
        f"{plural(r.pages_punched, 'page')} of zeros {would}punched",
        f"{plural(r.dead_pages, 'unused page')} {would}punched",
    ]
    if r.truncated_bytes:
        parts.append(f"{out.size(r.truncated_bytes)} past the data area {would}cut")
    return (
        f"{r.file}{' (dry run)' if r.dry_run else ''}: {out.size(r.allocated_before)} allocated before, "
        f"{about}{out.size(r.allocated_after)} after ({about}{out.size(r.reclaimed_bytes)} "
        f"{'reclaimable' if r.dry_run else 'reclaimed'}): " + ", ".join(parts)
    )


def cmd_compact(args: argparse.Namespace, out: Output) -> int:
    """``ubdcow compact COW ...``: exit 0, or 1 if a file was refused."""
    from ..compact import compact

    def run(path: str) -> CompactResult:
        with Bar(out, disk_size(path), "compact") as bar:
            return compact(path, backing=args.backing, dry_run=args.dry_run, lock=not args.no_lock, progress=bar.update)

    def show(r: CompactResult) -> int:
        out.line(summary(r, out))
        if r.mixed_pages:
            repair = command_line("check", args, disk=r.file, carry=("backing", "no_lock"), set={"repair": True})
            out.line(f"note: {plural(r.mixed_pages, 'mixed page')} left as they are; to make them whole: {repair}")
        return 0

    return several(args.cows, out, run, show, lambda r: (0, r.as_dict()), blank_lines=False)


COMPACT = Command(
    "compact",
    help="give space back in place: pages equal to the backing file's, pages of zeros",
    description="Give a COW file's space back without changing what the disk reads, under the write lock: a "
    "4 KiB page whose data equals the backing file's gets its bits cleared (made durable first) and then its "
    "data punched; a page of zeros is punched and keeps its bits (it reads as zeros); data under clear bits "
    "and past the end of the data area is freed. Needs the backing file the header records, with matching "
    "size and mtime (or --backing). Killed at any point, the disk reads the same.",
    arguments=_arguments,
    handler=cmd_compact,
    epilog=SEVERAL_FILES + ": 1 if any file was refused (locked, backing file missing or mismatched, a v1/v2 file "
    "with bits past its bitmap), else 0.",
)
