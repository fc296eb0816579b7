"""``get``: copy files and trees out of a disk's filesystem (``ubdcow.extract``), named as ``cp -a`` names them."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ..errors import UbdCowError
from ..fs.records import show
from .base import EXIT_ERROR, EXIT_OK, Bar, Command, Output, add_common, disk_record, plural, report
from .fsargs import add_fs_options, fs_exit_code

if TYPE_CHECKING:
    from ..extract import ExtractResult

#: how the summary line names each reason ``skipped`` counts: (singular, plural)
SKIPPED = {
    "owners": ("owner (not root)", "owners (not root)"),
    "devices": ("device node", "device nodes"),
    "fifos": ("FIFO", "FIFOs"),
    "sockets": ("socket", "sockets"),
    "xattrs": ("extended attribute", "extended attributes"),
    "setid_bits": ("suid/sgid bit (owner not kept)", "suid/sgid bits (owner not kept)"),
    "hard_links": ("hard link (copied as a file)", "hard links (copied as files)"),
}


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("disk", metavar="DISK", help="a COW file or a raw image")
    p.add_argument("paths", metavar="PATH", nargs="+", help="files or folders inside the filesystem")
    p.add_argument("-o", "--output", metavar="DEST", required=True, help="one PATH: the copy's name (or an existing "
                   "folder to copy it into); several: the folder that receives them (made if needed)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an existing file, link or empty folder")
    p.add_argument("--keep-going", action="store_true", help="leave out what cannot be read or made (each reported "
                   "on one line), keep the rest, exit code 1; by default nothing is kept after an error")  # fmt: skip
    add_fs_options(p)
    add_common(p)


def summary(result: ExtractResult, out: Output, disk: str) -> str:
    """``copied DISK:PATHS -> DEST: N files, ...`` and what was skipped."""
    parts = [plural(result.files, "file"), plural(result.dirs, "folder"), plural(result.symlinks, "symbolic link")]
    if result.hard_links:
        parts.append(plural(result.hard_links, "hard link"))
    if result.special:
        parts.append(f"{result.special} {'device node or FIFO' if result.special == 1 else 'device nodes and FIFOs'}")
    paths = ", ".join(show(p.encode("utf-8", "surrogateescape")) for p in result.paths)
    text = (
        f"copied {disk}:{paths} -> {result.output}: {', '.join(parts)}, {out.size(result.bytes)} in "
        f"{result.seconds:.2f} s"
    )
    skipped = [f"{n} {SKIPPED[k][n != 1]}" for k, n in result.skipped.items() if n]
    if skipped:
        text += f"; skipped: {', '.join(skipped)}"
    if result.errors:
        text += f"; left out after an error: {plural(result.errors, 'entry')}"
    return text


def cmd_get(args: argparse.Namespace, out: Output) -> int:
    """``ubdcow get``."""
    from ..extract import extract

    def problem(exc: UbdCowError) -> None:
        print(f"ubdcow: {exc}", file=out.stderr)

    with Bar(out, None, "get") as bar:
        try:
            result = extract(
                args.disk,
                args.paths,
                args.output,
                backing=args.backing,
                partition=args.partition,
                journal=not args.no_journal,
                overwrite=args.overwrite,
                keep_going=args.keep_going,
                progress=bar.update,
                onerror=problem,
            )
        except UbdCowError as exc:
            return report(exc, out, fs_exit_code(exc))
    code = EXIT_ERROR if result.errors else EXIT_OK
    if out.json:
        return out.document(disk_record(args.disk, result.as_dict()), code)
    out.line(summary(result, out, args.disk))
    return code


GET = Command(
    "get",
    help="copy files or folders out of a disk (a COW file or a raw image), like cp -a",
    description="Copy each PATH of the ext2/ext3/ext4 filesystem on DISK out to DEST, with modes, times, "
    "symbolic links (as links), hard links and extended attributes; as root also owners, device nodes and "
    "FIFOs (otherwise skipped and counted). Holes stay holes. Nothing is written outside DEST, and nothing is "
    "left after an error or a signal: the copy is built under a temporary name and renamed into place.",
    arguments=_arguments,
    handler=cmd_get,
    epilog="Naming is cp -a's: one PATH and a DEST that does not exist: DEST becomes the copy; an existing "
    "folder DEST receives each PATH under its name. Exit codes: 0 success, 1 an error (with --keep-going: "
    "entries were left out), 2 usage error or several partitions to choose from.",
)
