"""``get``: copy files and trees out of a disk's filesystem, as ``cp -a`` copies from a read-only mount.

What it keeps: content (holes stay holes: only the data the block map holds is written, then the
file is truncated to its size), modes, access and modification times (nanoseconds; a folder's after
its content), symbolic links as links, hard links within the copied set, extended attributes where
the host allows them (``user.*`` and POSIX ACLs always, ``trusted.*`` and ``security.*`` as root), and
as root owners, device nodes and FIFOs. What it skips, counted in ``ExtractResult.skipped``: owners,
devices and FIFOs when not root, sockets always, attributes the host refuses, the suid/sgid bits of
entries whose owner was not kept (as ``cp -a`` drops them), hard links the host refused (the file is
then copied again).

Where it writes: only below the destination. Names are data: every entry is made by a call relative
to its folder's descriptor (``mkdirat``, ``openat(O_CREAT|O_EXCL|O_NOFOLLOW)``, ``symlinkat``,
``mknodat``, ``linkat``), folders are opened with ``O_NOFOLLOW``, names that no directory may hold
(empty, ``.``, ``..``, with ``/`` or NUL) are refused, a name the image holds twice is an error, and
no symbolic link of the image is ever resolved on the host. Files are read by inode (the walk's
``FileStat``), never by looking their path up again.

All or nothing: the copy is built under a temporary name (``.NAME.PID.XXXX.ubdcow-tmp``) beside its
final place, private to its owner (0700) while it is built, and renamed into place when complete; an
error or a signal removes it (``ubdcow._signals``). ``keep_going`` instead reports each entry that
cannot be read or made, leaves it out, and still renames the rest into place.

This module plans the copies (where each goes, what it may replace), walks the trees and moves the
copies into place; :mod:`ubdcow._entrywriter` makes each entry and sets its metadata.
"""

from __future__ import annotations

import os
import secrets
import stat as S
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from ._atomic import TMP_SUFFIX, current_umask
from ._entrywriter import BAD_NAMES, SKIP_REASONS, Counts, EntryWriter, Problem, Top, checked
from ._hosttree import exists, remove_stale, remove_tree, rename_noreplace, replace
from ._result import Result
from ._signals import deferred, register, release
from .errors import FilesystemError, Fix, ImageIOError, OutputError, UbdCowError
from .fs import FileStat, FileSystem, open_fs
from .fs.records import PathLike, join, show, to_bytes

__all__ = ["ExtractResult", "extract", "SKIP_REASONS"]

T = TypeVar("T")


@dataclass(frozen=True)
class ExtractResult(Result):
    """What a ``get`` copied (see the module docstring). ``bytes``: content written (holes not counted);
    ``special``: device nodes and FIFOs made; ``errors``: entries left out (``keep_going``)."""

    output: str
    paths: list[str]
    files: int
    dirs: int
    symlinks: int
    hard_links: int
    special: int
    bytes: int
    skipped: dict[str, int]
    errors: int
    seconds: float


@dataclass
class _Dir:
    """A folder being filled: its stat, its descriptor, its path from the copy's top, its mode mask."""

    stat: FileStat
    fd: int
    rel: bytes
    mask: int


@dataclass
class _Place:
    """Where one top-level copy goes: ``name`` in the folder ``parent_fd`` (``display``: its path), built
    under ``temp`` first; ``replace``: an existing entry there may be replaced; ``folder``: a new folder
    that receives several copies (``fd``: it, open)."""

    parent_fd: int
    name: bytes
    temp: bytes
    display: bytes
    replace: bool = False
    folder: bool = False
    fd: int = -1
    committed: bool = False


def extract(
    source: FileSystem | str | os.PathLike[str],
    paths: Sequence[PathLike] | PathLike,
    dest: str | os.PathLike[str],
    *,
    backing: str | os.PathLike[str] | None = None,
    partition: int | None = None,
    journal: bool = True,
    overwrite: bool = False,
    keep_going: bool = False,
    progress: Callable[[int], object] | None = None,
    onerror: Callable[[UbdCowError], object] | None = None,
) -> ExtractResult:
    """Copy ``paths`` (inside the filesystem) out of ``source`` (a disk, opened with ``backing``,
    ``partition`` and ``journal`` as for :func:`ubdcow.open_fs`, or an open :class:`FileSystem`) to ``dest``.

    Naming is ``cp -a``'s: one path and a ``dest`` that does not exist: ``dest`` becomes the copy; a
    ``dest`` folder that exists receives each path under its last name (several paths: ``dest`` is such a
    folder, made if needed). An existing entry is replaced only with ``overwrite``, and only a file, a
    link or an empty folder (never one of the disk's own files). ``progress`` gets the bytes copied as
    they go; ``onerror`` each problem ``keep_going`` skips. See the module docstring.
    """
    t0 = time.monotonic()
    if isinstance(source, FileSystem):
        return _Extraction(source, overwrite, keep_going, progress, onerror).run(paths, dest, t0)
    with open_fs(source, backing=backing, partition=partition, journal=journal) as fs:
        return _Extraction(fs, overwrite, keep_going, progress, onerror).run(paths, dest, t0)


class _Extraction:
    def __init__(
        self,
        fs: FileSystem,
        overwrite: bool,
        keep_going: bool,
        progress: Callable[[int], object] | None,
        onerror: Callable[[UbdCowError], object] | None,
    ) -> None:
        self.fs = fs
        self.overwrite = overwrite
        self.keep_going = keep_going
        self.onerror = onerror
        self.counts = Counts()
        self.writer = EntryWriter(fs, self.counts, progress)
        self.places: list[_Place] = []
        self.enter = True  # whether the walk may enter the folder it yielded last (it could be made)

    # -- the plan ----------------------------------------------------------------------------------

    def run(self, paths: Sequence[PathLike] | PathLike, dest: str | os.PathLike[str], t0: float) -> ExtractResult:
        items = [paths] if isinstance(paths, (str, bytes, os.PathLike)) else list(paths)
        dest_text = os.fspath(dest)
        if not items:
            raise OutputError(dest_text, "nothing to copy: no path given")
        raws = [to_bytes(p)[0] for p in items]
        stats = [self.fs.stat(raw) for raw in raws]  # a missing path fails here, before anything is made
        try:
            builds = self._plan(raws, stats, dest_text)
        except BaseException:
            self._close()
            raise
        undo = 0
        with deferred():  # nothing is made yet: whatever gets made goes with this undo
            undo = register(self._clean_up)
        try:
            for place, raw, stat, name in builds:
                self._copy(place, raw, stat, name)
            with deferred():
                self._commit()
        finally:
            with deferred():
                release(undo)
                self._clean_up()
        c = self.counts
        return ExtractResult(
            output=dest_text,
            paths=[os.fsdecode(raw) for raw in raws],
            files=c.files,
            dirs=c.dirs,
            symlinks=c.symlinks,
            hard_links=c.hard_links,
            special=c.special,
            bytes=c.bytes,
            skipped=dict(c.skipped),
            errors=c.errors,
            seconds=time.monotonic() - t0,
        )

    def _plan(self, raws: list[bytes], stats: list[FileStat], dest: str) -> list[tuple[_Place, bytes, FileStat, bytes]]:
        """(place, path inside, its stat, the name it is built under in the place's folder) for each path."""
        exists = os.path.lexists(dest)
        is_dir = os.path.isdir(dest)
        if len(raws) == 1 and (not is_dir or not [p for p in raws[0].split(b"/") if p]):  # DEST becomes the copy
            # (the root has no name to be copied under in an existing folder: it would replace the folder)
            place = self._place(os.fsencode(dest), exists, stats[0])
            return [(place, raws[0], stats[0], place.temp)]
        names = [self._base(raw, dest) for raw in raws]
        seen: dict[bytes, bytes] = {}
        for raw, name in zip(raws, names, strict=True):
            if name in seen:
                raise OutputError(dest, f"{show(seen[name])} and {show(raw)} would both be copied as {show(name)}")
            seen[name] = raw
        if is_dir:  # each path goes into DEST under its name
            out = []
            for raw, name, stat in zip(raws, names, stats, strict=True):
                target = os.path.join(os.fsencode(dest), name)
                place = self._place(target, os.path.lexists(target), stat)
                out.append((place, raw, stat, place.temp))
            return out
        if exists:
            raise OutputError(dest, "exists and is not a folder: several paths are copied into a folder")
        place = self._place(os.fsencode(dest), False, None)  # a new folder, built whole under a temporary name
        place.folder = True
        return [(place, raw, stat, name) for raw, name, stat in zip(raws, names, stats, strict=True)]

    def _base(self, raw: bytes, dest: str) -> bytes:
        parts = [p for p in raw.split(b"/") if p]
        name = parts[-1] if parts else b""
        if name in BAD_NAMES:
            what = "the filesystem's root" if not parts else show(raw)
            raise OutputError(dest, f"{what} has no name to be copied under in a folder; name the copy: give one "
                              "path and a destination that does not exist")  # fmt: skip
        return name

    def _place(self, target: bytes, exists: bool, stat: FileStat | None) -> _Place:
        """The place of a new entry ``target``: checks what is there, opens its folder, picks a temporary name."""
        path = target.rstrip(b"/") or b"/"
        parent, name = os.path.split(path)
        if name in BAD_NAMES:
            raise OutputError(os.fsdecode(target), "cannot be made: name a new file or folder")
        if exists:
            self._check_replace(path, stat)
        try:
            fd = os.open(parent or b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise ImageIOError(os.fsdecode(parent or b"."), f"cannot write into this folder: {exc.strerror}",
                               errno=exc.errno) from None  # fmt: skip
        remove_stale(fd, name)
        temp = b".%s.%d.%s%s" % (name[:100], os.getpid(), secrets.token_hex(4).encode(), TMP_SUFFIX.encode())
        place = _Place(fd, name, temp, path, replace=exists)
        self.places.append(place)
        return place

    def _check_replace(self, path: bytes, stat: FileStat | None) -> None:
        shown = os.fsdecode(path)
        try:
            st = os.lstat(path)
            followed: os.stat_result | None = os.stat(path) if S.S_ISLNK(st.st_mode) else st
        except FileNotFoundError:
            followed = None  # a dangling link
        except OSError as exc:
            raise OutputError(shown, f"cannot use as output: {exc.strerror}") from None
        if followed is not None:
            for what, ist in self.fs.files.items():
                if (followed.st_dev, followed.st_ino) == (ist.st_dev, ist.st_ino):
                    raise OutputError(shown, f"output is the disk's {what} (same file); refusing to replace it")
        if S.S_ISDIR(st.st_mode):  # what --overwrite would not replace either: no hint to use it
            if os.listdir(path):
                raise OutputError(shown, "is a folder that is not empty; ubdcow replaces files, links and empty "
                                  "folders only: remove it first")  # fmt: skip
            if stat is not None and stat.type != "dir":
                raise OutputError(shown, "is a folder: a file is not copied over it")
        if not self.overwrite:
            raise OutputError(shown, "already exists", fixes=(Fix("to replace it", (("overwrite", None),)),))

    # -- building ---------------------------------------------------------------------------------

    def _copy(self, place: _Place, raw: bytes, top: FileStat, name: bytes) -> None:
        """Copy the entry ``raw`` into ``place`` (into its new folder when the place is one)."""
        if not place.folder:
            self._tree(place, place.parent_fd, name, raw, top, b"", self._top_mask())
            return
        if place.fd < 0:
            place.fd = self.writer.new_dir(place.parent_fd, place.temp, place.display)
        self._tree(place, place.fd, name, raw, top, name, 0o7777)

    def _tree(self, place: _Place, parent: int, name: bytes, raw: bytes, top: FileStat, rel: bytes, mask: int) -> None:
        if top.type != "dir":
            self._guarded(self.writer.leaf, self._top(place), parent, name, top, rel, self._display(place, rel), mask)
            return
        fd = self.writer.new_dir(parent, name, self._display(place, rel), top)
        stack = [_Dir(top, fd, rel, mask)]
        try:
            walk = self.fs.walk(raw, sort=True, onerror=self._report, descend=lambda _: self.enter)
            stack[0].stat = next(walk)
            for entry in walk:
                self.enter = False
                name = entry.path.rsplit(b"/", 1)[-1]
                while stack and join(stack[-1].stat.path, name) != entry.path:
                    self._finish(stack.pop())
                if not stack:  # (cannot happen: every entry is in a folder the walk entered)
                    break
                here = stack[-1]
                sub = here.rel + b"/" + name if here.rel else name
                if entry.type == "dir":
                    made = self._guarded(self._subdir, here.fd, name, entry, self._display(place, sub))
                    if made is not None:
                        stack.append(_Dir(entry, made, sub, 0o7777))
                        self.enter = True
                else:
                    self._guarded(self._leaf, self._top(place), here.fd, name, entry, sub, self._display(place, sub))
            while stack:
                self._finish(stack.pop())
        finally:
            for d in stack:
                os.close(d.fd)

    def _subdir(self, parent: int, name: bytes, entry: FileStat, display: bytes) -> int:
        return self.writer.new_dir(parent, checked(name, entry, self.fs), display, entry)

    def _leaf(self, top: Top, parent: int, name: bytes, entry: FileStat, sub: bytes, display: bytes) -> None:
        # the name is checked inside the guard, as a folder's is: with --keep-going a bad one is reported
        self.writer.leaf(top, parent, checked(name, entry, self.fs), entry, sub, display)

    def _guarded(self, step: Callable[..., T], *args: Any) -> T | None:
        """``step(*args)``; a problem with one entry is raised, or with ``keep_going`` reported and counted."""
        try:
            return step(*args)
        except Problem as problem:
            self._report(problem.error)
        except FilesystemError as exc:
            self._report(exc)
        return None

    def _report(self, error: UbdCowError) -> None:
        if not self.keep_going:
            raise error
        self.counts.errors += 1
        if self.onerror is not None:
            self.onerror(error)

    def _display(self, place: _Place, rel: bytes) -> bytes:
        return place.display + b"/" + rel if rel else place.display

    @staticmethod
    def _top(place: _Place) -> tuple[int, bytes]:
        """Where the copy is built (its folder's descriptor, its temporary name): hard links find their
        first copy from there."""
        return place.parent_fd, place.temp

    def _top_mask(self) -> int:
        """The top of a copy is no more open than the disk: group and other bits only if they may read it."""
        modes = [st.st_mode for st in self.fs.files.values()]
        group = all(m & 0o044 for m in modes)
        other = all(m & 0o004 for m in modes)
        return 0o7700 | (0o070 if group else 0) | (0o007 if other else 0)

    def _finish(self, d: _Dir) -> None:
        """A folder's content is complete: its own owner, attributes, mode and times, then close it."""
        try:
            self._guarded(self.writer.meta, d.stat, d.mask, d.fd)
        finally:
            os.close(d.fd)

    # -- the end ------------------------------------------------------------------------------------

    def _commit(self) -> None:
        """Rename each copy into place (a replaced entry goes at that moment)."""
        for place in self.places:
            if place.fd >= 0:  # a new folder made to receive several copies: a folder's usual mode
                os.fchmod(place.fd, 0o777 & ~current_umask() & self._top_mask())
            if not exists(place.parent_fd, place.temp):
                continue  # a top-level entry left out (keep_going, or a socket)
            try:
                if place.replace:
                    replace(place.parent_fd, place.temp, place.name)
                else:
                    rename_noreplace(place.parent_fd, place.temp, place.name)
            except FileExistsError:
                raise OutputError(show(place.display), "already exists (it appeared while copying)") from None
            except OSError as exc:
                raise ImageIOError(show(place.display), f"cannot move the copy into place: {exc.strerror}",
                                   errno=exc.errno) from None  # fmt: skip
            place.committed = True

    def _clean_up(self) -> None:
        """Remove what was not moved into place, close the folders (idempotent: the undo of a run)."""
        try:
            for place in self.places:
                if not place.committed and place.parent_fd >= 0:
                    if place.fd >= 0:
                        os.close(place.fd)
                        place.fd = -1
                    remove_tree(place.parent_fd, place.temp)
        finally:
            self._close()

    def _close(self) -> None:
        for place in self.places:
            for fd in (place.fd, place.parent_fd):
                if fd >= 0:
                    os.close(fd)
            place.fd = place.parent_fd = -1
