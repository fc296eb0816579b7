"""The filesystem object: paths, lookups, stat, directories, walks, files, symlinks and extended attributes.

Paths are absolute inside the filesystem (a relative path is taken from its root), bytes or str; they
are never resolved against the host. Symbolic links are followed inside the filesystem only (an
absolute target starts again at its root), at most 40 per lookup.

Errors are :class:`~ubdcow.errors.UbdCowError` subclasses whose message is one line::

    <disk>: [partition N: ]<path inside>: <problem>

for example ``lab/pc1.disk: /etc/passwd: the extent at logical block 0 points at blocks 9..9,
which overlap filesystem metadata (blocks 0..40)``. Paths in messages have undecodable bytes and
control characters escaped. :class:`~ubdcow.errors.CorruptFilesystemError` is an inconsistency,
:class:`~ubdcow.errors.UnsupportedFilesystemError` a valid thing this reader refuses (an encrypted
inode), :class:`~ubdcow.errors.FsFileNotFoundError` (also a ``FileNotFoundError``),
:class:`~ubdcow.errors.FsNotADirectoryError` and :class:`~ubdcow.errors.FsIsADirectoryError` are
about the path asked, and :class:`~ubdcow.errors.FsPathError` covers the rest (a symlink loop,
readlink of a non-link).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import (
    CorruptFilesystemError,
    FilesystemError,
    FsFileNotFoundError,
    FsIsADirectoryError,
    FsNotADirectoryError,
    FsPathError,
    UnsupportedFilesystemError,
)
from . import layout as L
from .dirs import iter_entries
from .files import Content, FsFile, symlink_target
from .inodes import Inode, InodeTable
from .records import FileStat, PathLike, like, show, to_bytes
from .volume import LRU, Corrupt, Unsupported, Volume
from .walk import MAX_DEPTH, Listing, Walk, children
from .xattrs import acl_to_xattr, entries, full_name

__all__ = ["FileSystem", "MAX_SYMLINKS", "MAX_DEPTH"]

MAX_SYMLINKS = 40
#: directory entries kept in the lookup cache (name -> inode tables of recently searched directories)
NAME_CACHE_ENTRIES = 1 << 16
_ACLS = (2, 3)


class FileSystem:
    """An ext2/ext3/ext4 filesystem opened read-only; see the module docstring and docs/api.md.

    A context manager; safe to share between threads for reading (the caches are locked; each
    :class:`~ubdcow.fs.files.FsFile` has its own position).
    """

    def __init__(
        self,
        volume: Volume,
        *,
        where: str = "whole disk",
        partition: int | None = None,
        needs_recovery: bool = False,
        journal_transactions: int = 0,
        closer: Callable[[], None] | None = None,
        files: dict[str, os.stat_result] | None = None,
    ) -> None:
        geo = volume.geo
        assert geo is not None
        self._volume = volume
        self._inodes = InodeTable(volume)
        self._names = LRU(NAME_CACHE_ENTRIES)
        self._closer = closer
        self._closed = False
        self._prefix = f"partition {partition}: " if partition is not None else ""
        #: the disk's path, as given
        self.name = volume.name
        #: where the filesystem lies on the disk ("whole disk", "partition 1 (MBR type 0x83)", ...)
        self.where = where
        self.block_size = geo.block_size
        self.size = geo.blocks_count * geo.block_size
        self.inodes_count = geo.inodes_count
        self.label = geo.label
        self.uuid = geo.uuid
        self.features = geo.features
        self.revision = geo.rev_level
        #: the journal still holds transactions that were not replayed (opened with journal=False)
        self.needs_recovery = needs_recovery
        #: transactions replayed from the journal when it was opened
        self.journal_transactions = journal_transactions
        #: the files the disk's content comes from ("COW file" and "backing file", or "image"), as
        #: ``os.stat`` saw them when it was opened (empty for ``open_volume``): for outputs' checks
        self.files = dict(files or {})

    # -- life --------------------------------------------------------------------------------------

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._closer is not None:
                self._closer()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> FileSystem:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<FileSystem {self.name!r} {self.where} {self.size} bytes{' closed' if self._closed else ''}>"

    # -- errors ------------------------------------------------------------------------------------

    def _error(self, path: bytes | None, exc: Corrupt) -> FilesystemError:
        where = exc.path if exc.path is not None else path
        message = self._prefix + (exc.problem if where is None else f"{show(where)}: {exc.problem}")
        cls = UnsupportedFilesystemError if isinstance(exc, Unsupported) else CorruptFilesystemError
        return cls(self.name, message)

    def _path_error(self, cls: type[FsPathError], path: bytes, problem: str) -> FsPathError:
        return cls(self.name, f"{self._prefix}{show(path)}: {problem}")

    @contextmanager
    def _guard(self, path: bytes) -> Iterator[None]:
        if self._closed:
            raise ValueError("I/O operation on a closed filesystem")
        try:
            yield
        except Corrupt as exc:
            raise self._error(path, exc) from None

    # -- lookups -----------------------------------------------------------------------------------

    def _lookup(self, directory: Inode, name: bytes) -> int | None:
        """The inode number ``name`` names in ``directory`` (a table of small directories is cached)."""
        names: dict[bytes, int] | None = self._names.get(directory.ino)
        if names is not None:
            return names.get(name)
        table: dict[bytes, int] | None = {}
        found = None
        for chunk in iter_entries(self._volume, self._plain(directory)):
            for entry, ino, _ in chunk:
                if found is None and entry == name:
                    found = ino
                if table is not None:
                    table.setdefault(entry, ino)
                    if len(table) > NAME_CACHE_ENTRIES // 8:
                        table = None
            if table is None and found is not None:
                return found
        if table is not None:
            self._names.put(directory.ino, table, len(table) + 1)
        return found

    def _resolve(self, path: bytes, follow: bool) -> Inode:
        """The inode ``path`` names; a final symlink is followed when ``follow`` (or a trailing slash)."""
        get = self._inodes.get
        trailing = path.endswith(b"/") and path.strip(b"/") != b""
        follow = follow or trailing
        parts = deque(path.split(b"/"))
        stack = [get(L.ROOT_INO)]
        links = 0
        while parts:
            part = parts.popleft()
            if part in (b"", b"."):
                continue
            if part == b"..":
                if len(stack) > 1:
                    stack.pop()
                continue
            here = stack[-1]
            if not here.is_dir:
                raise self._path_error(FsNotADirectoryError, path, "not a directory")
            ino = self._lookup(here, part)
            if ino is None:
                raise self._path_error(FsFileNotFoundError, path, "no such file or directory")
            inode = get(ino)
            if inode.is_symlink and (follow or any(p not in (b"", b".") for p in parts)):
                links += 1
                if links > MAX_SYMLINKS:
                    raise self._path_error(FsPathError, path, f"more than {MAX_SYMLINKS} symbolic links (a loop?)")
                target = self._target(inode)
                if not target:
                    raise self._path_error(FsFileNotFoundError, path, "a symbolic link on the way is empty")
                if target.startswith(b"/"):
                    del stack[1:]
                parts.extendleft(reversed(target.split(b"/")))
                continue
            stack.append(inode)
        if trailing and not stack[-1].is_dir:
            raise self._path_error(FsNotADirectoryError, path, "not a directory")
        return stack[-1]

    def _plain(self, inode: Inode) -> Inode:
        """``inode``, unless reading it needs what this reader refuses (encryption) or it is corrupt."""
        if inode.has(L.FL_ENCRYPT):
            raise Unsupported(f"inode {inode.ino} is encrypted (fscrypt): this reader does not decrypt")
        if inode.has(L.FL_CASEFOLD) and inode.is_dir:
            raise Corrupt(f"inode {inode.ino} is a casefolded directory on a filesystem without casefold")
        return inode

    def _target(self, inode: Inode) -> bytes:
        return symlink_target(self._volume, self._plain(inode))

    def _stat(self, out: Any, inode: Inode, as_str: bool) -> FileStat:
        kind = inode.type
        target = like(self._target(inode), as_str) if kind == "symlink" else None
        blocks = inode.blocks
        if kind == "file" and inode.flags & L.FL_INLINE_DATA:
            blocks += (inode.size + 511) >> 9  # as the kernel's stat: inline data counts
        return FileStat(out, kind, inode.mode & 0o7777, inode.uid, inode.gid, inode.size, inode.links,
                        inode.atime_ns, inode.mtime_ns, inode.ctime_ns, inode.crtime_ns, inode.ino, inode.rdev,
                        target, blocks, inode.flags, inode.generation)  # fmt: skip

    # -- the API -----------------------------------------------------------------------------------

    def stat(self, path: PathLike, *, follow_symlinks: bool = False) -> FileStat:
        """The entry ``path`` names, like ``os.lstat`` (``follow_symlinks=True``: like ``os.stat``)."""
        raw, as_str = to_bytes(path)
        with self._guard(raw):
            return self._stat(like(raw, as_str), self._resolve(raw, follow_symlinks), as_str)

    def exists(self, path: PathLike) -> bool:
        """Whether ``path`` names an entry (a dangling symlink exists; a symlink loop on the way does not)."""
        try:
            self.stat(path)
        except FsPathError:
            return False
        return True

    def _directory(self, raw: bytes) -> Inode:
        inode = self._resolve(raw, True)
        if not inode.is_dir:
            raise self._path_error(FsNotADirectoryError, raw, "not a directory")
        return self._plain(inode)

    def listdir(self, path: PathLike = "/") -> list[Any]:
        """The names in directory ``path`` (without ``.`` and ``..``), in on-disk order."""
        raw, as_str = to_bytes(path)
        with self._guard(raw):
            inode = self._directory(raw)
            return [like(name, as_str) for chunk in iter_entries(self._volume, inode) for name, _, _ in chunk]

    def scandir(self, path: PathLike = "/") -> Iterator[FileStat]:
        """A :class:`FileStat` for each entry of directory ``path``, streamed, inodes read in batches."""
        raw, as_str = to_bytes(path)
        with self._guard(raw):
            inode = self._directory(raw)
        try:
            for stat, _ in self._children(inode, raw, as_str):
                yield stat
        except Corrupt as exc:
            raise self._error(raw, exc) from None

    def walk(
        self,
        top: PathLike = "/",
        *,
        onerror: Callable[[FilesystemError], object] | None = None,
        sort: bool = False,
        descend: Callable[[FileStat], bool] | None = None,
    ) -> Iterator[FileStat]:
        """Every entry under ``top``, ``top`` first, depth first (a directory, then its content), streamed.

        Symlinks are not followed (``top`` is). A problem in a directory raises, or, with ``onerror``,
        is handed to it and the walk goes on without that directory's remaining entries. A directory
        reached twice (a directory hard link, a loop) is a corrupt filesystem: the directories seen are
        kept as a set of inode numbers, the only state a walk keeps besides one batch per level.

        ``sort``: each directory's entries come in byte order of their names, so the whole walk is in
        order of paths compared name by name (a directory's content right after it); a directory is
        then read whole before its first entry comes (the walk keeps the entries of one directory per
        level; with ``onerror``, a problem met reading it is reported first, then the entries read
        before it come). ``descend(stat)``: whether to enter a directory below ``top`` (default: all);
        it is asked when the walk goes on after yielding that directory, so the caller has seen it.
        """
        raw, as_str = to_bytes(top)
        with self._guard(raw):
            inode = self._resolve(raw, True)
            first = self._stat(like(raw, as_str), inode, as_str)
        yield first
        if not inode.is_dir:
            return
        walk = Walk(lambda directory, where: self._children(directory, where, as_str), self._inodes.get, self._error,
                    onerror=onerror, sort=sort, descend=descend)  # fmt: skip
        yield from walk.below(inode, raw)

    def _children(self, inode: Inode, where: bytes, as_str: bool) -> Listing:
        """(stat, path) of each entry of a directory (:func:`ubdcow.fs.walk.children`)."""
        self._plain(inode)
        yield from children(self._volume, self._inodes, inode, where,
                            lambda path, entry: self._stat(like(path, as_str), entry, as_str))  # fmt: skip

    def _entry(self, path: PathLike | FileStat, follow: bool) -> tuple[bytes, bool, Inode]:
        """(path, as_str, inode): ``path`` looked up, or a :class:`FileStat`'s own inode (no lookup)."""
        if isinstance(path, FileStat):
            raw, as_str = to_bytes(path.path)
            return raw, as_str, self._inodes.get(path.inode)
        raw, as_str = to_bytes(path)
        return raw, as_str, self._resolve(raw, follow)

    def _content(self, raw: bytes, inode: Inode) -> Content:
        if inode.is_dir:
            raise self._path_error(FsIsADirectoryError, raw, "is a directory")
        if inode.type != "file":
            raise self._path_error(FsPathError, raw, f"not a regular file (a {inode.type})")
        return Content(self._volume, self._plain(inode))

    def open(self, path: PathLike | FileStat) -> FsFile:
        """The regular file ``path`` (symlinks followed) as a read-only ``io.RawIOBase``.

        A :class:`FileStat` this filesystem gave (``walk``, ``scandir``, ``stat``) names its own entry,
        by inode: nothing is looked up again.
        """
        raw = to_bytes(path.path if isinstance(path, FileStat) else path)[0]
        with self._guard(raw):
            raw, as_str, inode = self._entry(path, True)
            content = self._content(raw, inode)
        return FsFile(content, like(raw, as_str), lambda exc: self._error(raw, exc))

    def read_bytes(self, path: PathLike) -> bytes:
        """The whole content of the regular file ``path``."""
        raw, _ = to_bytes(path)
        with self._guard(raw):
            content = self._content(raw, self._resolve(raw, True))
            return content.read(content.size)

    def readlink(self, path: PathLike) -> Any:
        """The target of the symbolic link ``path`` (bytes or str, as ``path``)."""
        raw, as_str = to_bytes(path)
        with self._guard(raw):
            inode = self._resolve(raw, False)
            if not inode.is_symlink:
                raise self._path_error(FsPathError, raw, "not a symbolic link")
            return like(self._target(inode), as_str)

    def xattrs(self, path: PathLike | FileStat, *, follow_symlinks: bool = False) -> dict[str, bytes]:
        """The extended attributes the kernel lists for ``path``: name (str, surrogateescape) -> value.

        POSIX ACLs come in the form ``getxattr`` gives; ``system.data`` (inline data) is not listed.
        A :class:`FileStat` names its own entry (as for :meth:`open`).
        """
        raw = to_bytes(path.path if isinstance(path, FileStat) else path)[0]
        with self._guard(raw):
            raw, _, inode = self._entry(path, follow_symlinks)
            return self.inode_xattrs(inode)

    # -- by inode (for tools that walk the inode tables themselves: ubdcow.changes) -------------------
    # These raise the internal Corrupt (ubdcow.fs.volume), without the disk's name.

    @property
    def volume(self) -> Volume:
        """The volume the filesystem reads (blocks, the journal's replayed blocks)."""
        return self._volume

    @property
    def inodes(self) -> InodeTable:
        """The inode tables."""
        return self._inodes

    def inode_xattrs(self, inode: Inode) -> dict[str, bytes]:
        """What :meth:`xattrs` gives, for an inode."""
        out: dict[str, bytes] = {}
        for entry in entries(self._volume, inode):
            name = full_name(entry)
            if name is None:
                continue
            value = entry.value if entry.value is not None else self._ea_inode(entry.inum, entry.size)
            if entry.prefix in _ACLS:
                value = acl_to_xattr(value)
            out.setdefault(name.decode("utf-8", "surrogateescape"), value)
        return out

    def inode_target(self, inode: Inode) -> bytes:
        """A symbolic link's target, for an inode."""
        return self._target(inode)

    def inode_entries(self, inode: Inode) -> Iterator[list[tuple[bytes, int, int]]]:
        """A directory's entries ``(name, inode, file type)``, a block or a chunk of blocks at a time."""
        return iter_entries(self._volume, self._plain(inode))

    def inode_content(self, inode: Inode) -> Content:
        """A regular file's content (or a slow symlink's), for an inode."""
        return Content(self._volume, self._plain(inode))

    def error(self, exc: Corrupt, path: bytes | None = None) -> FilesystemError:
        """The one-line error for an internal :class:`Corrupt` about ``path``."""
        return self._error(path, exc)

    @contextmanager
    def reading(self, path: bytes | None = None) -> Iterator[None]:
        """Inside it, an internal :class:`Corrupt` becomes this filesystem's one-line error about ``path``."""
        try:
            yield
        except Corrupt as exc:
            raise self._error(path, exc) from None

    def _ea_inode(self, ino: int, size: int) -> bytes:
        inode = self._inodes.get(ino)
        if not inode.has(L.FL_EA_INODE) or inode.type != "file":
            raise Corrupt(f"an extended attribute's value points at inode {ino}, which is not an ea_inode")
        if inode.size != size:
            raise Corrupt(f"ea_inode {ino} holds {inode.size} bytes, its attribute says {size}")
        return Content(self._volume, inode).read(size)
