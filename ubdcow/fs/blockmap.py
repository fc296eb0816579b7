"""Where a file's blocks are: extent trees (ext4) and direct/indirect block maps (ext2/3), as runs.

A run is ``(logical, physical, length, uninit)``: ``length`` blocks of the file from block ``logical``
live at ``physical`` on the volume; ``uninit`` extents read as zeros. Holes are the gaps between runs.
Both maps answer :meth:`BlockMap.runs` for a window of logical blocks and touch only the tree nodes
that cover it, so the work is bounded by the window, whatever the file claims. Every node is checked:
extent magic, depth (at most 5, exactly one less at each level), entry counts, increasing and
non-overlapping logical ranges that stay inside their parent's, block numbers inside the filesystem and
clear of its metadata.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from . import layout as L
from .inodes import Inode
from .volume import Corrupt, Volume

__all__ = ["Run", "BlockMap", "ExtentMap", "IndirectMap", "block_map"]

Run = tuple[int, int, int, bool]
_LIMIT = 1 << 32  # logical block numbers are 32-bit


class BlockMap:
    """The runs of one inode's content; see the module docstring."""

    def runs(self, first: int, count: int) -> Iterator[Run]:
        """The mapped runs that meet blocks ``first..first+count-1``, clipped to them, in logical order."""
        raise NotImplementedError


class ExtentMap(BlockMap):
    """An extent tree, its root in the inode's i_block."""

    def __init__(self, volume: Volume, inode: Inode) -> None:
        self.volume = volume
        self.ino = inode.ino
        self.root = inode.i_block

    def runs(self, first: int, count: int) -> Iterator[Run]:
        end = min(first + count, _LIMIT)
        if first < end:
            yield from self._node(self.root, None, 0, _LIMIT, first, end)

    def _node(self, node: bytes, depth: int | None, lo: int, hi: int, first: int, end: int) -> Iterator[Run]:
        magic, entries, most, level = L.EXTENT_HEADER_HEAD.unpack_from(node, 0)
        where = "the extent tree root" if depth is None else f"an extent tree node at depth {level}"
        if magic != L.EXTENT_MAGIC:
            raise Corrupt(f"{where} has a bad magic number {magic:#06x}")
        if level > L.MAX_EXTENT_DEPTH or (depth is not None and level != depth):
            expected = "at most 5" if depth is None else str(depth)
            raise Corrupt(f"{where} says depth {level} (expected {expected}): a loop or a corrupt tree")
        room = (len(node) - 12) // L.EXTENT_ENTRY_SIZE
        if entries > most or most > room or most == 0:
            raise Corrupt(f"{where} holds {entries} of {most} entries (room for {room})")
        body = node[12 : 12 + entries * L.EXTENT_ENTRY_SIZE]
        if level == 0:
            yield from self._leaf(L.EXTENT_LEAF_ENTRY.iter_unpack(body), lo, hi, first, end)
        else:
            yield from self._index(list(L.EXTENT_INDEX_ENTRY.iter_unpack(body)), level, lo, hi, first, end)

    def _leaf(self, extents: Iterator[tuple[int, ...]], lo: int, hi: int, first: int, end: int) -> Iterator[Run]:
        """The extents of a leaf that meet the window; each checked up to the window's end."""
        done = lo  # extents are in order and do not overlap: each starts at or after where the last ended
        for start, raw_len, phys_hi, phys_lo in extents:
            uninit = raw_len > L.EXTENT_INIT_MAX_LEN
            length = raw_len - L.EXTENT_INIT_MAX_LEN if uninit else raw_len
            if length == 0:
                raise Corrupt(f"the extent at logical block {start} has length 0")
            if start < done or start + length > hi:
                raise Corrupt(f"the extent at logical block {start} overlaps another or lies outside its "
                              f"index's range (logical blocks {lo}..{hi - 1})")  # fmt: skip
            done = start + length
            if done <= first:
                continue
            if start >= end:
                return
            physical = phys_hi << 32 | phys_lo
            self.volume.check_data(physical, length, f"the extent at logical block {start}")
            cut = max(first - start, 0)
            yield start + cut, physical + cut, min(done, end) - start - cut, uninit

    def _index(
        self, entries: list[tuple[int, ...]], level: int, lo: int, hi: int, first: int, end: int
    ) -> Iterator[Run]:
        """The children of an index node that meet the window, each with its range of logical blocks."""
        for k, (start, child_lo, child_hi) in enumerate(entries):
            stop = entries[k + 1][0] if k + 1 < len(entries) else hi
            if stop <= start or start >= hi:
                raise Corrupt(f"extent index entries are out of order or outside their parent's range "
                              f"(logical block {start})")  # fmt: skip
            if stop <= first:
                continue
            if start >= end:
                return
            child = child_hi << 32 | child_lo
            self.volume.check_data(child, 1, f"the extent index at logical block {start}")
            data = self.volume.block(child, "an extent tree node")
            yield from self._node(data, level - 1, max(start, lo), stop, first, end)


class IndirectMap(BlockMap):
    """ext2/ext3 block maps: 12 direct pointers, then an indirect, a double and a triple indirect block."""

    def __init__(self, volume: Volume, inode: Inode) -> None:
        self.volume = volume
        self.ino = inode.ino
        self.pointers = struct.unpack("<15I", inode.i_block)
        self.per = volume.block_size // 4
        self._unpack = struct.Struct(f"<{self.per}I").unpack

    def runs(self, first: int, count: int) -> Iterator[Run]:
        end = first + count
        yield from self._pointers(self.pointers[:12], 0, first, end)
        base = 12
        for level in (1, 2, 3):
            span = self.per**level
            if end <= base:
                return
            if first < base + span:
                yield from self._tree(self.pointers[11 + level], level, base, first, end)
            base += span

    def _tree(self, block: int, level: int, base: int, first: int, end: int) -> Iterator[Run]:
        """The blocks under indirect block ``block`` (``level`` levels down), which starts at logical ``base``."""
        if block == 0:
            return  # a hole covering the whole subtree
        self.volume.check_data(block, 1, f"the indirect block for logical block {base}")
        pointers = self._unpack(self.volume.block(block, "an indirect block"))
        if level == 1:
            yield from self._pointers(pointers, base, first, end)
            return
        span = self.per ** (level - 1)
        lo = max(first - base, 0) // span
        hi = min(-(-(end - base) // span), self.per)
        for k in range(lo, hi):
            yield from self._tree(pointers[k], level - 1, base + k * span, first, end)

    def _pointers(self, pointers: tuple[int, ...], base: int, first: int, end: int) -> Iterator[Run]:
        """Runs of consecutive block pointers for logical blocks ``base...``, clipped to ``first..end-1``."""
        start = physical = length = 0
        for k in range(max(first - base, 0), min(end - base, len(pointers))):
            p = pointers[k]
            if length and p == physical + length:
                length += 1
                continue
            if length:
                self.volume.check_data(physical, length, f"the block pointer for logical block {start}")
                yield start, physical, length, False
            start, physical, length = base + k, p, 1 if p else 0
        if length:
            self.volume.check_data(physical, length, f"the block pointer for logical block {start}")
            yield start, physical, length, False


def block_map(volume: Volume, inode: Inode) -> BlockMap:
    """The block map of an inode that is not inline: its extent tree or its indirect blocks."""
    if inode.has(L.FL_EXTENTS):
        return ExtentMap(volume, inode)
    return IndirectMap(volume, inode)
