"""The FUSE operations of ``mount``: a :class:`~ubdcow.fs.FileSystem` answering libfuse's high-level API.

:class:`Operations` is what mfusepy calls, path by path (str, UTF-8 with surrogateescape, as mfusepy
decodes them): lstat's fields with the image's inode numbers, symlink targets, xattrs, statfs, file
content, and directory listings through :class:`Directories`. Every change is refused with EROFS (the
mount is ``ro`` as well, so the kernel refuses most before they get here). A reader error becomes the
request's errno: a path problem its own (ENOENT, ENOTDIR, ...), anything else (a corrupt structure in
one file, an I/O error) EIO, logged once; the mount goes on.

What makes it fast, since the image cannot change under the mount:

- with libfuse 3, ``open`` answers ENOSYS (FUSE_CAP_NO_OPEN_SUPPORT): opening and closing a file cost
  no request at all, the kernel keeps the file's pages across opens, and reads come by path (a reader
  kept per path, :data:`OPEN_FILES` at most);
- symlink targets are cached by the kernel (FUSE_CAP_CACHE_SYMLINKS);
- :func:`ubdcow.fuseglue.fuse_class` answers READDIRPLUS with each entry's attributes, so a listing makes its entries
  known to the kernel without a lookup each; a directory's listing, once complete, is kept packed as
  libfuse's filler takes it (:data:`LISTED_ENTRIES` entries at most, in all) and served again without
  the filesystem; ``opendir`` and ``releasedir`` are left to libfuse (no request reaches Python);
- reads go straight into libfuse's buffer.

POSIX ACLs are handed to the kernel (FUSE_CAP_POSIX_ACL), which then checks them, as the kernel's own
ext4 does.
"""

from __future__ import annotations

import errno
import itertools
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

from .errors import FsPathError, UbdCowError
from .fs import FileStat, FileSystem, FsFile

__all__ = ["Operations", "Directories", "attributes", "LOG_LIMIT", "OPEN_FILES", "LISTED_ENTRIES"]

# libfuse 3's capability bits (fuse_common.h) and readdir flags (fuse.h)
CAP_NO_OPEN_SUPPORT = 1 << 17
CAP_POSIX_ACL = 1 << 19
CAP_CACHE_SYMLINKS = 1 << 23
READDIR_PLUS = 1 << 0
FILL_DIR_PLUS = 1 << 1
#: errors logged per mount (each problem once; then only a count)
LOG_LIMIT = 1000
#: files read without an open handle (open answered ENOSYS) whose readers are kept, by path
OPEN_FILES = 256
#: directory entries whose listings are kept, in all (a few hundred bytes each); a directory of more than a
#: quarter of it is streamed every time, never kept
LISTED_ENTRIES = 1 << 17
#: listings under way at once for one directory (readers at different offsets of it)
CURSORS = 4
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

Attributes = dict[str, int]


def attributes(st: FileStat, block_size: int) -> Attributes:
    """What lstat shows for an entry, as mfusepy's ``getattr`` returns it (times in nanoseconds)."""
    rdev = os.makedev(*st.rdev) if st.rdev is not None else 0
    return {"st_mode": st.st_mode, "st_ino": st.inode, "st_nlink": st.nlink, "st_uid": st.uid, "st_gid": st.gid,
            "st_size": st.size, "st_blocks": st.blocks, "st_blksize": block_size, "st_rdev": rdev,
            "st_atime": st.atime_ns, "st_mtime": st.mtime_ns, "st_ctime": st.ctime_ns}  # fmt: skip


def _decode(name: bytes) -> str:
    # mfusepy hands paths to us decoded (UTF-8, surrogateescape) and encodes ours the same way
    return name.decode("utf-8", "surrogateescape")


def _encode(path: str) -> bytes:
    return path.encode("utf-8", "surrogateescape")


def _error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


# -- directories -----------------------------------------------------------------------------------------


class _Cursor:
    """One listing of a directory under way: the entry at ``position`` comes next; ``held``, the entry libfuse
    could not fit in its buffer, comes again first; ``collected``, every entry so far when it began at 0."""

    __slots__ = ("collected", "held", "items", "position")

    def __init__(self, items: Iterator[tuple[bytes, Any]], collect: bool) -> None:
        self.items = items
        self.position = 0
        self.held: tuple[int, tuple[bytes, Any]] | None = None
        self.collected: list[tuple[bytes, Any]] | None = [] if collect else None

    def at(self, offset: int) -> bool:
        """Whether this listing goes on at ``offset``: the held entry's (not taken), or the next one's (the held
        one was taken after all: the caller stopped right after it)."""
        if self.held is not None and self.held[0] + 1 == offset:
            self.held = None
        return (self.held[0] if self.held is not None else self.position) == offset


class Directories:
    """Listings by path, from any offset: entry ``i`` (``.``, ``..``, then the directory's own, in on-disk
    order) carries offset ``i + 1``, the offset of the one after it, as libfuse hands it back.

    ``listing(path)`` gives ``(name, attributes)``; ``pack`` turns the attributes into what the caller
    keeps (libfuse's packed ``struct stat``). A listing read to its end is kept (see
    :data:`LISTED_ENTRIES`); one under way is resumed where the previous call stopped (several at once
    per directory, :data:`CURSORS`); another offset restarts it and skips ahead.
    """

    def __init__(
        self, listing: Callable[[bytes], Iterator[tuple[bytes, Attributes]]], pack: Callable[[Attributes], Any]
    ) -> None:
        self._listing = listing
        self._pack = pack
        self._kept: OrderedDict[bytes, list[tuple[bytes, Any]]] = OrderedDict()
        self._count = 0
        self._cursors: OrderedDict[bytes, list[_Cursor]] = OrderedDict()
        self._lock = threading.Lock()

    def entries(self, path: bytes, offset: int) -> Iterator[tuple[bytes, Any, int]]:
        """``(name, packed attributes, offset of the next entry)`` from ``offset`` on. Close the iterator (or let
        it go) where the caller stops: the entry it stopped at comes first next time."""
        with self._lock:
            kept = self._kept.get(path)
            if kept is not None:
                self._kept.move_to_end(path)
        if kept is not None:
            for i in range(offset, len(kept)):
                name, packed = kept[i]
                yield name, packed, i + 1
            return
        cursor = self._take(path, offset)
        if cursor is None:
            return  # past the end
        try:
            while True:
                if cursor.held is None:
                    item = next(cursor.items, None)
                    if item is None:
                        break
                    entry = (item[0], self._pack(item[1]))
                    if cursor.collected is not None:
                        cursor.collected.append(entry)
                        if len(cursor.collected) > LISTED_ENTRIES // 4:
                            cursor.collected = None  # too big to keep: streamed each time
                    cursor.held = (cursor.position, entry)
                    cursor.position += 1
                at, (name, packed) = cursor.held
                yield name, packed, at + 1
                cursor.held = None  # reached when the next one is asked for: this one was taken
        except GeneratorExit:  # the caller's buffer is full: resume here next time
            self._give_back(path, cursor)
            raise
        if cursor.collected is not None:
            self._keep(path, cursor.collected)
        else:  # at its end, for the call that comes to find nothing more (libfuse asks until it gets nothing)
            self._give_back(path, cursor)

    def _take(self, path: bytes, offset: int) -> _Cursor | None:
        with self._lock:
            cursors = self._cursors.get(path, [])
            for i, cursor in enumerate(cursors):
                if cursor.at(offset):
                    del cursors[i]
                    return cursor
        cursor = _Cursor(self._listing(path), collect=offset == 0)
        for _ in itertools.islice(cursor.items, offset):
            cursor.position += 1
        return cursor if cursor.position == offset else None

    def _give_back(self, path: bytes, cursor: _Cursor) -> None:
        with self._lock:
            cursors = self._cursors.setdefault(path, [])
            self._cursors.move_to_end(path)
            cursors.append(cursor)
            del cursors[:-CURSORS]
            while len(self._cursors) > 64:
                self._cursors.popitem(last=False)

    def _keep(self, path: bytes, entries: list[tuple[bytes, Any]]) -> None:
        with self._lock:
            self._cursors.pop(path, None)
            if path in self._kept:
                return
            self._kept[path] = entries
            self._count += len(entries)
            while self._count > LISTED_ENTRIES:
                self._count -= len(self._kept.popitem(last=False)[1])


# -- files -------------------------------------------------------------------------------------------------


class _File:
    __slots__ = ("file", "lock")

    def __init__(self, file: FsFile) -> None:
        self.file = file
        self.lock = threading.Lock()

    def readinto(self, view: memoryview, offset: int) -> int:
        with self.lock:
            self.file.seek(offset)
            return self.file.readinto(view)


# -- the operations ------------------------------------------------------------------------------------------


class Operations:
    """The FUSE operations over ``fs`` for mfusepy (see the module docstring).

    ``ready`` is called once libfuse has mounted the folder and the kernel has said hello (FUSE_INIT);
    ``log`` gets one line per problem (the first :data:`LOG_LIMIT` different ones); ``pack`` turns an
    entry's attributes into what :class:`Directories` keeps (by default the attributes themselves).
    """

    use_ns = True  # mfusepy: times in nanoseconds

    def __init__(
        self,
        fs: FileSystem,
        *,
        ready: Callable[[], None],
        log: Callable[[str], None],
        pack: Callable[[Attributes], Any] | None = None,
    ) -> None:
        self._fs = fs
        self._ready = ready
        self._log = log
        self._logged: set[str] = set()
        self._dropped = 0
        self._block_size = fs.block_size
        self._handles: dict[int, _File] = {}
        self._numbers = itertools.count(1)
        self._no_open = False
        self._files: OrderedDict[bytes, _File] = OrderedDict()
        self._lock = threading.Lock()
        self.directories = Directories(self._listing, pack or (lambda attrs: attrs))

    # -- plumbing ---------------------------------------------------------------------------------

    def _errno(self, exc: BaseException) -> OSError:
        """The errno a reader error becomes; anything but a path problem is EIO, logged once."""
        if isinstance(exc, FsPathError):
            return OSError(getattr(exc, "errno", None) or errno.EINVAL, str(exc))
        if isinstance(exc, OSError) and exc.errno and not isinstance(exc, UbdCowError):
            return exc
        text = str(exc) if isinstance(exc, UbdCowError) else f"internal error: {type(exc).__name__}: {exc}"
        self._report(f"{text} (the request failed with EIO)")
        return OSError(errno.EIO, text)

    def _report(self, text: str) -> None:
        with self._lock:
            if text in self._logged:
                return
            if len(self._logged) >= LOG_LIMIT:
                self._dropped += 1
                if self._dropped not in (1, 1000, 1000000):
                    return
                text = f"{self._dropped} more problems not logged"
            else:
                self._logged.add(text)
        self._log(text)

    def _stat(self, path: bytes) -> FileStat:
        try:
            return self._fs.stat(path)
        except Exception as exc:
            raise self._errno(exc) from None

    # -- life -------------------------------------------------------------------------------------

    def init_with_config(self, conn: Any, config: Any) -> None:
        """libfuse 3 (``config`` given): no open requests, symlinks cached, POSIX ACLs checked by the kernel."""
        if conn is not None and config is not None:
            self._no_open = bool(conn.capable & CAP_NO_OPEN_SUPPORT)
            conn.want |= conn.capable & (CAP_CACHE_SYMLINKS | CAP_POSIX_ACL)
        self._ready()

    def destroy(self, path: str) -> None:
        with self._lock:
            files = [*self._files.values(), *self._handles.values()]
            self._files.clear()
            self._handles.clear()
        for handle in files:
            handle.file.close()

    # -- entries -----------------------------------------------------------------------------------

    def getattr(self, path: str, fh: int | None = None) -> Attributes:
        return attributes(self._stat(_encode(path)), self._block_size)

    def readlink(self, path: str) -> str:
        try:
            return _decode(self._fs.readlink(_encode(path)))
        except Exception as exc:
            raise self._errno(exc) from None

    def listxattr(self, path: str) -> list[str]:
        try:
            return list(self._fs.xattrs(_encode(path)))
        except Exception as exc:
            raise self._errno(exc) from None

    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        try:
            value = self._fs.xattrs(_encode(path)).get(name)
        except Exception as exc:
            raise self._errno(exc) from None
        if value is None:
            raise _error(errno.ENODATA)
        return value

    def statfs(self, path: str) -> dict[str, int]:
        """The filesystem's size, all of it used (nothing can be written), and its inode count."""
        blocks = self._fs.size // self._block_size
        return {"f_bsize": self._block_size, "f_frsize": self._block_size, "f_blocks": blocks, "f_bfree": 0,
                "f_bavail": 0, "f_files": self._fs.inodes_count, "f_ffree": 0, "f_favail": 0,
                "f_namemax": 255}  # fmt: skip

    # -- directories -------------------------------------------------------------------------------

    def _listing(self, path: bytes) -> Iterator[tuple[bytes, Attributes]]:
        st = self._stat(path)
        if st.type != "dir":
            raise _error(errno.ENOTDIR)
        yield b".", attributes(st, self._block_size)
        yield b"..", attributes(self._stat(path.rstrip(b"/") + b"/.."), self._block_size)  # (the root's is itself)
        try:
            for entry in self._fs.scandir(path):
                yield entry.name, attributes(entry, self._block_size)
        except Exception as exc:
            raise self._errno(exc) from None

    def readdir_with_offset(self, path: str, offset: int, fh: int) -> Iterator[tuple[str, Attributes, int]]:
        """``(name, attributes, offset of the next entry)`` from ``offset`` on (mfusepy's own readdir; the
        class :func:`fuse_class` makes reads :attr:`directories` itself)."""
        for name, attrs, following in self.directories.entries(_encode(path), offset):
            yield _decode(name), attrs, following

    # -- files -------------------------------------------------------------------------------------

    def _reader(self, path: bytes) -> _File:
        try:
            return _File(self._fs.open(path))
        except Exception as exc:
            raise self._errno(exc) from None

    def open(self, path: str, flags: int) -> int:
        if flags & _WRITE_FLAGS:
            raise _error(errno.EROFS)
        if self._no_open:  # "opened": the kernel will not ask again, nor release
            raise _error(errno.ENOSYS)
        handle = self._reader(_encode(path))
        with self._lock:
            number = next(self._numbers)
            self._handles[number] = handle
        return number

    def _by_path(self, path: bytes) -> _File:
        with self._lock:
            handle = self._files.get(path)
            if handle is not None:
                self._files.move_to_end(path)
                return handle
        handle = self._reader(path)
        with self._lock:
            self._files[path] = handle
            while len(self._files) > OPEN_FILES:
                self._files.popitem(last=False)[1].file.close()
        return handle

    def readinto(self, path: str | None, fh: int, view: memoryview, offset: int) -> int:
        """Fill ``view`` from ``offset`` of the file (open handle ``fh``, or by ``path``); the byte count."""
        handle = self._handles.get(fh) if fh else None
        if handle is None:
            if path is None:
                raise _error(errno.EBADF)
            handle = self._by_path(_encode(path))
        try:
            return handle.readinto(view, offset)
        except ValueError:  # closed meanwhile (dropped from the readers kept by path): open it again
            return self._reader(_encode(path)).readinto(view, offset) if path is not None else 0
        except Exception as exc:
            raise self._errno(exc) from None

    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        buf = bytearray(size)
        return bytes(buf[: self.readinto(path, fh, memoryview(buf), offset)])

    def release(self, path: str | None, fh: int) -> int:
        with self._lock:
            handle = self._handles.pop(fh, None)
        if handle is not None:
            handle.file.close()
        return 0

    # -- every change: EROFS --------------------------------------------------------------------------

    def _refuse(self, *args: Any) -> int:
        raise _error(errno.EROFS)

    chmod = chown = create = link = mkdir = mknod = rename = rmdir = symlink = truncate = _refuse
    unlink = utimens = write = setxattr = removexattr = fallocate = _refuse
