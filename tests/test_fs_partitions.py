"""Partition tables (ubdcow.fs.partitions) against sfdisk, partx, blkid and the kernel's loop mounts.

sfdisk writes MBR and GPT tables into plain files, ``mkfs.ext4 -E offset=N`` puts a filesystem
inside a partition. The oracles: ``sfdisk --json`` for starts and sizes, ``partx --show``
(libblkid) for Linux's numbering of logical partitions, ``blkid -p -O OFFSET`` for the filesystem
at the chosen offset (its UUID), and, as root, a read-only loop mount at the chosen offset and
size limit that reads a file back.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import time
import zlib
from pathlib import Path

import pytest
from conftest import require_root, require_tool, run_atheris
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ubdcow.errors import PartitionError, UbdCowError, UnsupportedFilesystemError
from ubdcow.fs.partitions import Volume, find_volume

MiB = 1 << 20
SECTOR = 512


def run(*cmd: str | os.PathLike[str], input: str | None = None) -> str:
    return subprocess.run([os.fspath(c) for c in cmd], input=input, capture_output=True, text=True, check=True,
                          timeout=120).stdout  # fmt: skip


def blank(path: Path, size: int) -> Path:
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def sfdisk(path: Path, script: str) -> list[dict[str, object]]:
    """Write a table with sfdisk; return ``sfdisk --json``'s partitions."""
    require_tool("sfdisk", "fdisk")
    run("sfdisk", "-q", "--no-reread", "--no-tell-kernel", path, input=script)
    return table(path)


def table(path: Path) -> list[dict[str, object]]:
    parts = json.loads(run("sfdisk", "--json", path))["partitiontable"].get("partitions", [])
    for p in parts:
        p["number"] = int(str(p["node"]).removeprefix(str(path)))
    return parts


def mkfs_at(path: Path, offset: int, size: int, *args: str) -> str:
    """An ext4 of ``size`` bytes at ``offset``; returns its UUID as blkid reads it there."""
    require_tool("mkfs.ext4", "e2fsprogs")
    run("mkfs.ext4", "-q", "-F", "-E", f"offset={offset}", *args, path, f"{size // 1024}k")
    return blkid_uuid(path, offset)


def blkid_uuid(path: Path, offset: int) -> str:
    require_tool("blkid", "util-linux")
    out = run("blkid", "-p", "-O", str(offset), "-o", "export", path)
    fields = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert fields.get("TYPE") == "ext4", out
    return fields["UUID"]


def our_uuid(path: Path, volume: Volume) -> str:
    with open(path, "rb") as f:
        f.seek(volume.offset + 1024 + 0x68)
        raw = f.read(16)
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def find(path: Path, partition: int | None = None, size: int | None = None) -> Volume:
    fd = os.open(path, os.O_RDONLY)
    try:
        return find_volume(lambda n, off: os.pread(fd, n, off), size if size is not None else os.fstat(fd).st_size,
                           partition=partition, name=str(path))  # fmt: skip
    finally:
        os.close(fd)


def assert_is(volume: Volume, part: dict[str, object], number: int) -> None:
    assert volume.number == number == part["number"]
    assert volume.offset == int(part["start"]) * SECTOR  # type: ignore[call-overload]
    assert volume.size == int(part["size"]) * SECTOR  # type: ignore[call-overload]
    assert volume.description.startswith(f"partition {number} (")


def one_line(err: UbdCowError, path: Path, *words: str) -> str:
    text = str(err)
    assert text.startswith(f"{path}: ") and "\n" not in text, text
    for w in words:
        assert w in text, (w, text)
    return text


# -- whole disks -------------------------------------------------------------------------------


def test_a_whole_disk_filesystem(tmp_path):
    disk = blank(tmp_path / "disk.img", 32 * MiB)
    uuid = mkfs_at(disk, 0, 32 * MiB)
    v = find(disk)
    assert v == Volume(0, 32 * MiB, None, "whole disk") and our_uuid(disk, v) == uuid
    with pytest.raises(PartitionError) as info:
        find(disk, partition=1)
    one_line(info.value, disk, "no partition table", "partition 1")
    assert info.value.hint == "leave the partition number out"


@pytest.mark.parametrize("boot", ["garbage-entries", "zero-entries"])
def test_a_whole_disk_filesystem_whose_boot_block_ends_in_55aa(tmp_path, boot):
    """An ext boot block (the first 1024 bytes) that looks like an MBR is still a whole-disk filesystem."""
    disk = blank(tmp_path / "disk.img", 16 * MiB)
    mkfs_at(disk, 0, 16 * MiB)
    rng = random.Random(boot)
    with open(disk, "r+b") as f:
        f.seek(446)
        f.write(rng.randbytes(64) if boot == "garbage-entries" else bytes(64))
        f.write(b"\x55\xaa")
    assert find(disk).number is None


def test_a_disk_of_zeros_and_a_disk_of_xfs(tmp_path):
    disk = blank(tmp_path / "zeros.img", 8 * MiB)
    with pytest.raises(UnsupportedFilesystemError) as info:
        find(disk)
    one_line(info.value, disk, "no ext2/ext3/ext4 filesystem", "no partition table", "zeros")
    with pytest.raises(UnsupportedFilesystemError) as info:
        find(disk, size=0)
    one_line(info.value, disk, "empty")
    with open(disk, "r+b") as f:  # a lone magic number, in a superblock that says no inodes, is not ext
        f.seek(1080)
        f.write(b"\x53\xef")
    with pytest.raises(UnsupportedFilesystemError):
        find(disk)
    xfs = blank(tmp_path / "xfs.img", 300 * MiB)
    require_tool("mkfs.xfs", "xfsprogs")
    run("mkfs.xfs", "-q", xfs)
    with pytest.raises(UnsupportedFilesystemError) as info:
        find(xfs)
    one_line(info.value, xfs, "an XFS filesystem")


# -- MBR ---------------------------------------------------------------------------------------


def test_mbr_one_linux_partition(tmp_path):
    disk = blank(tmp_path / "disk.img", 64 * MiB)
    (p1,) = sfdisk(disk, "label: dos\nstart=2048, size=32768, type=83\n")
    uuid = mkfs_at(disk, 2048 * SECTOR, 16 * MiB)
    v = find(disk)
    assert_is(v, p1, 1)
    assert v.description == "partition 1 (MBR type 0x83 Linux)" and our_uuid(disk, v) == uuid
    assert find(disk, partition=1) == v


def swap_at(disk: Path, offset: int, size: int, tmp_path: Path) -> None:
    require_tool("mkswap", "util-linux")
    swap = blank(tmp_path / "swap.img", size)
    run("mkswap", swap)
    with open(disk, "r+b") as f:
        f.seek(offset)
        f.write(swap.read_bytes())


def test_mbr_swap_and_linux(tmp_path):
    disk = blank(tmp_path / "disk.img", 64 * MiB)
    parts = sfdisk(disk, "label: dos\nsize=8MiB, type=82\nsize=24MiB, type=83\n")
    swap_at(disk, int(parts[0]["start"]) * SECTOR, 8 * MiB, tmp_path)  # type: ignore[call-overload]
    uuid = mkfs_at(disk, int(parts[1]["start"]) * SECTOR, 24 * MiB)  # type: ignore[call-overload]
    v = find(disk)
    assert_is(v, parts[1], 2)
    assert our_uuid(disk, v) == uuid
    with pytest.raises(UnsupportedFilesystemError) as info:
        find(disk, partition=1)
    one_line(info.value, disk, "partition 1 (MBR type 0x82 Linux swap) holds a swap area, not ext2/ext3/ext4")


def test_mbr_two_linux_partitions_are_listed_and_partition_2_picks_the_second(tmp_path):
    disk = blank(tmp_path / "disk.img", 64 * MiB)
    parts = sfdisk(disk, "label: dos\nsize=16MiB, type=83\nsize=24MiB, type=83\n")
    for p, size in zip(parts, (16 * MiB, 24 * MiB), strict=True):
        mkfs_at(disk, int(p["start"]) * SECTOR, size)  # type: ignore[call-overload]
    with pytest.raises(PartitionError) as info:
        find(disk)
    text = one_line(info.value, disk, "2 partitions hold an ext2/ext3/ext4 filesystem")
    for p in parts:
        assert f"{p['number']} (start {int(p['start']) * SECTOR}," in text, text  # type: ignore[call-overload]
    assert "16.0 MiB" in text and "24.0 MiB" in text and text.count("MBR type 0x83") == 2
    assert info.value.hint == "choose one; partition 1 with --partition 1; partition 2 with --partition 2"
    v = find(disk, partition=2)
    assert_is(v, parts[1], 2)
    assert our_uuid(disk, v) == blkid_uuid(disk, v.offset)
    with pytest.raises(PartitionError) as info:
        find(disk, partition=3)
    one_line(info.value, disk, "partition 3 is not in the table", "MBR: 1, 2")
    assert info.value.hint is None  # the message lists the partitions there are


def test_a_mislabelled_partition_that_holds_ext4_is_a_candidate(tmp_path):
    disk = blank(tmp_path / "disk.img", 32 * MiB)
    (p,) = sfdisk(disk, "label: dos\nsize=16MiB, type=7\n")
    mkfs_at(disk, int(p["start"]) * SECTOR, 16 * MiB)  # type: ignore[call-overload]
    assert find(disk).description == "partition 1 (MBR type 0x07 NTFS/exFAT)"


def logical_disk(tmp_path: Path) -> tuple[Path, list[dict[str, object]]]:
    """Primary 1 (Linux, empty), extended 2, logicals 5 (Linux, empty), 6 (ext4), 7 (swap type)."""
    disk = blank(tmp_path / "disk.img", 96 * MiB)
    parts = sfdisk(disk, "label: dos\nsize=16MiB, type=83\ntype=5\nsize=8MiB, type=83\nsize=24MiB, type=83\n"
                         "size=8MiB, type=82\n")  # fmt: skip
    assert [p["number"] for p in parts] == [1, 2, 5, 6, 7]
    # partx (libblkid) numbers logical partitions as the kernel does
    partx = run("partx", "--show", "-g", "-o", "NR,START,SECTORS", disk).split("\n")
    rows = [tuple(int(x) for x in line.split()) for line in partx if line.strip()]
    assert rows == [(p["number"], p["start"], p["size"]) for p in parts], rows
    return disk, parts


def test_logical_partitions_in_an_extended_one(tmp_path):
    disk, parts = logical_disk(tmp_path)
    by_number = {p["number"]: p for p in parts}
    uuid = mkfs_at(disk, int(by_number[6]["start"]) * SECTOR, 24 * MiB)  # type: ignore[call-overload]
    v = find(disk)
    assert_is(v, by_number[6], 6)
    assert v.description == "partition 6 (MBR logical, type 0x83 Linux)" and our_uuid(disk, v) == uuid
    with pytest.raises(UnsupportedFilesystemError) as info:
        find(disk, partition=5)
    one_line(info.value, disk, "partition 5 (MBR logical, type 0x83 Linux) holds zeros")
    with pytest.raises(PartitionError) as info:
        find(disk, partition=2)
    one_line(info.value, disk, "partition 2 is the extended partition", "1, 5, 6, 7")


def test_a_loop_in_the_extended_chain_ends_it(tmp_path):
    disk, parts = logical_disk(tmp_path)
    by_number = {p["number"]: p for p in parts}
    mkfs_at(disk, int(by_number[5]["start"]) * SECTOR, 8 * MiB)  # type: ignore[call-overload]
    # the EBR of logical 6 links back to the first EBR (at the extended partition's start)
    ebr6 = int(by_number[6]["start"]) - 2048  # type: ignore[call-overload]  # sfdisk leaves 1 MiB before each
    with open(disk, "r+b") as f:
        f.seek(ebr6 * SECTOR + 446 + 16)
        entry = bytearray(f.read(16))
        assert entry[4] in (0x05, 0x0F, 0x85)  # the link to logical 7's EBR
        entry[8:12] = (0).to_bytes(4, "little")  # relative to the extended partition: its first EBR
        f.seek(ebr6 * SECTOR + 446 + 16)
        f.write(entry)
    t0 = time.monotonic()
    v = find(disk)
    assert v.number == 5 and time.monotonic() - t0 < 5
    with pytest.raises(PartitionError) as info:
        find(disk, partition=7)
    one_line(info.value, disk, "partition 7 is not in the table", "loops back to sector")


def test_a_partition_past_the_end_of_the_disk(tmp_path):
    disk = blank(tmp_path / "disk.img", 64 * MiB)
    (p,) = sfdisk(disk, "label: dos\nstart=2048, size=65536, type=83\n")
    mkfs_at(disk, int(p["start"]) * SECTOR, 32 * MiB)  # type: ignore[call-overload]
    os.truncate(disk, 16 * MiB)  # the filesystem starts inside, ends outside
    with pytest.raises(PartitionError) as info:
        find(disk)
    one_line(info.value, disk, "partition 1 (MBR type 0x83 Linux) ends past the end of the disk",
             f"at byte {(2048 + 65536) * SECTOR}", f"the disk has {16 * MiB}")  # fmt: skip


# -- GPT ---------------------------------------------------------------------------------------

GPT_LINUX = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
GPT_EFI = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"


def test_gpt_one_linux_filesystem_beside_an_efi_partition(tmp_path):
    disk = blank(tmp_path / "disk.img", 64 * MiB)
    parts = sfdisk(disk, f"label: gpt\nsize=8MiB, type={GPT_EFI}\nsize=24MiB, type={GPT_LINUX}\n")
    uuid = mkfs_at(disk, int(parts[1]["start"]) * SECTOR, 24 * MiB)  # type: ignore[call-overload]
    v = find(disk)
    assert_is(v, parts[1], 2)
    assert v.description == "partition 2 (GPT Linux filesystem)" and our_uuid(disk, v) == uuid


def gpt_two(tmp_path: Path) -> tuple[Path, list[dict[str, object]]]:
    disk = blank(tmp_path / "disk.img", 64 * MiB)
    parts = sfdisk(disk, f"label: gpt\nsize=16MiB, type={GPT_LINUX}\nsize=24MiB, type={GPT_LINUX}\n")
    for p, size in zip(parts, (16 * MiB, 24 * MiB), strict=True):
        mkfs_at(disk, int(p["start"]) * SECTOR, size)  # type: ignore[call-overload]
    return disk, parts


def test_gpt_two_linux_filesystems(tmp_path):
    disk, parts = gpt_two(tmp_path)
    with pytest.raises(PartitionError) as info:
        find(disk)
    one_line(info.value, disk, "2 partitions hold", "GPT Linux filesystem")
    assert_is(find(disk, partition=1), parts[0], 1)
    assert_is(find(disk, partition=2), parts[1], 2)


def test_gpt_with_a_corrupt_primary_header_uses_the_backup(tmp_path):
    disk, parts = gpt_two(tmp_path)
    with open(disk, "r+b") as f:
        f.seek(SECTOR + 40)  # first_usable_lba: under the header CRC
        f.write(b"\xff")
    assert table(disk) == parts  # libfdisk also falls back to the backup
    assert_is(find(disk, partition=2), parts[1], 2)
    # both headers corrupt: a clear error
    with open(disk, "r+b") as f:
        f.seek(os.path.getsize(disk) - SECTOR + 40)
        f.write(b"\xff")
    with pytest.raises(PartitionError) as info:
        find(disk, partition=2)
    one_line(info.value, disk, "the GPT is corrupt", "header CRC mismatch")


def test_gpt_entry_past_the_end_of_the_disk(tmp_path):
    """An entry whose last LBA is past the disk (CRCs made right again) is refused when chosen."""
    disk = blank(tmp_path / "disk.img", 64 * MiB)
    (p,) = sfdisk(disk, f"label: gpt\nsize=16MiB, type={GPT_LINUX}\n")
    mkfs_at(disk, int(p["start"]) * SECTOR, 16 * MiB)  # type: ignore[call-overload]
    with open(disk, "r+b") as f:
        f.seek(SECTOR)
        header = bytearray(f.read(92))
        entries_at = int.from_bytes(header[72:80], "little") * SECTOR
        count, size = int.from_bytes(header[80:84], "little"), int.from_bytes(header[84:88], "little")
        f.seek(entries_at)
        entries = bytearray(f.read(count * size))
        entries[40:48] = (200 * MiB // SECTOR).to_bytes(8, "little")  # last_lba of entry 1
        header[88:92] = zlib.crc32(entries).to_bytes(4, "little")
        header[16:20] = bytes(4)
        header[16:20] = zlib.crc32(header).to_bytes(4, "little")
        f.seek(entries_at)
        f.write(entries)
        f.seek(SECTOR)
        f.write(header)
    with pytest.raises(PartitionError) as info:
        find(disk)
    one_line(info.value, disk, "partition 1 (GPT Linux filesystem) ends past the end of the disk")


# -- the kernel reads the chosen range ---------------------------------------------------------------


def test_the_kernel_mounts_the_chosen_range(tmp_path):
    """A read-only loop mount at the volume's offset and size limit reads back a file mkfs put there."""
    require_root("loop mounts")
    require_tool("mount", "mount")
    tree = tmp_path / "tree"
    tree.mkdir()
    content = random.Random(1).randbytes(300_000)
    (tree / "file").write_bytes(content)
    disk, parts = logical_disk(tmp_path)
    six = next(p for p in parts if p["number"] == 6)
    mkfs_at(disk, int(six["start"]) * SECTOR, 24 * MiB, "-d", str(tree))  # type: ignore[call-overload]
    v = find(disk)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run("mount", "-o", f"loop,ro,noload,offset={v.offset},sizelimit={v.size}", disk, mnt)
    try:
        assert (mnt / "file").read_bytes() == content
    finally:
        subprocess.run(["umount", mnt], check=False)
        if os.path.ismount(mnt):
            subprocess.run(["umount", "-l", mnt], check=False)


# -- fuzz ---------------------------------------------------------------------------------------

FUZZ = Path(__file__).parent / "fuzz"


def load_harness(name: str):  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), FUZZ / name)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SMALL_TABLES = [  # sfdisk scripts for 96 KiB disks: every kind of table, partitions of a few sectors
    "label: dos\nstart=1, size=30, type=83\nstart=31, size=20, type=82\n",
    "label: dos\nstart=1, size=30, type=83\nstart=31, size=120, type=5\nstart=33, size=20, type=83\n"
    "start=55, size=20, type=83\nstart=77, size=20, type=7\n",
    f"label: gpt\nfirst-lba: 34\nstart=34, size=40, type={GPT_LINUX}\nstart=74, size=40, type={GPT_LINUX}\n",
    f"label: gpt\nfirst-lba: 34\nstart=34, size=40, type={GPT_EFI}\nstart=74, size=40, type={GPT_LINUX}\n",
]


def seed_disks(folder: Path) -> list[bytes]:
    """Small disks with real tables (sfdisk) and an ext superblock's magic number in each partition
    that is not extended or swap."""
    require_tool("sfdisk", "fdisk")
    out = []
    for i, script in enumerate(SMALL_TABLES):
        path = blank(folder / f"seed-{i}.img", 96 * 1024)
        for p in sfdisk(path, script):
            if p["type"] not in ("5", "82"):
                with open(path, "r+b") as f:
                    f.seek(int(p["start"]) * SECTOR + 1024)  # type: ignore[call-overload]
                    f.write((1000).to_bytes(4, "little") + bytes(0x34) + b"\x53\xef")
        out.append(path.read_bytes())
    return out


@st.composite
def mutated_disks(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A seed disk with bytes flipped where the tables are (MBR, EBRs, GPT headers and entries)."""
    data = bytearray(draw(st.sampled_from(seeds)))
    ebrs = [i for i in range(SECTOR, len(data), SECTOR) if data[i + 510 : i + 512] == b"\x55\xaa"] or [0]
    hot = [st.integers(440, 511), st.integers(512, 600), st.integers(1024, 1300), st.integers(0, len(data) - 1),
           st.integers(len(data) - 512, len(data) - 420),
           st.sampled_from(ebrs).flatmap(lambda e: st.integers(e + 446, e + 511))]  # fmt: skip
    for _ in range(draw(st.integers(1, 8))):
        data[draw(st.one_of(*hot))] ^= draw(st.integers(1, 255))
    if draw(st.integers(0, 9)) == 0:
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(draw(st.integers(0, 255)).to_bytes(1, "little")) + bytes(data[1:]) if data else b""


def test_mutated_tables_raise_only_filesystem_errors(tmp_path):
    """The atheris target, fed mutated seed disks by hypothesis (atheris or not)."""
    module = load_harness("fuzz_partitions.py")
    seeds = seed_disks(tmp_path)
    for seed in seeds:  # the seeds themselves find their partitions
        module.test_one_input(seed)

    @settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
    @given(mutated_disks(seeds))
    def check(data: bytes) -> None:
        module.test_one_input(data)

    check()


def test_atheris_partitions_harness(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, seed in enumerate(seed_disks(tmp_path)):
        (corpus / f"seed-{i}").write_bytes(seed)
    run_atheris(FUZZ / "fuzz_partitions.py", corpus, 20_000, "-seed=12345", "-max_len=100000", artifacts=tmp_path)
