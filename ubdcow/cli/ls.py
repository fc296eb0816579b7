"""``ls``: the entries of folders inside a disk's filesystem, like ``ls -1``/``ls -l``, streamed and sorted.

Each folder is read whole, sorted by name (bytes), and its entries printed in that order, a subfolder's
content (``-R``) right after it: the output is sorted by path, name by name, while only the folders on
the current path are held (``FileSystem.walk(sort=True)``). ``--json`` writes its one document as it
goes (``entries`` one per line); problems met on the way (a missing PATH, a corrupt folder) are one
line each on stderr and in the document's ``errors``, and the listing goes on (exit 1).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import select
import stat as S
from collections.abc import Callable
from typing import TextIO

from .._signals import Terminated, deferred
from ..errors import FilesystemError, UbdCowError
from ..fs import FileStat, FileSystem
from ..fs.records import show
from .base import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_TERMINATED, Command, Output, report
from .fsargs import add_fs_options, fs_exit_code, open_filesystem

#: problems kept for the JSON document (all are printed on stderr)
ERRORS_KEPT = 1000
_ENCODE: Callable[[str], str] = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]
_UTC = _dt.timezone.utc


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("disk", metavar="DISK", help="a COW file or a raw image")
    p.add_argument("paths", metavar="PATH", nargs="*", help="paths inside the filesystem (default: /)")
    p.add_argument("-l", dest="long", action="store_true", help="a line like ls -l: mode, links, owner and group "
                   "(numbers), size (or major, minor), mtime (UTC), name, -> target")  # fmt: skip
    p.add_argument("-R", dest="recursive", action="store_true", help="every entry below each folder, by full path")
    p.add_argument("-a", dest="all", action="store_true", help="also names that begin with a dot")
    p.add_argument("-d", dest="directory", action="store_true", help="a folder PATH itself, not its content")
    add_fs_options(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON (one document, streamed)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")


def _when(ns: int) -> str:
    try:
        return _dt.datetime.fromtimestamp(ns // 1_000_000_000, _UTC).strftime("%Y-%m-%d %H:%M")
    except (OverflowError, OSError, ValueError):
        return str(ns // 1_000_000_000)


def long_line(st: FileStat, name: str) -> str:
    """``ls -l``'s columns, numbers for owner and group, the mtime in UTC."""
    size = f"{st.rdev[0]}, {st.rdev[1]}" if st.rdev is not None else str(st.size)
    target = f" -> {show(st.target)}" if st.target is not None else ""
    return (
        f"{S.filemode(st.st_mode)} {st.nlink:>3} {st.uid:>5} {st.gid:>5} {size:>10} {_when(st.mtime_ns)} {name}{target}"
    )


def json_entry(st: FileStat) -> str:
    """One entry of ``ls --json`` (names that are not UTF-8: surrogateescape, as ``os.fsdecode``)."""
    text = (
        f'{{"path": {_ENCODE(os.fsdecode(st.path))}, "type": "{st.type}", "mode": {st.mode}, "uid": {st.uid}, '
        f'"gid": {st.gid}, "size": {st.size}, "nlink": {st.nlink}, "mtime_ns": {st.mtime_ns}, "inode": {st.inode}'
    )
    if st.target is not None:
        text += f', "target": {_ENCODE(os.fsdecode(st.target))}'
    if st.rdev is not None:
        text += f', "rdev": [{st.rdev[0]}, {st.rdev[1]}]'
    return text + "}"


class _Writer:
    """Text to a stream's file descriptor in blocks, losing and repeating nothing when a signal comes: each
    write and the note of what it wrote are one deferred section (``ubdcow._signals``). To a pipe, a
    socket or a terminal, the wait for room is outside it (a signal ends it) and each write is at most
    ``PIPE_BUF`` bytes, which a pipe with room takes without blocking."""

    BLOCK = 1 << 16
    PIPE_BUF = 4096

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.fd: int | None = None
        self.waits = False
        try:
            stream.flush()
            self.fd = stream.fileno()
            mode = os.fstat(self.fd).st_mode
            self.waits = S.S_ISFIFO(mode) or S.S_ISSOCK(mode) or os.isatty(self.fd)
        except (OSError, ValueError):  # not a file (a StringIO in tests): written to as it is
            self.fd = None
        self.pieces: list[str] = []
        self.size = 0
        self.pending = b""

    def write(self, text: str) -> None:
        self.pieces.append(text)
        self.size += len(text)
        if self.size >= self.BLOCK:
            self.flush()

    def flush(self) -> None:
        with deferred():
            text, self.pieces, self.size = "".join(self.pieces), [], 0
            if self.fd is None:
                self.stream.write(text)
            else:
                self.pending += text.encode("utf-8", "surrogateescape")
        if self.fd is None:
            self.stream.flush()
            return
        while self.pending:
            if self.waits:
                select.select([], [self.fd], [])
            with deferred():
                n = os.write(self.fd, self.pending[: self.PIPE_BUF] if self.waits else self.pending)
                self.pending = self.pending[n:]


class _Document:
    """The ``--json`` document, written as it goes: ``disk``, ``entries`` (one a line), ``errors``, ``exit_code``."""

    def __init__(self, writer: _Writer, disk: str) -> None:
        self.writer = writer
        self.first = True
        writer.write(f'{{\n  "disk": {json.dumps(disk)},\n  "entries": [')

    def entry(self, st: FileStat) -> None:
        self.writer.write(("\n    " if self.first else ",\n    ") + json_entry(st))
        self.first = False

    def end(self, errors: list[str], code: int, error: str | None = None) -> None:
        body = ",\n".join(f"    {json.dumps(e)}" for e in errors)
        listed = f"[\n{body}\n  ]" if errors else "[]"
        tail = f',\n  "error": {json.dumps(error)},\n  "hint": null' if error is not None else ""
        close = "\n  ]" if not self.first else "]"
        self.writer.write(f'{close},\n  "errors": {listed}{tail},\n  "exit_code": {code}\n}}\n')
        self.writer.flush()


class _Listing:
    def __init__(self, args: argparse.Namespace, out: Output, fs: FileSystem) -> None:
        self.args = args
        self.out = out
        self.fs = fs
        self.errors: list[str] = []
        self.failed = False
        self.doc: _Document | None = None
        self.printed = False  # a line or a section was printed (a blank line before the next section)
        self.writer = _Writer(out.stdout)

    def problem(self, exc: FilesystemError) -> None:
        self.failed = True
        print(f"ubdcow: {exc}", file=self.out.stderr)
        if len(self.errors) < ERRORS_KEPT:
            self.errors.append(exc.message)

    def show(self, st: FileStat, name: bytes) -> None:
        if self.doc is not None:
            self.doc.entry(st)
        elif not self.out.quiet:
            text = show(name)
            self.writer.write((long_line(st, text) if self.args.long else text) + "\n")
            self.printed = True

    def visible(self, st: FileStat) -> bool:
        return self.args.all or not st.path.rsplit(b"/", 1)[-1].startswith(b".")

    def run(self) -> int:
        args = self.args
        if args.json:
            self.doc = _Document(self.writer, args.disk)
            self.out.documented = True
        try:
            operands = sorted((os.fsencode(p) for p in args.paths or ["/"]), key=lambda p: p.split(b"/"))
            stats: list[tuple[bytes, FileStat]] = []
            for path in operands:
                try:
                    stats.append((path, self.fs.stat(path)))
                except FilesystemError as exc:
                    self.problem(exc)
            several = len(operands) > 1
            for path, st in stats:  # like ls: the other entries first, then each folder's content
                if st.type != "dir" or args.directory:
                    self.show(st, path)
            for path, st in stats:
                if st.type == "dir" and not args.directory:
                    self.folder(path, several)
        except BaseException as exc:
            if isinstance(exc, BrokenPipeError):
                raise
            if self.doc is not None:
                code, text = _ending(exc)
                self.doc.end(self.errors, code, text)
            else:
                self.writer.flush()  # what was listed before it
            raise
        code = EXIT_ERROR if self.failed else EXIT_OK
        if self.doc is not None:
            self.doc.end(self.errors, code)
        self.writer.flush()
        return code

    def folder(self, path: bytes, header: bool) -> None:
        recursive = self.args.recursive
        if header and not recursive and self.doc is None and not self.out.quiet:
            self.writer.write(("\n" if self.printed else "") + f"{show(path)}:\n")
            self.printed = True
        walk = self.fs.walk(path, sort=True, onerror=self.problem,
                            descend=lambda st: recursive and self.visible(st))  # fmt: skip
        next(walk)  # the folder itself
        for st in walk:
            if self.visible(st):
                self.show(st, st.path if recursive else st.path.rsplit(b"/", 1)[-1])


def _ending(exc: BaseException) -> tuple[int, str]:
    """The exit code and error of a listing cut short (the document still ends and parses)."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted"
    if isinstance(exc, Terminated):
        return EXIT_TERMINATED, "terminated"
    return (fs_exit_code(exc) if isinstance(exc, UbdCowError) else EXIT_ERROR), str(exc)


def cmd_ls(args: argparse.Namespace, out: Output) -> int:
    """``ubdcow ls``."""
    try:
        fs = open_filesystem(args, args.disk)
    except UbdCowError as exc:
        return report(exc, out, fs_exit_code(exc))
    with fs:
        return _Listing(args, out, fs).run()


LS = Command(
    "ls",
    help="list the files inside a disk (a COW file or a raw image), like ls",
    description="List folders of the ext2/ext3/ext4 filesystem on DISK (a COW file with its backing file, or "
    "a raw image; a whole-disk filesystem or an MBR/GPT partition), sorted by path; the disk is only read. "
    "Owners and groups are the image's numbers (they mean nothing on this host). Names with control "
    "characters or bytes that are not UTF-8 are escaped (\\xNN); in --json they are surrogate escapes.",
    arguments=_arguments,
    handler=cmd_ls,
    epilog="A PATH that is a folder lists its content (-d: itself); a symbolic link is shown as a link (end it "
    "with / to list the folder it points to). Exit codes: 0 success, 1 an error (a missing PATH, a corrupt "
    "folder: reported, the listing goes on), 2 usage error or several partitions to choose from.",
)
