"""Inodes: read from the inode tables many at a time (numpy records, one read per table block) and decoded.

An :class:`Inode` holds the decoded fields and the on-disk bytes (for the block map, inline data,
symlink targets and in-inode extended attributes). :meth:`InodeTable.get_many` decodes a whole batch
(the entries of a directory block) with a handful of numpy operations.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from . import layout as L
from .volume import LRU, Corrupt, Volume

__all__ = ["Inode", "InodeTable"]

NS = 1_000_000_000
#: seconds whose nanoseconds still fit an int64 (the year 2255), beyond which Python ints take over
_SAFE_SECONDS = 9_000_000_000


class Inode:
    """One decoded inode. ``raw`` is its on-disk record; times are in nanoseconds since the epoch."""

    __slots__ = ("atime_ns", "blocks", "crtime_ns", "ctime_ns", "extra_isize", "file_acl", "flags", "generation",
                 "gid", "ino", "links", "mode", "mtime_ns", "raw", "size", "uid")  # fmt: skip

    def __init__(
        self, ino: int, mode: int, flags: int, size: int, links: int, uid: int, gid: int, atime_ns: int,
        mtime_ns: int, ctime_ns: int, crtime_ns: int | None, generation: int, blocks: int, file_acl: int,
        extra_isize: int, raw: bytes,
    ) -> None:  # fmt: skip
        self.ino = ino
        self.mode = mode
        self.flags = flags
        self.size = size
        self.links = links
        self.uid = uid
        self.gid = gid
        self.atime_ns = atime_ns
        self.mtime_ns = mtime_ns
        self.ctime_ns = ctime_ns
        self.crtime_ns = crtime_ns
        self.generation = generation
        self.blocks = blocks
        self.file_acl = file_acl
        self.extra_isize = extra_isize
        self.raw = raw

    @property
    def type(self) -> str:
        """'file', 'dir', 'symlink', 'char', 'block', 'fifo' or 'socket'."""
        return L.FILE_TYPES[self.mode & L.S_IFMT]

    @property
    def is_dir(self) -> bool:
        return self.mode & L.S_IFMT == 0o040000

    @property
    def is_symlink(self) -> bool:
        return self.mode & L.S_IFMT == 0o120000

    @property
    def i_block(self) -> bytes:
        return self.raw[L.I_BLOCK_OFFSET : L.I_BLOCK_OFFSET + L.I_BLOCK_SIZE]

    @property
    def rdev(self) -> tuple[int, int] | None:
        """(major, minor) of a character or block device, in the old 16-bit or the new 32-bit encoding."""
        if self.mode & L.S_IFMT not in (0o020000, 0o060000):
            return None
        old, new = int.from_bytes(self.raw[40:44], "little"), int.from_bytes(self.raw[44:48], "little")
        if old:
            old &= 0xFFFF
            return (old >> 8) & 0xFF, old & 0xFF
        return (new & 0xFFF00) >> 8, (new & 0xFF) | ((new >> 12) & 0xFFF00)

    def has(self, flag: int) -> bool:
        return bool(self.flags & flag)


class _Window:
    """A run of consecutive inodes of one group, decoded at once: one list per field, and the raw bytes."""

    __slots__ = (
        "atime",
        "blocks",
        "count",
        "crtime",
        "ctime",
        "extra",
        "file_acl",
        "first",
        "flags",
        "generation",
        "gid",
        "links",
        "mode",
        "mtime",
        "raw",
        "size",
        "uid",
    )  # fmt: skip

    mode: list[int]
    flags: list[int]
    size: list[int]
    links: list[int]
    uid: list[int]
    gid: list[int]
    atime: list[int]
    mtime: list[int]
    ctime: list[int]
    crtime: list[int | None]
    generation: list[int]
    blocks: list[int]
    file_acl: list[int]
    extra: list[int]

    def __init__(self, first: int, raw: bytes, fields: dict[str, list[Any]]) -> None:
        self.first = first  # inode number of the first record
        self.raw = raw
        self.count = len(fields["mode"])
        for name, values in fields.items():
            setattr(self, name, values)


class InodeTable:
    """Reads inodes through windows of the inode tables: ``WINDOW`` consecutive inodes read with one
    ``pread`` and decoded with a handful of numpy operations, kept in a bounded cache. ``get`` and
    ``get_many`` then only pick records out of decoded windows (and check them)."""

    WINDOW = 512

    def __init__(self, volume: Volume) -> None:
        geo = volume.geo
        assert geo is not None
        self.volume = volume
        self.geo = geo
        self.dtype = L.inode_dtype(geo.inode_size)
        self._windows = LRU(32 << 20)
        self._wide_dirs = geo.has_incompat(L.INCOMPAT_LARGEDIR)
        self._huge = geo.has_ro_compat(L.RO_COMPAT_HUGE_FILE)
        self._acl_hi = geo.has_incompat(L.INCOMPAT_64BIT)
        # a window holds whole blocks of the table and never crosses a group
        per_block = geo.inodes_per_block
        self._window = max(per_block, self.WINDOW // per_block * per_block)

    def get(self, ino: int) -> Inode:
        return self.get_many((ino,))[0]

    def get_many(self, inos: Sequence[int]) -> list[Inode]:
        """The inodes ``inos`` (any order, repeats allowed), decoded and checked."""
        geo = self.geo
        ipg, count, size, w = geo.inodes_per_group, geo.inodes_count, geo.inode_size, self._window
        out = []
        window: _Window | None = None
        for ino in inos:
            if not 0 < ino <= count:
                raise Corrupt(f"inode number {ino} is out of range (1..{count})")
            i = ino - (window.first if window is not None else 0)
            if window is None or not 0 <= i < window.count:
                group, index = divmod(ino - 1, ipg)
                window = self._get_window(group, index - index % w)
                i = ino - window.first
            out.append(self._inode(window, i, ino, size))
        return out

    def _inode(self, w: _Window, i: int, ino: int, size: int) -> Inode:
        mode = w.mode[i]
        kind = mode & L.S_IFMT
        if kind not in L.FILE_TYPES:
            if mode == 0:
                raise Corrupt(f"inode {ino} is not in use (a directory entry to a free inode)")
            raise Corrupt(f"inode {ino} has an unknown file type (mode {mode:#o})")
        if not w.links[i]:
            raise Corrupt(f"inode {ino} is deleted (no links)")
        extra = w.extra[i]
        if extra & 3 or extra > size - L.GOOD_OLD_INODE_SIZE:
            raise Corrupt(f"inode {ino} has an impossible extra size {extra}")
        length = w.size[i]
        if length >= 1 << 63:
            raise Corrupt(f"inode {ino} has an impossible size {length}")
        return Inode(ino, mode, w.flags[i], length, w.links[i], w.uid[i], w.gid[i], w.atime[i], w.mtime[i],
                     w.ctime[i], w.crtime[i], w.generation[i], w.blocks[i], w.file_acl[i], extra,
                     w.raw[i * size : (i + 1) * size])  # fmt: skip

    def _get_window(self, group: int, index: int) -> _Window:
        key = (group, index)
        window: _Window | None = self._windows.get(key)
        if window is None:
            geo = self.geo
            per_block = geo.inodes_per_block
            n = min(self._window, geo.inodes_per_group - index)
            first_block = self.volume.inode_table(group) + index // per_block
            raw = self.volume.blocks(first_block, -(-n // per_block))[: n * geo.inode_size]
            window = _Window(group * geo.inodes_per_group + index + 1, raw, self._decode(raw))
            self._windows.put(key, window, len(raw) * 3)
        return window

    def _decode(self, raw: bytes) -> dict[str, list[Any]]:
        """Every field of every record in ``raw``, as lists (no checks: unused records decode to garbage)."""
        geo = self.geo
        rows = np.frombuffer(raw, dtype=self.dtype)
        mode = rows["mode"].astype(np.int64)
        kind = mode & L.S_IFMT
        flags = rows["flags"].astype(np.int64)
        size = rows["size_lo"].astype(np.uint64)
        wide = (kind == 0o100000) | ((kind == 0o040000) & self._wide_dirs)
        size = np.where(wide, size | (rows["size_high"].astype(np.uint64) << np.uint64(32)), size)
        blocks = rows["blocks_lo"].astype(np.int64)
        if self._huge:
            blocks |= rows["blocks_high"].astype(np.int64) << 32
            blocks = np.where(flags & L.FL_HUGE_FILE, blocks * (geo.block_size // 512), blocks)
        acl = rows["file_acl_lo"].astype(np.int64)
        if self._acl_hi:
            acl |= rows["file_acl_high"].astype(np.int64) << 32
        extra = rows["extra_isize"].astype(np.int64) if geo.inode_size > L.GOOD_OLD_INODE_SIZE else None
        return {
            "mode": mode.tolist(),
            "flags": flags.tolist(),
            "size": size.tolist(),
            "links": rows["links"].tolist(),
            "uid": (rows["uid"].astype(np.int64) | rows["uid_high"].astype(np.int64) << 16).tolist(),
            "gid": (rows["gid"].astype(np.int64) | rows["gid_high"].astype(np.int64) << 16).tolist(),
            "atime": self._times(rows, "atime", extra),
            "mtime": self._times(rows, "mtime", extra),
            "ctime": self._times(rows, "ctime", extra),
            "crtime": self._times(rows, "crtime", extra, optional=True),
            "generation": rows["generation"].tolist(),
            "blocks": blocks.tolist(),
            "file_acl": acl.tolist(),
            "extra": extra.tolist() if extra is not None else [0] * len(rows),
        }

    def _times(self, rows: np.ndarray, name: str, extra: np.ndarray | None, optional: bool = False) -> list[Any]:
        """Nanoseconds since the epoch: the signed 32-bit seconds, plus the epoch bits and nanoseconds of the
        extra field when i_extra_isize covers it (dates past 2038 and before 1970)."""
        n = len(rows)
        if extra is None or name not in (rows.dtype.names or ()):
            if optional:
                return [None] * n
            return (rows[name].astype(np.int64) * NS).tolist()  # type: ignore[no-any-return]
        present = L.GOOD_OLD_INODE_SIZE + extra >= L.EXTRA_END[name]
        sec = rows[name].astype(np.int64)
        bits = rows[name + "_extra"].astype(np.int64)
        sec = sec + np.where(present, (bits & 3) << 32, 0)
        nsec = np.where(present, bits >> 2, 0)
        if n and int(np.abs(sec).max()) < _SAFE_SECONDS:
            out: list[Any] = (sec * NS + nsec).tolist()
        else:
            out = [s * NS + ns for s, ns in zip(sec.tolist(), nsec.tolist(), strict=True)]
        if optional and not present.all():
            return [t if p else None for t, p in zip(out, present.tolist(), strict=True)]
        return out
