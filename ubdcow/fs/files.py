"""File content: inline data or mapped runs read straight into the caller's buffer, holes as zeros.

:class:`Content` reads any byte range of an inode's content (regular files, slow symlinks, ea_inode
values); :class:`FsFile` is the read-only ``io.RawIOBase`` that ``FileSystem.open`` returns.
Contiguous runs are read with one ``preadinto`` each, into the caller's buffer; holes and
uninitialized extents are zero-filled; the journal's replayed blocks are copied in where they apply.
"""

from __future__ import annotations

import io
import threading
from typing import Any

import numpy as np

from . import layout as L
from .blockmap import BlockMap, Run, block_map
from .inodes import Inode
from .volume import Corrupt, Volume
from .xattrs import inline_data

__all__ = ["Content", "FsFile", "symlink_target"]

#: logical blocks mapped at once (the runs of one window are kept for the next read)
WINDOW_BLOCKS = 8192


def _zero(view: memoryview, start: int, stop: int) -> None:
    if stop > start:
        np.frombuffer(view, dtype=np.uint8)[start:stop] = 0


class Content:
    """The bytes of one inode's content (not thread-safe: one per reader, like a file position)."""

    def __init__(self, volume: Volume, inode: Inode) -> None:
        geo = volume.geo
        assert geo is not None
        self.volume = volume
        self.size = inode.size
        self.inline: bytes | None = None
        self.map: BlockMap | None = None
        self._window: tuple[int, int, list[Run]] = (0, 0, [])
        if inode.has(L.FL_INLINE_DATA):
            data = inline_data(volume, inode)
            if inode.size > len(data):
                raise Corrupt(f"inline data holds {len(data)} bytes but the size is {inode.size}")
            self.inline = data[: inode.size]
        else:
            if inode.size > geo.max_file_blocks(inode.has(L.FL_EXTENTS)) * geo.block_size:
                raise Corrupt(f"size {inode.size} is larger than this block map can address")
            self.map = block_map(volume, inode)

    def _runs(self, first: int, count: int) -> list[Run]:
        """Runs meeting ``first..first+count-1``, adjacent ones merged, from the cached window if it covers them."""
        lo, hi, runs = self._window
        if not lo <= first or first + count > hi:
            assert self.map is not None
            lo, hi = first, first + max(count, WINDOW_BLOCKS)
            runs = []
            for run in self.map.runs(lo, hi - lo):
                if runs:
                    l0, p0, n0, u0 = runs[-1]
                    if l0 + n0 == run[0] and p0 + n0 == run[1] and u0 == run[3]:
                        runs[-1] = (l0, p0, n0 + run[2], u0)
                        continue
                runs.append(run)
            self._window = (lo, hi, runs)
        end = first + count
        return [r for r in runs if r[0] < end and r[0] + r[2] > first]

    def readinto(self, view: memoryview, offset: int) -> int:
        """Fill ``view`` with the content from ``offset``; returns the byte count (short at the end)."""
        n = max(0, min(len(view), self.size - offset))
        if n == 0:
            return 0
        view = view[:n]
        if self.inline is not None:
            view[:] = self.inline[offset : offset + n]
            return n
        bs = self.volume.block_size
        first, last = offset // bs, (offset + n - 1) // bs
        pos, at, end = 0, offset, offset + n
        for logical, physical, length, uninit in self._runs(first, last - first + 1):
            start = logical * bs
            if start > at:
                _zero(view, pos, pos + start - at)
                pos, at = pos + start - at, start
            take = min(start + length * bs, end) - at
            if uninit:
                _zero(view, pos, pos + take)
            else:
                skip = at - start
                self.volume.readinto_blocks(view[pos : pos + take], physical + skip // bs, skip % bs)
            pos, at = pos + take, at + take
        _zero(view, pos, n)
        return n

    def read(self, length: int, offset: int = 0) -> bytes:
        buf = bytearray(max(0, min(length, self.size - offset)))
        self.readinto(memoryview(buf), offset)
        return bytes(buf)


def _is_fast_symlink(inode: Inode, block_size: int) -> bool:
    """The kernel's rule: no blocks but an xattr block's, unless ea_inode-flagged (then the size decides)."""
    if inode.has(L.FL_EA_INODE):
        return 0 < inode.size < L.I_BLOCK_SIZE
    if inode.has(L.FL_INLINE_DATA):
        return False
    return inode.blocks - (block_size >> 9 if inode.file_acl else 0) == 0


def symlink_target(volume: Volume, inode: Inode) -> bytes:
    """A symbolic link's target: in i_block (fast), inline, or in its first block (slow); up to a NUL."""
    bs = volume.block_size
    if _is_fast_symlink(inode, bs):
        if inode.size >= L.I_BLOCK_SIZE:
            raise Corrupt(f"a fast symbolic link claims {inode.size} bytes (at most 59 fit)")
        target = inode.i_block[: inode.size]
    else:
        if inode.size >= bs:
            raise Corrupt(f"a symbolic link claims {inode.size} bytes (at most {bs - 1})")
        target = Content(volume, inode).read(inode.size)
    return target.split(b"\0", 1)[0]


class FsFile(io.RawIOBase):
    """A file inside the filesystem, read-only: ``read``, ``readinto``, ``seek``, ``tell``; ``size``, ``name``.

    One object per reader (it has a position); the filesystem under it may be shared between threads.
    """

    def __init__(self, content: Content, name: Any, on_error: Any) -> None:
        super().__init__()
        self._content = content
        self._pos = 0
        self._lock = threading.Lock()
        self._on_error = on_error
        self.name = name
        self.size = content.size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        raise io.UnsupportedOperation("the filesystem reader is read-only")

    def truncate(self, size: int | None = None) -> int:
        raise io.UnsupportedOperation("the filesystem reader is read-only")

    def readinto(self, buffer: Any) -> int:
        self._checkClosed()
        view = memoryview(buffer).cast("B")
        with self._lock:
            try:
                n = self._content.readinto(view, self._pos)
            except Corrupt as exc:
                raise self._on_error(exc) from None
            self._pos += n
            return n

    def readall(self) -> bytes:
        self._checkClosed()
        with self._lock:
            pos = self._pos
        return self.read(max(0, self.size - pos))

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._checkClosed()
        with self._lock:
            base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}.get(whence)
            if base is None:
                raise ValueError(f"invalid whence {whence}")
            if base + offset < 0:
                raise ValueError("negative seek position")
            self._pos = base + offset
            return self._pos

    def tell(self) -> int:
        self._checkClosed()
        return self._pos
