"""``rebase``, ``diff`` and ``convert``: make a COW file with another backing file, content or layout."""

from __future__ import annotations

import argparse

from .base import Bar, Command, Output, add_common, add_cow, add_no_lock, command_line, disk_size, plural


def _add_overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")


# -- rebase ------------------------------------------------------------------------
def _rebase_arguments(p: argparse.ArgumentParser) -> None:
    add_cow(p)
    p.add_argument("--backing", metavar="NEW", required=True, help="the new backing file")
    p.add_argument("--unsafe", action="store_true", help="rewrite the header only; do not compare the contents")
    p.add_argument("--old-backing", metavar="PATH", help="the current backing file, if not at its recorded path")
    add_no_lock(p, "write")
    add_common(p)


def cmd_rebase(args: argparse.Namespace, out: Output) -> int:
    """``ubdcow rebase``."""
    from ..rebase import rebase

    total = 0 if args.unsafe else disk_size(args.cow)
    with Bar(out, total, "rebase") as bar:
        result = rebase(
            args.cow,
            args.backing,
            unsafe=args.unsafe,
            old_backing=args.old_backing,
            lock=not args.no_lock,
            progress=bar.update,
        )
    n, d, f = result.copied_sectors, result.differing_sectors, result.filled_pages
    copied = ""
    if not result.unsafe:
        copied = f"; {plural(n, 'sector')} copied in to keep the content"
        if n != d:
            copied += f" (the whole 4 KiB pages around {plural(d, 'differing sector')})"
    if f:
        copied += f", {plural(f, 'mixed page')} made whole"
    return out.result(result, f"rebased {args.cow} onto {result.backing_file} (mtime {result.mtime}){copied}", args.cow)


REBASE = Command(
    "rebase",
    help="point a COW file at another backing file (--unsafe: fix an mtime mismatch)",
    description="Make COW use the backing file NEW. By default the virtual disk keeps its "
    "content: sectors that differ between the old and new backing are copied into "
    "the COW file first. With --unsafe only the header changes (the repair for "
    "'mtime mismatch' after a backing image was copied or touched).",
    arguments=_rebase_arguments,
    handler=cmd_rebase,
)


# -- diff --------------------------------------------------------------------------
def _diff_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", metavar="BASE", help="the original raw image (the new COW file's backing file)")
    p.add_argument("modified", metavar="MODIFIED", help="the modified image (raw or COW)")
    p.add_argument("-o", "--output", metavar="COW", required=True, help="the COW file to create")
    p.add_argument(
        "--modified-backing",
        metavar="PATH",
        help="if MODIFIED is a COW file: use this backing file instead of the one it records (only read)",
    )
    _add_overwrite(p)
    add_no_lock(p)
    add_common(p)


def cmd_diff(args: argparse.Namespace, out: Output) -> int:
    """``ubdcow diff``."""
    from ..diff import diff

    with Bar(out, disk_size(args.base), "diff") as bar:
        result = diff(
            args.base,
            args.modified,
            args.output,
            overwrite=args.overwrite,
            progress=bar.update,
            lock=not args.no_lock,
            modified_backing=args.modified_backing,
        )
    return out.result(
        result,
        f"wrote {result.output}: {result.pages} pages ({result.sectors} sectors) differ from {args.base} "
        f"({result.zero_sectors} sectors of them zeros, stored as holes)",
        args.modified,
        against=args.base,
    )


DIFF = Command(
    "diff",
    help="make a COW file on BASE holding the 4 KiB pages where MODIFIED differs (thin a full copy)",
    description="Create a v3 COW file on BASE whose virtual disk equals MODIFIED, holding only the 4 KiB pages "
    "that differ, whole (the Linux ubd driver misreads pages that mix COW and backing sectors); pages of zeros "
    "are stored as holes.",
    arguments=_diff_arguments,
    handler=cmd_diff,
    option_for=lambda key, file, args: "modified_backing" if key == "backing" else key,
)


# -- convert -----------------------------------------------------------------------
def _convert_arguments(p: argparse.ArgumentParser) -> None:
    add_cow(p)
    p.add_argument("-o", "--output", metavar="NEW", required=True, help="the COW file to write")
    p.add_argument("--layout", choices=["v1", "v2", "v3", "v3-broken"], default="v3", help="(default: v3)")
    p.add_argument(
        "--backing",
        metavar="PATH",
        help="the backing file to fill mixed pages from, if not at its recorded path (only read)",
    )
    _add_overwrite(p)
    add_no_lock(p)
    add_common(p)


def cmd_convert(args: argparse.Namespace, out: Output) -> int:
    """``ubdcow convert``."""
    from ..convert import convert

    with Bar(out, disk_size(args.cow), "convert") as bar:
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
            f"warning: {result.output}: {plural(n, 'mixed page')} carried over as "
            f"{'it is' if n == 1 else 'they are'} ({result.backing_problem}); the Linux ubd driver misreads "
            f"them; once the backing file matches, make them whole: {_repair_line(args, result.output)}",
            file=out.stderr,
        )
    filled = f", {result.filled_pages} mixed pages made whole" if result.filled_pages else ""
    return out.result(
        result,
        f"converted {args.cow} ({result.source_layout}) -> {result.output} ({result.layout}), "
        f"{result.sectors} written sectors carried over{filled}",
        args.cow,
    )


def _repair_line(args: argparse.Namespace, output: str) -> str:
    """``ubdcow check OUTPUT --repair``, with the backing file the user named (if any)."""
    return command_line("check", args, disk=output, carry=("backing",), set={"repair": True})


CONVERT = Command(
    "convert",
    help="rewrite a COW file in another layout (default v3)",
    description="Rewrite COW (v1, v2 or broken v3) as a new file of another layout, with the "
    "same content and set bits. The source is not changed.",
    arguments=_convert_arguments,
    handler=cmd_convert,
)
