"""Opening a filesystem: the disk (a COW overlay with its backing, or a raw image), the volume on it
(the whole disk or a partition), the superblock and its features, and the journal's replay."""

from __future__ import annotations

import bisect
import os
from collections.abc import Callable

from ..disk import open_disk
from ..errors import JournalError
from . import layout as L
from .blockmap import block_map
from .filesystem import FileSystem
from .inodes import InodeTable
from .journal import NO_JOURNAL_HINT, replay
from .partitions import find_volume
from .superblock import Geometry, check_features, parse_superblock
from .volume import Corrupt, Pread, PreadInto, Replay, Volume

__all__ = ["open_fs", "open_volume"]

_NO_JOURNAL = NO_JOURNAL_HINT


def open_fs(
    path: str | os.PathLike[str],
    *,
    backing: str | os.PathLike[str] | None = None,
    partition: int | None = None,
    journal: bool = True,
) -> FileSystem:
    """Open the ext2/ext3/ext4 filesystem on a COW overlay (its virtual disk, backing included) or a raw
    image, read-only. ``partition`` picks an MBR/GPT partition (1-based); without it a whole-disk
    filesystem or the only Linux partition is used. ``journal=False`` reads the disk as it is instead
    of replaying the journal of a filesystem that was not unmounted cleanly."""
    name = os.fspath(path)
    disk = open_disk(name, backing=backing)
    try:

        def pread(length: int, offset: int) -> bytes:
            buf = bytearray(length)
            n = disk.preadinto(memoryview(buf), offset)
            return bytes(buf[:n])

        return open_volume(pread, disk.size, name=name, partition=partition, journal=journal,
                           preadinto=disk.preadinto, closer=disk.close)  # fmt: skip
    except BaseException:
        disk.close()
        raise


def open_volume(
    pread: Pread,
    disk_size: int,
    *,
    name: str,
    partition: int | None = None,
    journal: bool = True,
    preadinto: PreadInto | None = None,
    closer: Callable[[], None] | None = None,
) -> FileSystem:
    """The filesystem on any disk given as ``pread(length, offset) -> bytes`` and its size (``name`` names
    it in messages). ``open_fs`` is this over ``ubdcow.disk.open_disk``."""
    offset, size, number, where = _find_volume(pread, disk_size, partition=partition, name=name)
    volume = Volume(pread, offset, size, name, preadinto=preadinto)
    geo = _geometry(volume, volume_read(volume), name)
    needs_recovery = geo.has_incompat(L.INCOMPAT_RECOVER)
    transactions = 0
    if needs_recovery and journal:
        replay, transactions = _replay(volume, geo, name)
        volume.set_replay(replay)
        # the journal may hold newer copies of the superblock and the group descriptors
        block = L.SUPERBLOCK_OFFSET // geo.block_size
        skip = L.SUPERBLOCK_OFFSET % geo.block_size
        geo = _geometry(volume, volume.block(block)[skip : skip + L.SUPERBLOCK_SIZE], name)
        needs_recovery = False
    return FileSystem(volume, where=where, partition=number, needs_recovery=needs_recovery,
                      journal_transactions=transactions, closer=closer)  # fmt: skip


def volume_read(volume: Volume) -> bytes:
    try:
        return volume.read(L.SUPERBLOCK_SIZE, L.SUPERBLOCK_OFFSET)
    except Corrupt:
        return b""  # too small: parse_superblock says so


def _geometry(volume: Volume, raw: bytes, name: str) -> Geometry:
    geo = parse_superblock(raw, name=name, volume_size=volume.size)
    check_features(geo, name)
    volume.set_geometry(geo)
    return geo


def _find_volume(pread: Pread, disk_size: int, *, partition: int | None, name: str) -> tuple[int, int, int | None, str]:
    """(offset, size, partition number, description) of the filesystem's volume."""
    found = find_volume(pread, disk_size, partition=partition, name=name)
    return found.offset, found.size, found.number, found.description


def _replay(volume: Volume, geo: Geometry, name: str) -> tuple[Replay, int]:
    """Replay the internal journal (journal.replay over the journal inode's blocks); refuse an external one."""
    if geo.has_incompat(L.INCOMPAT_JOURNAL_DEV) or geo.journal_inum == 0 or geo.journal_dev:
        raise JournalError(name, "the filesystem needs recovery and its journal is on another device",
                           hint=_NO_JOURNAL)  # fmt: skip
    try:
        inode = InodeTable(volume).get(geo.journal_inum)
        bs = geo.block_size
        nblocks = inode.size // bs
        if nblocks > geo.blocks_count:
            raise Corrupt(f"it claims {nblocks} blocks, more than the filesystem's {geo.blocks_count}")
        # mapped now, through the disk as it is: once the replay is installed, reading a journal block must
        # not go through the replayed view (whose blocks the journal holds)
        runs = list(block_map(volume, inode).runs(0, nblocks))
    except Corrupt as exc:
        raise JournalError(name, f"the journal inode {geo.journal_inum} is unreadable: {exc.problem}",
                           hint=_NO_JOURNAL) from None  # fmt: skip
    starts = [logical for logical, _, _, _ in runs]

    def read_block(n: int) -> bytes:
        if not 0 <= n < nblocks:
            raise JournalError(name, f"the journal names its block {n}, past its end ({nblocks} blocks)",
                               hint=_NO_JOURNAL)  # fmt: skip
        i = bisect.bisect_right(starts, n) - 1
        if i < 0 or n >= runs[i][0] + runs[i][2] or runs[i][3]:
            return bytes(bs)  # a hole or an uninitialized extent in the journal reads as zeros
        try:
            return volume.read(bs, (runs[i][1] + n - runs[i][0]) * bs)
        except Corrupt as exc:
            raise JournalError(name, f"journal block {n}: {exc.problem}", hint=_NO_JOURNAL) from None

    return _call_replay(read_block, nblocks, geo, name)


def _call_replay(read_block: Callable[[int], bytes], nblocks: int, geo: Geometry, name: str) -> tuple[Replay, int]:
    """The seam with ubdcow.fs.journal: its replay of the log (empty when the log is clean); a transaction
    that writes past the filesystem's end makes the journal corrupt."""
    result = replay(read_block, nblocks, block_size=geo.block_size, name=name, fs_blocks=geo.blocks_count)
    return result, result.transactions
