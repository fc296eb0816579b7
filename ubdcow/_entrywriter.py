"""Making the entries of a ``get`` (:mod:`ubdcow.extract`) on the host, one at a time, in a folder given by its
descriptor: folders, files (their content written where the image holds data, holes left as holes),
symbolic links, device nodes and FIFOs, hard links to an entry's first copy; then each one's owner,
extended attributes, mode and times, in that order. What the host or this user cannot keep is counted
in :class:`Counts`' ``skipped``; a problem with one entry is a :class:`Problem` (``keep_going`` goes on).
"""

from __future__ import annotations

import errno
import os
import stat as S
from collections.abc import Callable
from dataclasses import dataclass, field

from ._hosttree import DIR_FLAGS, more_files, pwrite_all, unlink
from ._signals import deferred
from .errors import CorruptFilesystemError, ImageIOError, OutputError, UbdCowError
from .fs import FileStat, FileSystem
from .fs.records import show

__all__ = ["BAD_NAMES", "CHUNK", "SKIP_REASONS", "Counts", "EntryWriter", "Problem", "Top", "checked"]

#: bytes read and written at once
CHUNK = 1 << 20
#: what ``skipped`` counts (see :mod:`ubdcow.extract`)
SKIP_REASONS = ("owners", "devices", "fifos", "sockets", "xattrs", "setid_bits", "hard_links")
#: names no folder may hold (with those holding ``/`` or NUL)
BAD_NAMES = (b"", b".", b"..")
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_PATH_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: errors of the host about one name (too long, not representable): that entry's problem, not the run's
_NAME_ERRNOS = (errno.ENAMETOOLONG, errno.EILSEQ, errno.EINVAL)
#: the top of one copy: the folder it is built in (a descriptor) and the name it is built under
Top = tuple[int, bytes]


class Problem(Exception):
    """One entry cannot be copied (``error`` says why); the run goes on with ``keep_going``."""

    def __init__(self, error: UbdCowError) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass
class Counts:
    """What a run made and skipped, as :class:`~ubdcow.extract.ExtractResult` reports it."""

    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hard_links: int = 0
    special: int = 0
    bytes: int = 0
    errors: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))


def checked(name: bytes, entry: FileStat, fs: FileSystem) -> bytes:
    """``name``, unless no directory may hold it (the reader refuses those too: a second guard)."""
    if name in BAD_NAMES or b"/" in name or b"\0" in name:
        raise Problem(CorruptFilesystemError(fs.name, f"{show(entry.path)}: a name no folder may hold"))
    return name


class EntryWriter:
    """Makes the entries of one run in ``fs``'s name, counting in ``counts``; ``progress`` gets the bytes
    written as they go."""

    def __init__(self, fs: FileSystem, counts: Counts, progress: Callable[[int], object] | None) -> None:
        self.fs = fs
        self.counts = counts
        self.progress = progress
        self.root = os.geteuid() == 0
        self.ids = (os.geteuid(), os.getegid())
        self.buf = bytearray(CHUNK)
        #: inode -> (top, path from the copy's top) of the first copy of an entry with several links
        self.links: dict[int, tuple[Top, bytes]] = {}

    def host_error(self, exc: OSError, display: bytes, what: str, entry: FileStat | None = None) -> UbdCowError:
        """A host error about one entry: a name the image holds twice and names the host refuses are that
        entry's problem (:class:`Problem`); anything else (no space, I/O) ends the run."""
        if exc.errno == errno.EEXIST and entry is not None:
            raise Problem(CorruptFilesystemError(self.fs.name, f"{show(entry.path)}: its folder holds this "
                                                                "name twice"))  # fmt: skip
        if exc.errno in _NAME_ERRNOS:
            raise Problem(OutputError(show(display), f"cannot {what}: {exc.strerror}"))
        return ImageIOError(show(display), f"cannot {what}: {exc.strerror}", errno=exc.errno)

    def new_dir(self, parent: int, name: bytes, display: bytes, entry: FileStat | None = None) -> int:
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
            raise self.host_error(exc, display, "make this folder", entry) from None
        self.counts.dirs += 1
        return fd

    def leaf(
        self, top: Top, parent: int, name: bytes, entry: FileStat, rel: bytes, display: bytes, mask: int = 0o7777
    ) -> None:
        """A file, a symbolic link, a device node, a FIFO or a socket, ``rel`` below the copy's ``top``."""
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
            raise self.host_error(exc, display, "make this entry", entry) from None
        if made and entry.nlink > 1 and first is None:
            self.links[entry.inode] = (top, rel)

    def _file(self, parent: int, name: bytes, display: bytes, entry: FileStat, mask: int) -> None:
        fd = os.open(name, _NEW_FILE, 0o600, dir_fd=parent)
        done = False
        try:
            with self.fs.open(entry) as f:
                self._content(f, fd, entry.size, display)
            self.meta(entry, mask, fd=fd)
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
            raise Problem(CorruptFilesystemError(self.fs.name, f"{show(entry.path)}: an empty symbolic link "
                                                                "(the host cannot make one)"))  # fmt: skip
        os.symlink(target, name, dir_fd=parent)
        self.meta(entry, 0o7777, parent=parent, name=name)
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
        self.meta(entry, mask, parent=parent, name=name)
        self.counts.special += 1
        return True

    def _link(self, first: tuple[Top, bytes], parent: int, name: bytes, entry: FileStat) -> bool:
        """A hard link to the first copy of ``entry``; False when the host refuses (then it is copied again)."""
        (where, source), rel = first
        opened: list[int] = []
        try:
            parts = rel.split(b"/") if rel else []
            if parts:
                where = self._open_path(where, source, opened)
                for part in parts[:-1]:
                    where = self._open_path(where, part, opened)
                source = parts[-1]
            os.link(source, name, src_dir_fd=where, dst_dir_fd=parent, follow_symlinks=False)
        except FileExistsError:
            raise Problem(CorruptFilesystemError(self.fs.name, f"{show(entry.path)}: its folder holds this "
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

    # -- metadata -----------------------------------------------------------------------------------

    def meta(self, entry: FileStat, mask: int, fd: int | None = None, parent: int = -1, name: bytes = b"") -> None:
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
