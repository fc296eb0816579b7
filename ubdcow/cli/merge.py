"""``merge``: flatten a COW file into a raw image (or stream it to stdout)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from .base import Bar, Command, Output, add_common, add_cow, add_no_lock

if TYPE_CHECKING:
    from ..merge import MergeResult


def _arguments(p: argparse.ArgumentParser) -> None:
    add_cow(p)
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
    p.add_argument(
        "--no-sparse",
        action="store_true",
        help="allocate every byte of the output (no holes, nothing shared with the backing or COW file)",
    )
    p.add_argument(
        "--no-reflink",
        action="store_true",
        help="copy every byte even where the filesystem could share extents with the backing and COW files "
        "(XFS with reflink, btrfs)",
    )
    add_no_lock(p)
    add_common(p)


def _merge(args: argparse.Namespace, output: str, bar: Bar) -> MergeResult:
    """Merge into ``output``, or stream to stdout when it is ``-``."""
    from ..merge import merge, stream

    if output == "-":
        sys.stdout.flush()
        return stream(
            args.cow,
            sys.stdout.fileno(),
            backing=args.backing,
            force=args.force,
            progress=bar.update,
            lock=not args.no_lock,
        )
    return merge(
        args.cow,
        output,
        backing=args.backing,
        force=args.force,
        overwrite=args.overwrite,
        sparse=not args.no_sparse,
        progress=bar.update,
        lock=not args.no_lock,
        reflink=not args.no_reflink,
    )


def cmd_merge(args: argparse.Namespace, out: Output) -> int:
    """``ubdcow merge``."""
    from ..format import read_header
    from ..merge import default_output

    output = args.output or default_output(args.cow)
    with Bar(out, read_header(args.cow).size, "merge") as bar:
        result = _merge(args, output, bar)
    if output == "-":
        out.stdout = out.stderr  # the image owns stdout
    shared = f", {out.size(result.shared_bytes)} shared (reflink)" if result.shared_bytes else ""
    return out.result(
        result,
        f"merged {args.cow} -> {result.output}: {out.size(result.size)} "
        f"({out.size(result.cow_bytes)} from the COW file, {out.size(result.backing_bytes)} from the "
        f"backing file; {out.size(result.hole_bytes)} left as holes{shared}) in {result.seconds:.2f} s",
        args.cow,
    )


MERGE = Command(
    "merge",
    help="flatten a COW file into a new raw image (like uml_moo, but safe)",
    description="Write the virtual disk of COW to a new raw image: byte-identical to what a "
    "guest reads, sparse, written to a temporary file and renamed into place. "
    "The backing file is only read.",
    arguments=_arguments,
    handler=cmd_merge,
)
