"""Block reads of one filesystem volume: bounds, a bounded cache, the journal's replayed blocks, group descriptors.

Everything below the :class:`~ubdcow.fs.filesystem.FileSystem` reads the disk through a :class:`Volume`:
it needs only a ``pread(length, offset) -> bytes`` callable (and uses ``preadinto`` for file content when
there is one). Problems found in the structures are raised as :class:`Corrupt` (a problem without the disk
or the path); the filesystem turns them into one-line :class:`~ubdcow.errors.CorruptFilesystemError`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from . import layout as L
from .superblock import Geometry

__all__ = ["Corrupt", "Unsupported", "LRU", "Volume", "Replay", "Pread", "PreadInto"]

Pread = Callable[[int, int], bytes]
PreadInto = Callable[[memoryview, int], int]
#: the system zone (metadata blocks file data must not use) is built only up to this many groups
SYSTEM_ZONE_MAX_GROUPS = 1 << 20


class Corrupt(Exception):
    """An inconsistency in the filesystem's structures: ``problem`` is one line, without the disk; ``path``
    (bytes, inside the filesystem) is filled in by whoever knows it best."""

    def __init__(self, problem: str, path: bytes | None = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.path = path


class Unsupported(Corrupt):
    """Something valid that this reader cannot read (an encrypted inode): refused, never guessed."""


class Replay(Protocol):
    """What the reader needs of a journal replay (``ubdcow.fs.journal.JournalReplay``)."""

    blocks: frozenset[int]

    def read(self, fs_block: int) -> bytes | None: ...


class LRU:
    """A dict with a budget (bytes, or any cost), least recently used out first; guarded by a lock."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0
        self.items: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self.lock:
            item = self.items.get(key)
            if item is None:
                return None
            self.items.move_to_end(key)
            return item[0]

    def put(self, key: Any, value: Any, cost: int) -> None:
        with self.lock:
            if key in self.items or cost > self.budget:
                return
            self.items[key] = (value, cost)
            self.used += cost
            while self.used > self.budget:
                _, (_, old_cost) = self.items.popitem(last=False)
                self.used -= old_cost

    def clear(self) -> None:
        with self.lock:
            self.items.clear()
            self.used = 0


class Volume:
    """The bytes of one filesystem: ``offset``/``size`` within the disk; blocks once the geometry is known."""

    def __init__(
        self,
        pread: Pread,
        offset: int,
        size: int,
        name: str,
        *,
        preadinto: PreadInto | None = None,
        cache_bytes: int = 32 << 20,
    ) -> None:
        self._pread = pread
        self._preadinto = preadinto
        self.offset = offset
        self.size = size
        self.name = name
        self.geo: Geometry | None = None
        self._cache = LRU(cache_bytes)
        self._descs = LRU(256 << 10)
        self._replay: Replay | None = None
        self._replayed = np.zeros(0, dtype=np.int64)
        self._zone: tuple[np.ndarray, np.ndarray] | None = None
        self._zone_lock = threading.Lock()

    # -- bytes ---------------------------------------------------------------------------------------

    def read(self, length: int, offset: int) -> bytes:
        """Exactly ``length`` bytes at ``offset`` in the volume (no journal: the superblock and the journal)."""
        if offset < 0 or offset + length > self.size:
            raise Corrupt(f"a read at byte {offset} of {length} bytes lies past the end of the volume")
        data = self._pread(length, self.offset + offset)
        if len(data) != length:
            raise Corrupt(f"short read at byte {offset}: the disk ends early (a truncated image?)")
        return data

    def _readinto(self, view: memoryview, offset: int) -> None:
        if self._preadinto is None:
            view[:] = self.read(len(view), offset)
            return
        if offset < 0 or offset + len(view) > self.size:
            raise Corrupt(f"a read at byte {offset} of {len(view)} bytes lies past the end of the volume")
        if self._preadinto(view, self.offset + offset) != len(view):
            raise Corrupt(f"short read at byte {offset}: the disk ends early (a truncated image?)")

    # -- blocks --------------------------------------------------------------------------------------

    def set_geometry(self, geo: Geometry) -> None:
        self.geo = geo
        self._cache.clear()
        self._descs.clear()
        self._zone = None

    def set_replay(self, replay: Replay | None) -> None:
        """Read every block through ``replay`` from now on (the journal's newer copies first)."""
        self._replay = replay
        blocks = sorted(replay.blocks) if replay is not None else []
        self._replayed = np.asarray(blocks, dtype=np.int64)
        self._cache.clear()
        self._descs.clear()
        self._zone = None

    @property
    def block_size(self) -> int:
        assert self.geo is not None
        return self.geo.block_size

    def check_block(self, block: int, what: str) -> None:
        """A block number the filesystem may point at: after the superblock, before the end."""
        geo = self.geo
        assert geo is not None
        if not geo.first_data_block < block < geo.blocks_count:
            raise Corrupt(f"{what} points at block {block}, outside the filesystem (1..{geo.blocks_count - 1})")

    def block(self, block: int, what: str = "metadata") -> bytes:
        """One block, through the journal and a bounded cache (metadata: directories, tables, maps)."""
        cached: bytes | None = self._cache.get(block)
        if cached is not None:
            return cached
        geo = self.geo
        assert geo is not None
        if not 0 <= block < geo.blocks_count:
            raise Corrupt(f"{what} points at block {block}, past the end of the filesystem")
        data = self._replayed_block(block)
        if data is None:
            data = self.read(geo.block_size, block * geo.block_size)
        self._cache.put(block, data, len(data))
        return data

    def _replayed_block(self, block: int) -> bytes | None:
        if self._replay is None or block not in self._replay.blocks:
            return None
        data = self._replay.read(block)
        if data is not None and len(data) != self.block_size:
            raise Corrupt(f"the journal's copy of block {block} has {len(data)} bytes")
        return data

    def blocks(self, first: int, count: int) -> bytes:
        """``count`` blocks from ``first`` in one read, not cached (large directories)."""
        buf = bytearray(count * self.block_size)
        self.readinto_blocks(memoryview(buf), first, 0)
        return bytes(buf)

    def readinto_blocks(self, view: memoryview, first: int, skip: int) -> None:
        """Fill ``view`` from byte ``skip`` of block ``first`` on, straight from the disk (file content),
        with the journal's copies of the blocks it replays."""
        bs = self.block_size
        last = first + (skip + len(view) - 1) // bs
        geo = self.geo
        assert geo is not None
        if first < 0 or last >= geo.blocks_count:
            raise Corrupt(f"blocks {first}..{last} lie past the end of the filesystem")
        replayed = self._replayed
        lo = int(np.searchsorted(replayed, first)) if len(replayed) else 0
        hi = int(np.searchsorted(replayed, last, side="right")) if len(replayed) else 0
        pos = 0  # in view
        at = first * bs + skip  # byte in the volume
        for block in replayed[lo:hi].tolist():
            start = block * bs
            if start > at:
                n = start - at
                self._readinto(view[pos : pos + n], at)
                pos, at = pos + n, at + n
            data = self._replayed_block(block)
            if data is None:
                data = self.read(bs, start)
            n = min(start + bs - at, len(view) - pos)
            view[pos : pos + n] = data[at - start : at - start + n]
            pos, at = pos + n, at + n
        if pos < len(view):
            self._readinto(view[pos:], at)

    # -- group descriptors ---------------------------------------------------------------------------

    def _desc_rows(self, index: int) -> np.ndarray:
        rows: np.ndarray | None = self._descs.get(index)
        if rows is None:
            geo = self.geo
            assert geo is not None
            block = geo.desc_block(index)
            data = self.block(block, f"group descriptor block {index}")
            rows = np.frombuffer(data, dtype=L.group_desc_dtype(geo.desc_size))
            self._descs.put(index, rows, len(data))
        return rows

    def _desc(self, group: int) -> np.void:
        geo = self.geo
        assert geo is not None
        if not 0 <= group < geo.groups:
            raise Corrupt(f"group {group} does not exist")
        row: np.void = self._desc_rows(group // geo.desc_per_block)[group % geo.desc_per_block]
        return row

    def inode_table(self, group: int) -> int:
        """The first block of ``group``'s inode table, checked to lie inside the filesystem."""
        row = self._desc(group)
        geo = self.geo
        assert geo is not None
        start = int(row["inode_table_lo"])
        if geo.desc_size >= L.MIN_DESC_SIZE_64BIT:
            start |= int(row["inode_table_hi"]) << 32
        if not geo.first_data_block < start or start + geo.itable_blocks > geo.blocks_count:
            raise Corrupt(f"group {group}'s inode table at block {start} lies outside the filesystem")
        return start

    # -- the system zone -----------------------------------------------------------------------------

    def check_data(self, first: int, count: int, what: str) -> None:
        """Blocks ``first..first+count-1`` may hold file data or tree nodes: inside the filesystem and
        clear of its metadata (superblocks, descriptors, bitmaps, inode tables), as the kernel checks."""
        geo = self.geo
        assert geo is not None
        if count <= 0 or first <= geo.first_data_block or first + count > geo.blocks_count:
            raise Corrupt(f"{what} points at blocks {first}..{first + count - 1}, outside the filesystem")
        zone = self._system_zone()
        if zone is None:
            return
        starts, ends = zone
        i = int(np.searchsorted(ends, first, side="right"))
        if i < len(starts) and starts[i] < first + count:
            raise Corrupt(
                f"{what} points at blocks {first}..{first + count - 1}, which overlap filesystem metadata "
                f"(blocks {int(starts[i])}..{int(ends[i]) - 1})"
            )

    def _system_zone(self) -> tuple[np.ndarray, np.ndarray] | None:
        geo = self.geo
        assert geo is not None
        if geo.groups > SYSTEM_ZONE_MAX_GROUPS:
            return None
        with self._zone_lock:
            if self._zone is None:
                self._zone = self._build_zone()
            return self._zone

    def _build_zone(self) -> tuple[np.ndarray, np.ndarray]:
        geo = self.geo
        assert geo is not None
        dtype = L.group_desc_dtype(geo.desc_size)
        rows = np.concatenate(
            [np.frombuffer(self.block(geo.desc_block(i), "group descriptors"), dtype) for i in range(geo.desc_blocks)]
        )[: geo.groups]
        wide = geo.desc_size >= L.MIN_DESC_SIZE_64BIT

        def field(name: str) -> np.ndarray:
            lo = rows[name + "_lo"].astype(np.int64)
            return lo | (rows[name + "_hi"].astype(np.int64) << 32) if wide else lo

        starts = [field("block_bitmap"), field("inode_bitmap"), field("inode_table")]
        lengths = [np.ones(geo.groups, np.int64), np.ones(geo.groups, np.int64),
                   np.full(geo.groups, geo.itable_blocks, np.int64)]  # fmt: skip
        supers = self._super_groups()
        gdt = geo.desc_blocks
        if geo.incompat & L.INCOMPAT_META_BG:
            gdt = min(gdt, geo.first_meta_bg)
        starts.append(geo.first_data_block + supers * geo.blocks_per_group)
        lengths.append(np.full(len(supers), 1 + gdt, np.int64))
        starts.append(np.zeros(1, np.int64))  # the boot block and the primary superblock's block
        lengths.append(np.full(1, geo.first_data_block + 1, np.int64))
        if geo.incompat & L.INCOMPAT_META_BG:
            meta = [g for m in range(geo.first_meta_bg, geo.desc_blocks)
                    for g in {m * geo.desc_per_block, m * geo.desc_per_block + 1, (m + 1) * geo.desc_per_block - 1}
                    if g < geo.groups]  # fmt: skip
            starts.append(np.asarray([geo.group_first_block(g) + geo.group_has_super(g) for g in meta], np.int64))
            lengths.append(np.ones(len(meta), np.int64))
        s = np.concatenate(starts)
        e = s + np.concatenate(lengths)
        order = np.argsort(s, kind="stable")
        s, e = s[order], e[order]
        # merge overlapping or touching ranges: a new range starts where the running end falls behind
        running = np.maximum.accumulate(e)
        new = np.ones(len(s), dtype=bool)
        new[1:] = s[1:] > running[:-1]
        group_ids = np.cumsum(new) - 1
        merged_s = s[new]
        merged_e = np.zeros(len(merged_s), np.int64)
        np.maximum.at(merged_e, group_ids, e)
        return merged_s, merged_e

    def _super_groups(self) -> np.ndarray:
        geo = self.geo
        assert geo is not None
        n = geo.groups
        if geo.compat & L.COMPAT_SPARSE_SUPER2:
            groups = {0, *(g for g in geo.backup_bgs if 0 < g < n)}
        elif geo.ro_compat & L.RO_COMPAT_SPARSE_SUPER:
            groups = {0, 1} if n > 1 else {0}
            for base in (3, 5, 7):
                g = base
                while g < n:
                    groups.add(g)
                    g *= base
        else:
            return np.arange(n, dtype=np.int64)
        return np.asarray(sorted(groups), dtype=np.int64)
