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

from collections.abc import Iterator

import numpy as np

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
        magic, entries, most, level = (int(v) for v in np.frombuffer(node, L.EXTENT_HEADER_DTYPE, 1)[0].tolist())
        where = "the extent tree root" if depth is None else f"an extent tree node at depth {level}"
        if magic != L.EXTENT_MAGIC:
            raise Corrupt(f"{where} has a bad magic number {magic:#06x}")
        if level > L.MAX_EXTENT_DEPTH or (depth is not None and level != depth):
            expected = "at most 5" if depth is None else str(depth)
            raise Corrupt(f"{where} says depth {level} (expected {expected}): a loop or a corrupt tree")
        room = (len(node) - 12) // L.EXTENT_ENTRY_SIZE
        if entries > most or most > room or most == 0:
            raise Corrupt(f"{where} holds {entries} of {most} entries (room for {room})")
        if level == 0:
            yield from self._leaf(node, entries, lo, hi, first, end)
        else:
            yield from self._index(node, entries, level, lo, hi, first, end)

    def _leaf(self, node: bytes, entries: int, lo: int, hi: int, first: int, end: int) -> Iterator[Run]:
        ext = np.frombuffer(node, L.EXTENT_LEAF_DTYPE, entries, 12)
        start = ext["block"].astype(np.int64)
        raw_len = ext["len"].astype(np.int64)
        uninit = raw_len > L.EXTENT_INIT_MAX_LEN
        length = np.where(uninit, raw_len - L.EXTENT_INIT_MAX_LEN, raw_len)
        phys = ext["start_hi"].astype(np.int64) << 32 | ext["start_lo"].astype(np.int64)
        stop = start + length
        if entries:
            if (length == 0).any():
                raise Corrupt("an extent has length 0")
            if start[0] < lo or stop[-1] > hi or (start[1:] < stop[:-1]).any():
                raise Corrupt("extents overlap or lie outside their index's range (logical blocks)")
        i = int(np.searchsorted(stop, first, side="right"))
        j = int(np.searchsorted(start, end, side="left"))
        for s, p, n, u in zip(start[i:j].tolist(), phys[i:j].tolist(), length[i:j].tolist(),
                              uninit[i:j].tolist(), strict=True):  # fmt: skip
            self.volume.check_data(p, n, f"the extent at logical block {s}")
            cut = max(first - s, 0)
            yield s + cut, p + cut, min(s + n, end) - s - cut, u

    def _index(self, node: bytes, entries: int, level: int, lo: int, hi: int, first: int, end: int) -> Iterator[Run]:
        idx = np.frombuffer(node, L.EXTENT_INDEX_DTYPE, entries, 12)
        start = idx["block"].astype(np.int64)
        child = idx["leaf_hi"].astype(np.int64) << 32 | idx["leaf_lo"].astype(np.int64)
        if entries and ((start[1:] <= start[:-1]).any() or start[-1] >= hi):
            raise Corrupt("extent index entries are out of order or outside their parent's range")
        bounds = np.append(start[1:], hi)
        bs = self.volume.block_size
        i = max(int(np.searchsorted(start, first, side="right")) - 1, 0)
        for k in range(i, entries):
            s, e = max(int(start[k]), lo), int(bounds[k])
            if s >= end:
                break
            block = int(child[k])
            self.volume.check_data(block, 1, f"the extent index at logical block {s}")
            data = self.volume.block(block, "an extent tree node")
            if len(data) != bs:
                raise Corrupt(f"extent tree node {block} is short")
            yield from self._node(data, level - 1, s, e, first, end)


class IndirectMap(BlockMap):
    """ext2/ext3 block maps: 12 direct pointers, then an indirect, a double and a triple indirect block."""

    def __init__(self, volume: Volume, inode: Inode) -> None:
        self.volume = volume
        self.ino = inode.ino
        self.pointers = np.frombuffer(inode.i_block, "<u4").astype(np.int64)
        self.per = volume.block_size // 4

    def runs(self, first: int, count: int) -> Iterator[Run]:
        end = first + count
        yield from self._pointers(self.pointers[:12], 0, first, end)
        base = 12
        for level in (1, 2, 3):
            span = self.per**level
            if end <= base:
                return
            if first < base + span:
                yield from self._tree(int(self.pointers[11 + level]), level, base, first, end)
            base += span

    def _tree(self, block: int, level: int, base: int, first: int, end: int) -> Iterator[Run]:
        """The blocks under indirect block ``block`` (``level`` levels down), which starts at logical ``base``."""
        if block == 0:
            return  # a hole covering the whole subtree
        self.volume.check_data(block, 1, f"the indirect block for logical block {base}")
        pointers = np.frombuffer(self.volume.block(block, "an indirect block"), "<u4").astype(np.int64)
        if level == 1:
            yield from self._pointers(pointers, base, first, end)
            return
        span = self.per ** (level - 1)
        lo = max(first - base, 0) // span
        hi = min(-(-(end - base) // span), self.per)
        for k in range(lo, hi):
            yield from self._tree(int(pointers[k]), level - 1, base + k * span, first, end)

    def _pointers(self, pointers: np.ndarray, base: int, first: int, end: int) -> Iterator[Run]:
        """Runs from a list of block pointers for logical blocks ``base...``, clipped to ``first..end-1``."""
        lo, hi = max(first - base, 0), min(end - base, len(pointers))
        if lo >= hi:
            return
        window = pointers[lo:hi]
        mapped = window != 0
        if not mapped.any():
            return
        cont = np.zeros(len(window), dtype=bool)
        cont[1:] = mapped[1:] & mapped[:-1] & (window[1:] == window[:-1] + 1)
        breaks = np.flatnonzero(~cont)  # every run starts at one; so do the unmapped pointers
        starts = np.flatnonzero(mapped & ~cont)
        stops = np.append(breaks, len(window))[np.searchsorted(breaks, starts) + 1]
        for s, e in zip(starts.tolist(), stops.tolist(), strict=True):
            p = int(window[s])
            self.volume.check_data(p, e - s, f"the block pointer for logical block {base + lo + s}")
            yield base + lo + s, p, e - s, False


def block_map(volume: Volume, inode: Inode) -> BlockMap:
    """The block map of an inode that is not inline: its extent tree or its indirect blocks."""
    if inode.has(L.FL_EXTENTS):
        return ExtentMap(volume, inode)
    return IndirectMap(volume, inode)
