"""``cat``: files inside a disk's filesystem to stdout, streamed (1 MiB at a time, whatever the file's size)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import TextIO

from ..errors import FilesystemError, UbdCowError
from .base import EXIT_ERROR, EXIT_OK, Command, Output, report
from .fsargs import add_fs_options, fs_exit_code, open_filesystem

#: bytes read and written at once
CHUNK = 1 << 20


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("disk", metavar="DISK", help="a COW file or a raw image")
    p.add_argument("paths", metavar="PATH", nargs="+", help="files inside the filesystem (symbolic links followed "
                   "inside it); several are written one after the other")  # fmt: skip
    add_fs_options(p)
    p.add_argument("--json", action="store_true", help="print a JSON summary on stderr (stdout carries the bytes)")
    p.add_argument("-q", "--quiet", action="store_true", help="write nothing on stdout (read the files only)")


def _writer(stream: TextIO) -> Callable[[memoryview], object]:
    """Bytes straight to the stream's file descriptor (a stream without one, in tests: decoded)."""
    try:
        stream.flush()
        fd = stream.fileno()
    except (OSError, ValueError):
        return lambda view: stream.write(bytes(view).decode("utf-8", "surrogateescape"))

    def write_all(view: memoryview) -> None:
        while view:
            view = view[os.write(fd, view) :]

    return write_all


def cmd_cat(args: argparse.Namespace, out: Output) -> int:
    """``ubdcow cat``."""
    stdout = out.stdout
    out.stdout = out.stderr  # the bytes own stdout: the JSON document goes to stderr
    try:
        fs = open_filesystem(args, args.disk)
    except UbdCowError as exc:
        return report(exc, out, fs_exit_code(exc))
    errors: list[str] = []
    total = 0
    with fs:
        write = _writer(stdout)
        buf = memoryview(bytearray(CHUNK))
        for path in args.paths:
            try:
                with fs.open(os.fsencode(path)) as f:
                    while n := f.readinto(buf):
                        if not out.quiet:
                            write(buf[:n])
                        total += n
            except FilesystemError as exc:  # a folder, a missing path, a corrupt file: the next one goes on
                print(f"ubdcow: {exc}", file=out.stderr)
                errors.append(exc.message)
    code = EXIT_ERROR if errors else EXIT_OK
    return out.document({"disk": args.disk, "paths": args.paths, "bytes": total, "errors": errors}, code)


CAT = Command(
    "cat",
    help="write files inside a disk (a COW file or a raw image) to stdout",
    description="Write the content of each PATH of the ext2/ext3/ext4 filesystem on DISK to stdout, in the "
    "order given, streamed; the disk is only read. Holes read as zeros.",
    arguments=_arguments,
    handler=cmd_cat,
    epilog="A folder, a missing path or a file that is not a regular file gets one line on stderr and exit "
    "code 1; the other PATHs are still written. With --json the summary document goes to stderr. Exit codes: "
    "0 success, 1 an error, 2 usage error or several partitions to choose from.",
)
