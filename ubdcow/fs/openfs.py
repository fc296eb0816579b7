"""Opening a filesystem: the disk (a COW overlay with its backing, or a raw image), the volume on it
(the whole disk or a partition), the superblock and its features, and the journal's replay."""

from __future__ import annotations

import os
from collections.abc import Callable

from ..disk import open_disk
from ..errors import JournalError
from . import layout as L
from .blockmap import block_map
from .filesystem import FileSystem
from .inodes import InodeTable
from .superblock import Geometry, check_features, parse_superblock
from .volume import Corrupt, Pread, PreadInto, Replay, Volume

__all__ = ["open_fs", "open_volume"]

_NO_JOURNAL = "read the disk as it is, without the journal's last transactions, with --no-journal (journal=False)"


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
        beyond = [b for b in (replay.blocks if replay is not None else ()) if not 0 <= b < geo.blocks_count]
        if beyond:
            raise JournalError(name, f"the journal names block {min(beyond)}, past the end of the filesystem "
                               f"({geo.blocks_count} blocks)", hint=_NO_JOURNAL)  # fmt: skip
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
    """(offset, size, partition number, description) of the filesystem's volume: partitions.find_volume."""
    try:
        from .partitions import find_volume  # type: ignore[import-not-found,unused-ignore]
    except ImportError:  # until the partition reader lands: whole disks only
        return 0, disk_size, None, "whole disk"
    found = find_volume(pread, disk_size, partition=partition, name=name)
    return found.offset, found.size, found.number, found.description


def _replay(volume: Volume, geo: Geometry, name: str) -> tuple[Replay | None, int]:
    """Replay the internal journal (journal.replay over the journal inode's blocks); refuse an external one."""
    if geo.has_incompat(L.INCOMPAT_JOURNAL_DEV) or geo.journal_inum == 0 or geo.journal_dev:
        raise JournalError(name, "the filesystem needs recovery and its journal is on another device",
                           hint=_NO_JOURNAL)  # fmt: skip
    try:
        inode = InodeTable(volume).get(geo.journal_inum)
        bmap = block_map(volume, inode)
    except Corrupt as exc:
        raise JournalError(name, f"the journal inode {geo.journal_inum} is unreadable: {exc.problem}",
                           hint=_NO_JOURNAL) from None  # fmt: skip
    bs = geo.block_size
    nblocks = inode.size // bs

    def read_block(n: int) -> bytes:
        if not 0 <= n < nblocks:
            raise JournalError(name, f"the journal names its block {n}, past its end ({nblocks} blocks)",
                               hint=_NO_JOURNAL)  # fmt: skip
        try:
            for _, physical, _, uninit in bmap.runs(n, 1):
                return bytes(bs) if uninit else volume.read(bs, physical * bs)
        except Corrupt as exc:
            raise JournalError(name, f"journal block {n}: {exc.problem}", hint=_NO_JOURNAL) from None
        return bytes(bs)  # a hole in the journal reads as zeros

    return _call_replay(read_block, nblocks, bs, name)


def _call_replay(
    read_block: Callable[[int], bytes], nblocks: int, block_size: int, name: str
) -> tuple[Replay | None, int]:
    """The seam with ubdcow.fs.journal: its replay of the log, or an error naming --no-journal."""
    try:
        from .journal import replay  # type: ignore[import-not-found,unused-ignore]
    except ImportError:  # until the journal reader lands
        raise JournalError(name, "the filesystem needs recovery (its journal holds transactions) and this "
                           "build cannot replay a journal", hint=_NO_JOURNAL) from None  # fmt: skip
    result = replay(read_block, nblocks, block_size=block_size, name=name)
    return result, int(result.transactions)
