"""Walking a directory tree, for :meth:`FileSystem.walk <ubdcow.fs.filesystem.FileSystem.walk>` and
``scandir``: a directory's entries with their inodes read in batches, and the walk below a directory
(a stack of directory iterators, depth first; the directories seen kept as inode numbers, a directory
reached twice being a corrupt filesystem; at most :data:`MAX_DEPTH` levels).

It raises the internal :class:`~ubdcow.fs.volume.Corrupt`, which the filesystem object turns into its
one-line errors (the ``error`` callable a :class:`Walk` is given).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from ..errors import FilesystemError
from .dirs import iter_entries
from .inodes import Inode, InodeTable
from .records import FileStat, join
from .volume import Corrupt, Volume

__all__ = ["MAX_DEPTH", "WALK_BATCH", "Listing", "Walk", "children"]

#: the deepest a walk goes (a path the kernel can name has at most 2048 components)
MAX_DEPTH = 2048
#: entries whose inodes a walk reads in one batch
WALK_BATCH = 256

#: (stat, path) of each entry of a directory
Listing = Iterator[tuple[FileStat, bytes]]


def children(volume: Volume, inodes: InodeTable, inode: Inode, where: bytes,
             stat: Callable[[bytes, Inode], FileStat]) -> Listing:  # fmt: skip
    """(stat, path) of each entry of the directory ``inode`` at ``where``; inodes read in batches of about
    :data:`WALK_BATCH`; ``stat(path, inode)`` makes each entry's :class:`FileStat`."""
    pending: list[tuple[bytes, int, int]] = []
    for chunk in iter_entries(volume, inode):
        pending += chunk
        if len(pending) >= WALK_BATCH:
            yield from _batch(inodes, pending, where, stat)
            pending = []
    yield from _batch(inodes, pending, where, stat)


def _batch(
    inodes: InodeTable, batch: list[tuple[bytes, int, int]], where: bytes, stat: Callable[[bytes, Inode], FileStat]
) -> Listing:
    try:
        found = inodes.get_many([ino for _, ino, _ in batch])
    except Corrupt:  # name the entry: find it one by one
        for name, ino, _ in batch:
            try:
                inodes.get(ino)
            except Corrupt as exc:
                exc.path = join(where, name)
                raise
        raise
    for (name, _, _), inode in zip(batch, found, strict=True):
        path = join(where, name)
        try:
            yield stat(path, inode), path
        except Corrupt as exc:
            exc.path = path
            raise


class Walk:
    """One walk below a directory (see :meth:`FileSystem.walk <ubdcow.fs.filesystem.FileSystem.walk>` for
    ``onerror``, ``sort`` and ``descend``). ``listing(directory, path)`` gives a directory's entries,
    ``get`` an inode by number, ``error(path, exc)`` the one-line error for an internal ``Corrupt``."""

    def __init__(
        self,
        listing: Callable[[Inode, bytes], Listing],
        get: Callable[[int], Inode],
        error: Callable[[bytes, Corrupt], FilesystemError],
        *,
        onerror: Callable[[FilesystemError], object] | None,
        sort: bool,
        descend: Callable[[FileStat], bool] | None,
    ) -> None:
        self.children = listing
        self.get = get
        self.error = error
        self.onerror = onerror
        self.sort = sort
        self.descend = descend

    def report(self, where: bytes, exc: Corrupt) -> None:
        error = self.error(where, exc)
        if self.onerror is None:
            raise error from None
        self.onerror(error)

    def listing(self, directory: Inode, where: bytes) -> Listing:
        found = self.children(directory, where)
        if not self.sort:
            return found
        entries: list[tuple[FileStat, bytes]] = []
        try:
            entries.extend(found)
        except Corrupt as exc:
            self.report(where, exc)
        entries.sort(key=lambda entry: entry[1])
        return iter(entries)

    def below(self, top: Inode, raw: bytes) -> Iterator[FileStat]:
        """Every entry below the directory ``top`` (at path ``raw``), depth first."""
        seen = {top.ino}
        try:
            stack: list[tuple[bytes, Listing]] = [(raw, self.listing(top, raw))]
        except Corrupt as exc:
            raise self.error(raw, exc) from None
        while stack:
            where, entries = stack[-1]
            try:
                stat, path = next(entries)
            except StopIteration:
                stack.pop()
                continue
            except Corrupt as exc:
                stack.pop()
                self.report(where, exc)
                continue
            yield stat
            if self.enters(stat, path, seen, len(stack)):
                seen.add(stat.inode)
                try:
                    child = self.get(stat.inode)
                    stack.append((path, self.listing(child, path)))
                except Corrupt as exc:
                    self.report(path, exc)
                    continue

    def enters(self, stat: FileStat, path: bytes, seen: set[int], depth: int) -> bool:
        """Whether the walk enters ``stat`` (just yielded, ``depth`` levels down): a directory it may
        enter (``descend``), not seen before and not too deep (those two are reported)."""
        enter = stat.type == "dir" and (self.descend is None or self.descend(stat))
        if enter and stat.inode in seen:
            self.report(path, Corrupt("a directory reached twice (a directory hard link or a loop)"))
            enter = False
        elif enter and depth >= MAX_DEPTH:
            self.report(path, Corrupt(f"directories nested deeper than {MAX_DEPTH} levels"))
            enter = False
        return enter
