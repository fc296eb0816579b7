"""``compare``: are two disks (COW files or raw images) the same, byte for byte?"""

from __future__ import annotations

import argparse

from .base import Bar, Command, Output, add_common, add_no_lock, disk_record, disk_size


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", metavar="A")
    p.add_argument("b", metavar="B")
    p.add_argument("--backing-a", metavar="PATH", help="backing file for A if it is a COW file")
    p.add_argument("--backing-b", metavar="PATH", help="backing file for B if it is a COW file")
    add_common(p)
    add_no_lock(p)


def cmd_compare(args: argparse.Namespace, out: Output) -> int:
    """``ubdcow compare``: exit 0 identical, 1 different."""
    from ..compare import compare

    total = min(disk_size(args.a), disk_size(args.b))
    with Bar(out, total, "compare") as bar:
        result = compare(
            args.a,
            args.b,
            backing_a=args.backing_a,
            backing_b=args.backing_b,
            progress=bar.update,
            lock=not args.no_lock,
        )
    code = 0 if result.identical else 1
    if out.json:
        return out.document(disk_record(args.a, result.as_dict(), against=args.b), code)
    if result.identical:
        out.line("identical")
    elif result.size_a != result.size_b and result.first_difference == min(result.size_a, result.size_b):
        out.line(f"differ: sizes {result.size_a} and {result.size_b}; identical up to the shorter one")
    else:
        out.line(f"differ: first difference at byte offset {result.first_difference}")
    return code


def _option_for(key: str, file: str | None, args: argparse.Namespace) -> str | None:
    """A fix's ``backing`` is the backing file of the disk at fault: A's or B's."""
    if key == "backing":
        return "backing_a" if file == args.a else "backing_b" if file == args.b else None
    return key


COMPARE = Command(
    "compare",
    help="compare the content of two disks (COW files or raw images)",
    description="Compare two virtual disks byte for byte; each may be a COW file or a raw "
    "image. Exit codes: 0 identical, 1 different, 2 error.",
    arguments=_arguments,
    handler=cmd_compare,
    error_code=2,
    option_for=_option_for,
)
