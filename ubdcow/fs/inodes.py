"""Inodes: read from the inode tables many at a time (numpy records, one read per table block) and decoded.

An :class:`Inode` holds the decoded fields and the on-disk bytes (for the block map, inline data,
symlink targets and in-inode extended attributes). :meth:`InodeTable.get_many` decodes a whole batch
(the entries of a directory block) with a handful of numpy operations.
"""

from __future__ import annotations

from collections.abc import Sequence

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


class InodeTable:
    """Reads inodes: ``get`` (cached, one at a time) and ``get_many`` (a batch, one read per table block)."""

    def __init__(self, volume: Volume) -> None:
        geo = volume.geo
        assert geo is not None
        self.volume = volume
        self.geo = geo
        self.dtype = L.inode_dtype(geo.inode_size)
        self._cache = LRU(8192)
        self._wide_dirs = geo.has_incompat(L.INCOMPAT_LARGEDIR)
        self._huge = geo.has_ro_compat(L.RO_COMPAT_HUGE_FILE)
        self._acl_hi = geo.has_incompat(L.INCOMPAT_64BIT)

    def get(self, ino: int) -> Inode:
        inode: Inode | None = self._cache.get(ino)
        if inode is None:
            inode = self.get_many([ino])[0]
            self._cache.put(ino, inode, 1)
        return inode

    def get_many(self, inos: Sequence[int]) -> list[Inode]:
        """The inodes ``inos`` (any order, repeats allowed), decoded and checked."""
        geo = self.geo
        for ino in inos:
            if not 0 < ino <= geo.inodes_count:
                raise Corrupt(f"inode number {ino} is out of range (1..{geo.inodes_count})")
        if not inos:
            return []
        index = np.asarray(inos, dtype=np.int64) - 1
        group, within = np.divmod(index, geo.inodes_per_group)
        per_block = geo.inodes_per_block
        tables = {g: self.volume.inode_table(g) for g in set(group.tolist())}
        table_start = np.fromiter((tables[g] for g in group.tolist()), dtype=np.int64, count=len(inos))
        blocks = table_start + within // per_block
        unique, inverse = np.unique(blocks, return_inverse=True)
        data = b"".join(self.volume.block(b, "an inode table") for b in unique.tolist())
        records = inverse.reshape(-1) * per_block + within % per_block
        rows = np.frombuffer(data, dtype=self.dtype)[records]
        size = geo.inode_size
        raws = [data[r * size : (r + 1) * size] for r in records.tolist()]
        return self._decode(list(inos), rows, raws)

    def _decode(self, inos: list[int], rows: np.ndarray, raws: list[bytes]) -> list[Inode]:
        geo = self.geo
        mode = rows["mode"].astype(np.int64)
        kind = mode & L.S_IFMT
        links = rows["links"]
        flags = rows["flags"].astype(np.int64)
        self._check(inos, mode, kind, links, rows)
        size = rows["size_lo"].astype(np.uint64)
        wide = (kind == 0o100000) | ((kind == 0o040000) & self._wide_dirs)
        size = np.where(wide, size | (rows["size_high"].astype(np.uint64) << np.uint64(32)), size)
        if int(size.max()) >= 1 << 63:
            bad = int(np.argmax(size >= np.uint64(1 << 63)))
            raise Corrupt(f"inode {inos[bad]} has an impossible size {int(size[bad])}")
        uid = (rows["uid"].astype(np.int64) | rows["uid_high"].astype(np.int64) << 16).tolist()
        gid = (rows["gid"].astype(np.int64) | rows["gid_high"].astype(np.int64) << 16).tolist()
        blocks = rows["blocks_lo"].astype(np.int64)
        if self._huge:
            blocks |= rows["blocks_high"].astype(np.int64) << 32
            blocks = np.where(flags & L.FL_HUGE_FILE, blocks * (geo.block_size // 512), blocks)
        acl = rows["file_acl_lo"].astype(np.int64)
        if self._acl_hi:
            acl |= rows["file_acl_high"].astype(np.int64) << 32
        extra = rows["extra_isize"].astype(np.int64) if geo.inode_size > L.GOOD_OLD_INODE_SIZE else None
        atime, mtime, ctime = (self._times(rows, name, extra) for name in ("atime", "mtime", "ctime"))
        crtime: list[int | None] = list(self._times(rows, "crtime", extra, optional=True))
        return [
            Inode(*fields)
            for fields in zip(
                inos, mode.tolist(), flags.tolist(), size.tolist(), links.tolist(), uid, gid, atime, mtime, ctime,
                crtime, rows["generation"].tolist(), blocks.tolist(), acl.tolist(),
                extra.tolist() if extra is not None else [0] * len(inos), raws, strict=True,
            )
        ]  # fmt: skip

    def _check(self, inos: list[int], mode: np.ndarray, kind: np.ndarray, links: np.ndarray, rows: np.ndarray) -> None:
        known = np.isin(kind, list(L.FILE_TYPES))
        if not known.all():
            bad = int(np.argmin(known))
            if mode[bad] == 0:
                raise Corrupt(f"inode {inos[bad]} is not in use (a directory entry to a free inode)")
            raise Corrupt(f"inode {inos[bad]} has an unknown file type (mode {int(mode[bad]):#o})")
        if not links.all():
            bad = int(np.argmin(links))
            raise Corrupt(f"inode {inos[bad]} is deleted (no links)")
        if self.geo.inode_size > L.GOOD_OLD_INODE_SIZE:
            extra = rows["extra_isize"].astype(np.int64)
            wrong = (extra & 3 != 0) | (extra > self.geo.inode_size - L.GOOD_OLD_INODE_SIZE)
            if wrong.any():
                bad = int(np.argmax(wrong))
                raise Corrupt(f"inode {inos[bad]} has an impossible extra size {int(extra[bad])}")

    def _times(self, rows: np.ndarray, name: str, extra: np.ndarray | None, optional: bool = False) -> list[int]:
        """Nanoseconds since the epoch: the signed 32-bit seconds, plus the epoch bits and nanoseconds of the
        extra field when i_extra_isize covers it (dates past 2038 and before 1970)."""
        n = len(rows)
        if extra is None or name not in (rows.dtype.names or ()):
            if optional:
                return [None] * n  # type: ignore[list-item]
            return (rows[name].astype(np.int64) * NS).tolist()  # type: ignore[no-any-return]
        present = L.GOOD_OLD_INODE_SIZE + extra >= L.EXTRA_END[name]
        sec = rows[name].astype(np.int64)
        bits = rows[name + "_extra"].astype(np.int64)
        sec = sec + np.where(present, (bits & 3) << 32, 0)
        nsec = np.where(present, bits >> 2, 0)
        if n and int(np.abs(sec).max()) < _SAFE_SECONDS:
            out: list[int] = (sec * NS + nsec).tolist()
        else:
            out = [s * NS + ns for s, ns in zip(sec.tolist(), nsec.tolist(), strict=True)]
        if optional and not present.all():
            return [t if p else None for t, p in zip(out, present.tolist(), strict=True)]  # type: ignore[misc]
        return out
