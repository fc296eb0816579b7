"""Find the filesystem on a disk: the whole disk, or one partition of an MBR or GPT table.

Netkit-JH boots ``root=98:0`` (a filesystem on the whole disk); original Netkit boots
``root=98:1`` (partition 1 of an MBR disk). :func:`find_volume` reads the first sectors through
``pread`` and returns the :class:`Volume` the filesystem reader should use:

- The tables are read as Linux reads them (512-byte sectors): an MBR is sector 0 with the
  0x55AA signature and boot flags of 0x00 or 0x80 only; its primary partitions are 1 to 4 by
  slot, the logical partitions of an extended one (type 0x05, 0x0F or 0x85) follow the chain of
  EBRs and are numbered from 5. A chain that loops back or runs past 128 EBRs ends there (noted in
  messages). An MBR with a type 0xEE entry announces a GPT: the primary header (LBA 1) with its
  header and entry-array CRCs, or the backup (the disk's last sector) when the primary is corrupt;
  entries are numbered from 1 by slot.
- The candidates are the partitions that hold an ext2/ext3/ext4 superblock (its magic number at 1080
  bytes), whatever their type says: a Linux partition (MBR 0x83, GPT "Linux filesystem") that
  holds none is not one, a mislabelled one that does is.
- ``partition=N`` takes partition N. Without it: the only candidate; with several, a
  :class:`~ubdcow.errors.PartitionError` that lists them (number, start, size, type); with none,
  the whole disk when it holds an ext superblock at 1024 (a whole-disk filesystem whose boot block
  happens to end in 0x55AA is still one), else an
  :class:`~ubdcow.errors.UnsupportedFilesystemError` that says what the disk holds instead.
- A selected partition that runs past the disk's end is an error.
"""

from __future__ import annotations

import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import construct as cs
import numpy as np

from ..errors import PartitionError, UnsupportedFilesystemError
from . import layout as L

__all__ = ["Volume", "find_volume"]

SECTOR = L.PT_SECTOR
#: where an ext2/ext3/ext4 superblock sits from the start of its volume, and its magic number's place in it
EXT_SUPERBLOCK = 1024
EXT_MAGIC_AT = EXT_SUPERBLOCK + 0x38
EXT_MAGIC = 0xEF53
MAX_EBRS = 128  # links followed in an extended partition's chain
MAX_GPT_ENTRY_BYTES = 1 << 20  # 8192 entries of 128 bytes
MAX_LISTED = 16  # partitions a message lists

LINUX_FS_GUID = uuid.UUID("0FC63DAF-8483-4772-8E79-3D69D8477DE4")
GPT_TYPES = {
    LINUX_FS_GUID: "Linux filesystem",
    uuid.UUID("0657FD6D-A4AB-43C4-84E5-0933C84B4F4F"): "Linux swap",
    uuid.UUID("E6D6D379-F507-44C2-A23C-238F2A3DF928"): "Linux LVM",
    uuid.UUID("A19D880F-05FC-4D3B-A006-743F0F84911E"): "Linux RAID",
    uuid.UUID("4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"): "Linux root (x86-64)",
    uuid.UUID("933AC7E1-2EB4-4F13-B844-0E14E2AEF915"): "Linux home",
    uuid.UUID("C12A7328-F81F-11D2-BA4B-00A0C93EC93B"): "EFI System",
    uuid.UUID("21686148-6449-6E6F-744E-656564454649"): "BIOS boot",
    uuid.UUID("EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"): "Microsoft basic data",
}
MBR_TYPES = {
    0x83: "Linux",
    0x82: "Linux swap",
    0x8E: "Linux LVM",
    0xFD: "Linux raid",
    0x05: "extended",
    0x0F: "extended (LBA)",
    0x85: "Linux extended",
    0x07: "NTFS/exFAT",
    0x0B: "FAT32",
    0x0C: "FAT32 (LBA)",
    0x06: "FAT16",
    0x0E: "FAT16 (LBA)",
    0xEF: "EFI System",
    0xEE: "GPT protective",
}

Pread = Callable[[int, int], bytes]


@dataclass(frozen=True)
class Volume:
    """Where the filesystem is: a byte range of the disk."""

    offset: int  # bytes from the start of the disk
    size: int  # bytes
    number: int | None  # partition number, None for a whole-disk filesystem
    description: str  # e.g. "partition 1 (MBR type 0x83 Linux)", "whole disk"


@dataclass(frozen=True)
class _Partition:
    number: int
    start: int  # sector
    sectors: int
    kind: str  # "MBR type 0x83 Linux", "GPT Linux filesystem", ...
    extended: bool = False
    ext: bool = False  # holds an ext2/ext3/ext4 superblock

    @property
    def offset(self) -> int:
        return self.start * SECTOR

    @property
    def size(self) -> int:
        return self.sectors * SECTOR

    def describe(self) -> str:
        return f"partition {self.number} ({self.kind})"

    def listing(self) -> str:
        return f"{self.number} (start {self.offset}, {_size(self.size)}, {self.kind})"


@dataclass
class _Table:
    kind: str  # "MBR" or "GPT"
    partitions: list[_Partition]
    problems: list[str] = field(default_factory=list)  # what was skipped, for messages

    def note(self) -> str:
        return "".join(f"; {p}" for p in self.problems)


def _some(items: list[str], total: int) -> str:
    """``items`` joined, and how many more there are of ``total``."""
    more = f" and {total - len(items)} more" if total > len(items) else ""
    return ", ".join(items) + more


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


class _Disk:
    """Reads clamped to the disk's size."""

    def __init__(self, pread: Pread, size: int, name: str) -> None:
        self.pread = pread
        self.size = size
        self.name = name
        self.sectors = size // SECTOR

    def read(self, offset: int, length: int) -> bytes:
        length = min(length, self.size - offset)
        if offset < 0 or length <= 0:
            return b""
        return bytes(self.pread(length, offset))[:length]

    def has_ext(self, offset: int) -> bool:
        """An ext2/ext3/ext4 superblock at ``offset + 1024``: its magic, a sane block size, inodes."""
        sb = self.read(offset + EXT_SUPERBLOCK, 64)
        if len(sb) < 64 or int.from_bytes(sb[0x38:0x3A], "little") != EXT_MAGIC:
            return False
        return int.from_bytes(sb[0x18:0x1C], "little") <= 6 and int.from_bytes(sb[0:4], "little") > 0

    def identify(self, offset: int, size: int) -> str:
        """What a volume holds instead of ext2/ext3/ext4, in a few words."""
        head = self.read(offset, min(size, 65536))
        checks = (
            (head[:4] == b"XFSB", "an XFS filesystem"),
            (self.read(offset + 65536 + 64, 8) == b"_BHRfS_M", "a btrfs filesystem"),
            (head[4086:4096] in (b"SWAPSPACE2", b"SWAP-SPACE"), "a swap area"),
            (head[:6] == b"LUKS\xba\xbe", "a LUKS container"),
            (head[512:520] == b"LABELONE", "an LVM physical volume"),
            (head[3:11] == b"NTFS    ", "an NTFS filesystem"),
            (head[82:87] == b"FAT32" or head[54:59] in (b"FAT12", b"FAT16"), "a FAT filesystem"),
            (self.read(offset + 32769, 5) == b"CD001", "an ISO 9660 image"),
            (head[:4] == b"hsqs", "a squashfs image"),
        )
        for hit, what in checks:
            if hit:
                return what
        if not head.strip(b"\0"):
            return "zeros" if head else "nothing (it is empty)"  # as far as its first 64 KiB
        return "no filesystem ubdcow recognizes"


def _mbr(disk: _Disk, sector: int, *, boot_flags: bool = True) -> cs.Container | None:
    """The MBR (or EBR) at ``sector`` if it has the signature (and, for an MBR, boot flags of 0x00 or
    0x80 only: Linux's test that tells a partition table from a FAT boot sector)."""
    data = disk.read(sector * SECTOR, SECTOR)
    if len(data) < SECTOR:
        return None
    mbr = L.MBR.parse(data)
    if mbr.signature != L.MBR_SIGNATURE:
        return None
    if boot_flags and any(e.status not in (0x00, 0x80) for e in mbr.entries):
        return None
    return mbr


def _mbr_kind(kind: int, logical: bool = False) -> str:
    name = MBR_TYPES.get(kind)
    return ("MBR logical, type" if logical else "MBR type") + f" 0x{kind:02x}" + (f" {name}" if name else "")


def _read_mbr(disk: _Disk, mbr: cs.Container) -> _Table:
    table = _Table("MBR", [])
    for slot, e in enumerate(mbr.entries, 1):
        if e.type == L.MBR_TYPE_EMPTY or e.sectors == 0:
            continue
        extended = e.type in L.MBR_TYPES_EXTENDED
        table.partitions.append(_Partition(slot, e.lba_start, e.sectors, _mbr_kind(e.type), extended=extended))
    number = 5
    for ext in [p for p in table.partitions if p.extended]:
        this, this_size = ext.start, ext.sectors
        seen: set[int] = set()
        for _ in range(MAX_EBRS):
            if this in seen:
                table.problems.append(f"the extended partition's chain loops back to sector {this}")
                break
            seen.add(this)
            ebr = _mbr(disk, this, boot_flags=False)
            if ebr is None:  # Linux stops there too
                if this >= disk.sectors:
                    table.problems.append(f"the extended partition's chain points past the disk's end (sector {this})")
                break
            for i, e in enumerate(ebr.entries):
                if e.sectors == 0 or e.type in L.MBR_TYPES_EXTENDED or e.type == L.MBR_TYPE_EMPTY:
                    continue
                start = this + e.lba_start
                # Linux ignores a third or fourth entry that does not fit: often garbage
                if i >= 2 and (e.lba_start + e.sectors > this_size or start + e.sectors > ext.start + ext.sectors):
                    continue
                table.partitions.append(_Partition(number, start, e.sectors, _mbr_kind(e.type, logical=True)))
                number += 1
            link = next((e for e in ebr.entries if e.sectors and e.type in L.MBR_TYPES_EXTENDED), None)
            if link is None:
                break
            this, this_size = ext.start + link.lba_start, link.sectors
        else:
            table.problems.append(f"the extended partition's chain is longer than {MAX_EBRS} links")
    return table


def _gpt_at(disk: _Disk, lba: int) -> tuple[list[_Partition], str | None]:
    """The partitions of the GPT header at ``lba``, or a reason it cannot be used."""
    raw = disk.read(lba * SECTOR, SECTOR)
    if len(raw) < L.GPT_HEADER_SIZE or raw[:8] != L.GPT_SIGNATURE:
        return [], "no GPT signature"
    h = L.GPT_HEADER.parse(raw)
    if not L.GPT_HEADER_SIZE <= h.header_size <= SECTOR:
        return [], f"header size {h.header_size}"
    image = bytearray(raw[: h.header_size])
    image[L.GPT_HEADER_CRC_OFFSET : L.GPT_HEADER_CRC_OFFSET + 4] = bytes(4)
    if zlib.crc32(image) != h.header_crc32:
        return [], "header CRC mismatch"
    last = disk.sectors - 1
    if h.my_lba != lba or h.first_usable_lba > h.last_usable_lba or h.last_usable_lba > last:
        return [], "header fields do not fit the disk"
    if h.sizeof_partition_entry != L.GPT_ENTRY_SIZE:
        return [], f"entry size {h.sizeof_partition_entry}"
    nbytes = h.num_partition_entries * L.GPT_ENTRY_SIZE
    if nbytes > MAX_GPT_ENTRY_BYTES or h.partition_entry_lba * SECTOR + nbytes > disk.size:
        return [], f"{h.num_partition_entries} entries at LBA {h.partition_entry_lba} do not fit"
    array = disk.read(h.partition_entry_lba * SECTOR, nbytes)
    if zlib.crc32(array) != h.partition_entry_array_crc32:
        return [], "entry array CRC mismatch"
    partitions = []
    for i, entry in enumerate(np.frombuffer(array, dtype=L.GPT_ENTRY)):
        kind = uuid.UUID(bytes_le=entry["type_guid"].tobytes())
        first, end = int(entry["first_lba"]), int(entry["last_lba"])
        if kind.int == 0 or end < first:
            continue
        name = GPT_TYPES.get(kind, f"type {str(kind).upper()}")
        partitions.append(_Partition(i + 1, first, end - first + 1, f"GPT {name}"))
    return partitions, None


def _read_gpt(disk: _Disk) -> _Table:
    partitions, primary = _gpt_at(disk, 1)
    if primary is None:
        return _Table("GPT", partitions)
    partitions, backup = _gpt_at(disk, disk.sectors - 1)
    if backup is not None:
        raise PartitionError(
            disk.name, f"the GPT is corrupt: the primary header ({primary}) and the backup ({backup}) are unusable"
        )
    return _Table("GPT", partitions, [f"the primary GPT header is corrupt ({primary}); the backup is used"])


def _table(disk: _Disk) -> _Table | None:
    mbr = _mbr(disk, 0)
    if mbr is None:
        return None
    if any(e.type == L.MBR_TYPE_GPT_PROTECTIVE for e in mbr.entries):
        return _read_gpt(disk)
    return _read_mbr(disk, mbr)


def _with_ext(disk: _Disk, table: _Table) -> list[_Partition]:
    out = []
    for p in table.partitions:
        holds = not p.extended and p.start < disk.sectors and disk.has_ext(p.offset)
        out.append(_Partition(p.number, p.start, p.sectors, p.kind, p.extended, holds))
    return out


def _volume(disk: _Disk, p: _Partition) -> Volume:
    if p.start + p.sectors > disk.sectors:
        raise PartitionError(
            disk.name,
            f"{p.describe()} ends past the end of the disk: it ends at byte {p.offset + p.size}, "
            f"the disk has {disk.size}",
        )
    return Volume(p.offset, p.size, p.number, p.describe())


def find_volume(pread: Pread, disk_size: int, *, partition: int | None, name: str) -> Volume:
    """The volume of the disk that holds the ext2/ext3/ext4 filesystem to read (see the module's text).

    ``pread(length, offset)`` reads the disk, ``disk_size`` is its size in bytes, ``name`` its path
    for messages. Raises :class:`~ubdcow.errors.PartitionError` when the choice is the user's
    (several candidates, a partition that is not there or runs past the disk's end, a corrupt
    GPT) and :class:`~ubdcow.errors.UnsupportedFilesystemError` when there is nothing to read.
    """
    disk = _Disk(pread, disk_size, name)
    try:
        table = _table(disk)
    except cs.ConstructError as exc:  # only a short read gets here: every value of every field parses
        raise PartitionError(name, f"unreadable partition table ({exc})") from None
    whole = disk.has_ext(0)
    if table is not None:
        table.partitions = _with_ext(disk, table)
    if partition is not None:
        return _chosen(disk, table, whole, partition)
    return _automatic(disk, table, whole)


def _chosen(disk: _Disk, table: _Table | None, whole: bool, partition: int) -> Volume:
    """``--partition N``."""
    name = disk.name
    if table is None or not table.partitions:
        if whole:
            raise PartitionError(
                name,
                f"no partition table, so no partition {partition}: the filesystem fills the whole disk",
                hint="leave out --partition",
            )
        raise UnsupportedFilesystemError(
            name,
            f"no partition table and no ext2/ext3/ext4 filesystem: the disk holds {disk.identify(0, disk.size)}",
        )
    chosen = next((p for p in table.partitions if p.number == partition), None)
    if chosen is None or chosen.extended:
        data = [p for p in table.partitions if not p.extended]
        numbers = _some([str(p.number) for p in data[:MAX_LISTED]], len(data))
        what = "is the extended partition" if chosen else "is not in the table"
        raise PartitionError(
            name,
            f"partition {partition} {what} ({table.kind}: {numbers or 'none'}){table.note()}",
            hint=f"--partition takes one of: {numbers}" if data else None,
        )
    if not chosen.ext:
        if chosen.start >= disk.sectors:
            _volume(disk, chosen)  # raises: past the end
        raise UnsupportedFilesystemError(
            name, f"{chosen.describe()} holds {disk.identify(chosen.offset, chosen.size)}, not ext2/ext3/ext4"
        )
    return _volume(disk, chosen)


def _automatic(disk: _Disk, table: _Table | None, whole: bool) -> Volume:
    """No ``--partition``: the only candidate, else the whole disk, else an error."""
    name = disk.name
    candidates = [p for p in table.partitions if p.ext] if table is not None else []
    if len(candidates) == 1:
        return _volume(disk, candidates[0])
    if len(candidates) > 1:
        listing = _some([p.listing() for p in candidates[:MAX_LISTED]], len(candidates))
        raise PartitionError(
            name,
            f"{len(candidates)} partitions hold an ext2/ext3/ext4 filesystem: {listing}",
            hint="choose one with --partition N",
        )
    if whole:
        return Volume(0, disk.size, None, "whole disk")
    if table is None or not table.partitions:
        table_text = "no partition table" if table is None else f"an {table.kind} table with no partitions"
        raise UnsupportedFilesystemError(
            name, f"no ext2/ext3/ext4 filesystem: {table_text}, and the disk holds {disk.identify(0, disk.size)}"
        )
    data = [p for p in table.partitions if not p.extended]
    found = _some(
        [
            f"{p.describe()} "
            + ("starts past the disk's end" if p.start >= disk.sectors else f"holds {disk.identify(p.offset, p.size)}")
            for p in data[:MAX_LISTED]
        ],
        len(data),
    )
    raise UnsupportedFilesystemError(
        name, f"no partition holds an ext2/ext3/ext4 filesystem: {found or 'none'}{table.note()}"
    )
