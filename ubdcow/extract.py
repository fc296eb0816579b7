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
"""

from __future__ import annotations

import errno
import os
import secrets
import stat as S
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ._atomic import TMP_SUFFIX, current_umask
from ._hosttree import (
    DIR_FLAGS,
    exists,
    more_files,
    pwrite_all,
    remove_stale,
    remove_tree,
    rename_noreplace,
    replace,
    unlink,
)
from ._result import Result
from ._signals import deferred, register, release
from .errors import CorruptFilesystemError, FilesystemError, Fix, ImageIOError, OutputError, UbdCowError
from .fs import FileStat, FileSystem, open_fs
from .fs.records import PathLike, join, show, to_bytes

__all__ = ["ExtractResult", "extract", "SKIP_REASONS"]

#: bytes read and written at once
CHUNK = 1 << 20
#: what ``skipped`` counts (see the module docstring)
SKIP_REASONS = ("owners", "devices", "fifos", "sockets", "xattrs", "setid_bits", "hard_links")
_BAD_NAMES = (b"", b".", b"..")
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_PATH_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: errors of the host about one name (too long, not representable): that entry's problem, not the run's
_NAME_ERRNOS = (errno.ENAMETOOLONG, errno.EILSEQ, errno.EINVAL)
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


class _Problem(Exception):
    """One entry cannot be copied (``error`` says why); the run goes on with ``keep_going``."""

    def __init__(self, error: UbdCowError) -> None:
        super().__init__(str(error))
        self.error = error


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

    index: int
    parent_fd: int
    name: bytes
    temp: bytes
    display: bytes
    replace: bool = False
    folder: bool = False
    fd: int = -1
    committed: bool = False


@dataclass
class _Counts:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hard_links: int = 0
    special: int = 0
    bytes: int = 0
    errors: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))


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
        self.progress = progress
        self.onerror = onerror
        self.root = os.geteuid() == 0
        self.ids = (os.geteuid(), os.getegid())
        self.counts = _Counts()
        self.buf = bytearray(CHUNK)
        self.places: list[_Place] = []
        #: inode -> (place index, path from the copy's top) of the first copy of an entry with several links
        self.links: dict[int, tuple[int, bytes]] = {}
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
        if name in _BAD_NAMES:
            what = "the filesystem's root" if not parts else show(raw)
            raise OutputError(dest, f"{what} has no name to be copied under in a folder; name the copy: give one "
                              "path and a destination that does not exist")  # fmt: skip
        return name

    def _place(self, target: bytes, exists: bool, stat: FileStat | None) -> _Place:
        """The place of a new entry ``target``: checks what is there, opens its folder, picks a temporary name."""
        path = target.rstrip(b"/") or b"/"
        parent, name = os.path.split(path)
        if name in _BAD_NAMES:
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
        place = _Place(len(self.places), fd, name, temp, path, replace=exists)
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
            place.fd = self._new_dir(place.parent_fd, place.temp, place.display)
        self._tree(place, place.fd, name, raw, top, name, 0o7777)

    def _tree(self, place: _Place, parent: int, name: bytes, raw: bytes, top: FileStat, rel: bytes, mask: int) -> None:
        if top.type != "dir":
            self._guarded(self._leaf, place, parent, name, top, rel, mask)
            return
        fd = self._new_dir(parent, name, self._display(place, rel), top)
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
                    self._guarded(self._leaf, place, here.fd, _checked(name, entry, self.fs), entry, sub)
            while stack:
                self._finish(stack.pop())
        finally:
            for d in stack:
                os.close(d.fd)

    def _subdir(self, parent: int, name: bytes, entry: FileStat, display: bytes) -> int:
        return self._new_dir(parent, _checked(name, entry, self.fs), display, entry)

    def _guarded(self, step: Callable[..., T], *args: Any) -> T | None:
        """``step(*args)``; a problem with one entry is raised, or with ``keep_going`` reported and counted."""
        try:
            return step(*args)
        except _Problem as problem:
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

    def _top_mask(self) -> int:
        """The top of a copy is no more open than the disk: group and other bits only if they may read it."""
        modes = [st.st_mode for st in self.fs.files.values()]
        group = all(m & 0o044 for m in modes)
        other = all(m & 0o004 for m in modes)
        return 0o7700 | (0o070 if group else 0) | (0o007 if other else 0)

    def _host(self, exc: OSError, display: bytes, what: str, entry: FileStat | None = None) -> UbdCowError:
        """A host error about one entry: a name the image holds twice and names the host refuses are that
        entry's problem (:class:`_Problem`); anything else (no space, I/O) ends the run."""
        if exc.errno == errno.EEXIST and entry is not None:
            raise _Problem(CorruptFilesystemError(self.fs.name, f"{show(entry.path)}: its folder holds this "
                                                                "name twice"))  # fmt: skip
        if exc.errno in _NAME_ERRNOS:
            raise _Problem(OutputError(show(display), f"cannot {what}: {exc.strerror}"))
        return ImageIOError(show(display), f"cannot {what}: {exc.strerror}", errno=exc.errno)

    def _new_dir(self, parent: int, name: bytes, display: bytes, entry: FileStat | None = None) -> int:
        try:
            os.mkdir(name, 0o700, dir_fd=parent)
            try:
                fd = os.open(name, DIR_FLAGS, dir_fd=parent)
            except OSError as exc:  # a folder open per level: a deep tree may need more than the soft limit
                if exc.errno != errno.EMFILE or not more_files():
                    raise
                fd = os.open(name, DIR_FLAGS, dir_fd=parent)
            os.fchmod(fd, 0o700)  # whatever the umask: it is filled first
        except OSError as exc:
            raise self._host(exc, display, "make this folder", entry) from None
        self.counts.dirs += 1
        return fd

    def _leaf(self, place: _Place, parent: int, name: bytes, entry: FileStat, rel: bytes, mask: int = 0o7777) -> None:
        """A file, a symbolic link, a device node, a FIFO or a socket."""
        display = self._display(place, rel)
        kind = entry.type
        first = self.links.get(entry.inode) if entry.nlink > 1 else None
        if first is not None and self._link(first, parent, name, entry):
            return
        made = True
        try:
            if kind == "file":
                self._file(parent, name, display, entry, mask)
            elif kind == "symlink":
                self._symlink(parent, name, entry)
            elif kind == "socket":
                self.counts.skipped["sockets"] += 1
                made = False
            else:
                made = self._node(parent, name, entry, mask)
        except OSError as exc:
            if isinstance(exc, UbdCowError):  # (the reader's path errors are OSErrors too)
                raise
            raise self._host(exc, display, "make this entry", entry) from None
        if made and entry.nlink > 1 and first is None:
            self.links[entry.inode] = (place.index, rel)

    def _file(self, parent: int, name: bytes, display: bytes, entry: FileStat, mask: int) -> None:
        fd = os.open(name, _NEW_FILE, 0o600, dir_fd=parent)
        done = False
        try:
            with self.fs.open(entry) as f:
                self._content(f, fd, entry.size, display)
            self._meta(entry, mask, fd=fd)
            done = True
        finally:
            os.close(fd)
            if not done:
                with deferred():
                    unlink(parent, name)  # a file cut short is not left in a kept-going copy
        self.counts.files += 1

    def _content(self, f: object, fd: int, size: int, display: bytes) -> None:
        """The data stretches of ``f`` (an FsFile) written at their offsets; the holes left as holes."""
        from .fs import FsFile

        assert isinstance(f, FsFile)
        view = memoryview(self.buf)
        pos = 0
        try:
            while pos < size:
                try:
                    start = f.seek(pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno != errno.ENXIO:
                        raise
                    break
                end = f.seek(start, os.SEEK_HOLE)
                f.seek(start)
                at = start
                while at < end:
                    n = f.readinto(view[: min(CHUNK, end - at)])
                    if not n:
                        break
                    pwrite_all(fd, view[:n], at)
                    at += n
                    self.counts.bytes += n
                    if self.progress is not None:
                        self.progress(n)
                pos = end
            os.ftruncate(fd, size)
        except OSError as exc:
            raise ImageIOError(show(display), f"cannot write: {exc.strerror}", errno=exc.errno) from None

    def _symlink(self, parent: int, name: bytes, entry: FileStat) -> None:
        target = entry.target
        if not target:
            raise _Problem(CorruptFilesystemError(self.fs.name, f"{show(entry.path)}: an empty symbolic link "
                                                                "(the host cannot make one)"))  # fmt: skip
        os.symlink(target, name, dir_fd=parent)
        self._meta(entry, 0o7777, parent=parent, name=name)
        self.counts.symlinks += 1

    def _node(self, parent: int, name: bytes, entry: FileStat, mask: int) -> bool:
        kind = entry.type
        reason = "fifos" if kind == "fifo" else "devices"
        if not self.root:
            self.counts.skipped[reason] += 1
            return False
        node = {"fifo": S.S_IFIFO, "char": S.S_IFCHR, "block": S.S_IFBLK}[kind]
        device = os.makedev(*entry.rdev) if entry.rdev is not None else 0
        try:
            os.mknod(name, 0o600 | node, device, dir_fd=parent)
        except PermissionError:  # root without CAP_MKNOD (a container)
            self.counts.skipped[reason] += 1
            return False
        self._meta(entry, mask, parent=parent, name=name)
        self.counts.special += 1
        return True

    def _link(self, first: tuple[int, bytes], parent: int, name: bytes, entry: FileStat) -> bool:
        """A hard link to the first copy of ``entry``; False when the host refuses (then it is copied again)."""
        index, rel = first
        place = self.places[index]
        opened: list[int] = []
        try:
            where, source = place.parent_fd, place.temp
            parts = rel.split(b"/") if rel else []
            if parts:
                where = self._open_path(where, source, opened)
                for part in parts[:-1]:
                    where = self._open_path(where, part, opened)
                source = parts[-1]
            os.link(source, name, src_dir_fd=where, dst_dir_fd=parent, follow_symlinks=False)
        except FileExistsError:
            raise _Problem(CorruptFilesystemError(self.fs.name, f"{show(entry.path)}: its folder holds this "
                                                                "name twice")) from None  # fmt: skip
        except OSError:
            self.counts.skipped["hard_links"] += 1
            return False
        finally:
            for fd in opened:
                os.close(fd)
        self.counts.hard_links += 1
        return True

    @staticmethod
    def _open_path(parent: int, name: bytes, opened: list[int]) -> int:
        fd = os.open(name, _PATH_FLAGS, dir_fd=parent)
        opened.append(fd)
        return fd

    def _finish(self, d: _Dir) -> None:
        """A folder's content is complete: its own owner, attributes, mode and times, then close it."""
        try:
            self._guarded(self._meta, d.stat, d.mask, d.fd)
        finally:
            os.close(d.fd)

    # -- metadata -----------------------------------------------------------------------------------

    def _meta(self, entry: FileStat, mask: int, fd: int | None = None, parent: int = -1, name: bytes = b"") -> None:
        """Owner, extended attributes, mode, times, in that order (a chown clears set-id bits and file
        capabilities; attributes and the mode change the ctime only; the times come last)."""
        link = entry.type == "symlink"
        try:
            kept = self._owner(entry, fd, parent, name)
            self._xattrs(entry, fd, parent, name)
            if not link:
                mode = entry.mode & mask
                if not kept and mode & 0o6000:
                    mode &= ~0o6000
                    self.counts.skipped["setid_bits"] += 1
                if fd is not None:
                    os.fchmod(fd, mode)
                else:
                    os.chmod(name, mode, dir_fd=parent)  # a node just made in a folder only we can enter
            times = (entry.atime_ns, entry.mtime_ns)
            if fd is not None:
                os.utime(fd, ns=times)
            else:
                os.utime(name, ns=times, dir_fd=parent, follow_symlinks=False)
        except OSError as exc:
            where = show(entry.path)
            raise ImageIOError(self.fs.name, f"{where}: cannot set its metadata on the copy: {exc.strerror}",
                               errno=exc.errno) from None  # fmt: skip

    def _owner(self, entry: FileStat, fd: int | None, parent: int, name: bytes) -> bool:
        """Whether the copy has the entry's owner (as root: set it; otherwise: only if it is already ours)."""
        if not self.root:
            if (entry.uid, entry.gid) == self.ids:
                return True
            self.counts.skipped["owners"] += 1
            return False
        try:
            if fd is not None:
                os.fchown(fd, entry.uid, entry.gid)
            else:
                os.chown(name, entry.uid, entry.gid, dir_fd=parent, follow_symlinks=False)
        except OSError as exc:  # an id this user namespace cannot map
            if exc.errno not in (errno.EPERM, errno.EINVAL):
                raise
            self.counts.skipped["owners"] += 1
            return False
        return True

    def _xattrs(self, entry: FileStat, fd: int | None, parent: int, name: bytes) -> None:
        attributes = self.fs.xattrs(entry)
        if not attributes:
            return
        target: int | bytes = fd if fd is not None else b"/proc/self/fd/%d/%s" % (parent, name)
        for key, value in attributes.items():
            if not self.root and key.split(".", 1)[0] in ("trusted", "security"):
                self.counts.skipped["xattrs"] += 1
                continue
            try:
                os.setxattr(target, key, value, follow_symlinks=isinstance(target, int))
            except OSError:  # not supported here, refused (user.* on a symlink), too large
                self.counts.skipped["xattrs"] += 1

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


def _checked(name: bytes, entry: FileStat, fs: FileSystem) -> bytes:
    """``name``, unless no directory may hold it (the reader refuses those too: a second guard)."""
    if name in _BAD_NAMES or b"/" in name or b"\0" in name:
        raise _Problem(CorruptFilesystemError(fs.name, f"{show(entry.path)}: a name no folder may hold"))
    return name
