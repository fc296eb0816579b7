"""The reader against the kernel: every layout of tests/support/fstree.py, made by mkfs -d, read as a raw image.

The oracle is the kernel's read-only loop mount (lstat of every entry, readlink, listxattr/getxattr,
sha256 of every file). Each layout is also checked with e2fsprogs (dumpe2fs, debugfs) to hold the
structures it is meant to cover, so that a layout cannot quietly stop testing what it claims.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from conftest import require_root, require_tool
from support.fstree import LAYOUTS, assert_same_view, kernel_view, mounted, reader_view

import ubdcow


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_raw_image_reads_as_the_kernel_reads_it(fs_images, layout):
    require_root("building the tree (owners, devices) and the loop mount")
    image = fs_images.image(layout)
    with mounted(image) as point:
        kernel = kernel_view(point)
    with ubdcow.open_fs(image) as fs:
        ours = reader_view(fs)
        assert fs.where == "whole disk" and not fs.needs_recovery
    assert len(kernel) > 3100
    assert_same_view(kernel, ours)


def e2(tool: str, image: Path, *args: str) -> str:
    proc = subprocess.run([require_tool(tool, "e2fsprogs"), *args, str(image)], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def debugfs(image: Path, request: str) -> str:
    return e2("debugfs", image, "-R", request)


def header(image: Path) -> dict[str, str]:
    text = e2("dumpe2fs", image, "-h")
    return {k.strip(): v.strip() for k, v in re.findall(r"^([^:\n]+):\s*(.*)$", text, re.M)}


#: what e2fsprogs must see in each layout: features present/absent, block and inode size, revision
EXPECTED = {
    "ext4": ({"extent", "64bit", "flex_bg", "huge_file", "metadata_csum", "dir_index"}, set(), 4096, 256),
    "1k-128": ({"extent"}, set(), 1024, 128),
    "ext2": ({"filetype", "large_file"}, {"has_journal", "extent"}, 4096, 256),
    "ext2-rev0": (set(), set(), 4096, 128),
    "ext3": ({"has_journal"}, {"extent"}, 4096, 256),
    "inline": ({"inline_data", "extent"}, set(), 4096, 256),
    "no64": ({"extent"}, {"64bit", "metadata_csum", "flex_bg"}, 4096, 256),
    "2k-largedir": ({"large_dir"}, set(), 2048, 256),
    "meta_bg": ({"meta_bg"}, {"resize_inode"}, 1024, 256),
    "ea_inode": ({"ea_inode"}, set(), 4096, 256),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_holds_the_structures_it_covers(fs_images, layout):
    require_root("building the tree (owners, devices)")
    image = fs_images.image(layout)
    facts = header(image)
    present, absent, block_size, inode_size = EXPECTED[layout]
    features = set(facts["Filesystem features"].split())
    assert present <= features and not absent & features, features
    assert int(facts["Block size"]) == block_size
    assert int(facts.get("Inode size", "128")) == inode_size
    if layout == "ext2-rev0":
        assert facts["Filesystem revision #"].startswith("0")
    if "extent" in present:  # an extent tree of depth 2 (1500 extents)
        assert re.search(r"^\s*2/\s*2\s", debugfs(image, "dump_extents /files/fragmented"), re.M)
    if LAYOUTS[layout].big_sparse and "extent" not in features:  # past 4 GiB through triple indirect blocks
        assert "(TIND)" in debugfs(image, "stat /files/past-4G")
    if LAYOUTS[layout].index_dirs:
        assert "Root node dump" in debugfs(image, 'htree_dump "/big dir"')
    if layout == "inline":
        for size in (0, 60, 61):
            info = debugfs(image, f"stat /files/size-{size}")
            assert "Flags: 0x10000000" in info and f"Size of inline data: {max(size, 60)}" in info, info
        assert "Flags: 0x10000000" in debugfs(image, "stat /xattrs/dir")  # an inline directory
    if layout == "ea_inode":  # a value as large as a block fits no xattr block: it lives in an ea_inode
        assert "user.huge (4096)" in debugfs(image, "ea_list /xattrs/ea-inode")
    if layout == "meta_bg":  # inodes in the last of the three meta groups
        last_group = (int(facts["Block count"]) - 1) // int(facts["Blocks per group"])
        inodes = [int(line.split()[0]) for line in debugfs(image, 'ls -l "/big dir"').splitlines() if line.strip()]
        assert last_group >= 32 and max(inodes) > 32 * int(facts["Inodes per group"])


def partitioned_disk(folder: Path, images: list[Path], label: str) -> tuple[Path, list[int]]:
    """A disk with an MBR or GPT (``label``: dos or gpt, written by sfdisk) and one partition per image
    (Linux type), each image copied in at its partition's offset; returns the disk and the offsets."""
    sfdisk = require_tool("sfdisk", "fdisk")
    mib = 1 << 20
    sizes = [-(-im.stat().st_size // mib) for im in images]
    disk = folder / f"disk-{label}.img"
    with open(disk, "wb") as f:
        f.truncate((sum(sizes) + 2 * len(sizes) + 2) * mib)
    starts, at = [], 1
    for size in sizes:
        starts.append(at)
        at += size + 1
    script = f"label: {label}\n" + "".join(f"start={s * 2048}, size={z * 2048}, type=linux\n"
                                            for s, z in zip(starts, sizes, strict=True))  # fmt: skip
    proc = subprocess.run([sfdisk, "-q", str(disk)], input=script, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for image, start in zip(images, starts, strict=True):
        proc = subprocess.run(["dd", f"if={image}", f"of={disk}", "bs=1M", f"seek={start}", "conv=sparse,notrunc",
                               "status=none"], capture_output=True, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
    return disk, [s * mib for s in starts]


@pytest.mark.slow
def test_a_filesystem_inside_a_partitioned_disk(fs_images, tmp_path):
    require_root("building the tree (owners, devices) and the loop mount")
    image = fs_images.image("no64")
    disk, (offset,) = partitioned_disk(tmp_path, [image], "dos")
    with mounted(disk, offset=offset) as point:
        kernel = kernel_view(point)
    with ubdcow.open_fs(disk) as fs:  # the only Linux partition, found by itself
        assert fs.where.startswith("partition 1") and fs.size == image.stat().st_size
        assert_same_view(kernel, reader_view(fs))
        with pytest.raises(ubdcow.FsFileNotFoundError) as err:
            fs.stat("/nope")
        assert str(err.value) == f"{disk}: partition 1: /nope: no such file or directory"
    cow = tmp_path / "overlay.cow"  # an overlay on the partitioned disk reads the same
    ubdcow.create(cow, disk)
    with ubdcow.open_fs(cow, partition=1) as over, ubdcow.open_fs(disk) as raw:
        assert list(over.walk("/")) == list(raw.walk("/"))
        assert over.read_bytes("/files/random-3M") == raw.read_bytes("/files/random-3M")


@pytest.mark.slow
def test_several_partitions_need_a_choice(fs_images, tmp_path):
    require_root("building the tree (owners, devices) and the loop mount")
    images = [fs_images.image("ext2-rev0"), fs_images.image("ea_inode")]
    disk, offsets = partitioned_disk(tmp_path, images, "gpt")
    with pytest.raises(ubdcow.PartitionError, match="2 partitions hold an ext2/ext3/ext4") as err:
        ubdcow.open_fs(disk)
    assert "\n" not in str(err.value) and "1 (start " in str(err.value) and "2 (start " in str(err.value)
    for number, (image, offset) in enumerate(zip(images, offsets, strict=True), start=1):
        with mounted(disk, offset=offset) as point:
            kernel = kernel_view(point)
        with ubdcow.open_fs(disk, partition=number) as fs:
            assert fs.where.startswith(f"partition {number}") and fs.size == image.stat().st_size
            assert_same_view(kernel, reader_view(fs))


@pytest.mark.parametrize("layout", ["ext2-rev0", "inline", "ea_inode", "meta_bg"])
def test_debugfs_lists_every_folder_as_the_reader_does(fs_images, tmp_path, layout):
    """A second oracle, without the kernel: ``debugfs -R 'ls -p'`` of every folder (inode, mode, owner, size
    of each entry). /names is left out: one of its names holds a newline, which ls -p cannot show."""
    require_root("building the tree (owners, devices)")
    image = fs_images.image(layout)
    with ubdcow.open_fs(image) as fs:
        folders = [st.path for st in fs.walk(b"/") if st.type == "dir" and not st.path.startswith(b"/names")]
        ours = {d: {(s.name, s.inode, s.st_mode, s.uid, s.gid, None if s.type == "dir" else s.size)
                    for s in fs.scandir(d)} for d in folders}  # fmt: skip
    commands = tmp_path / "commands"
    commands.write_bytes(b"".join(b'ls -p "%s"\n' % d for d in folders))
    proc = subprocess.run([require_tool("debugfs", "e2fsprogs"), "-f", str(commands), str(image)],
                          capture_output=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    theirs: dict[bytes, set[tuple[bytes, int, int, int, int, int | None]]] = {}
    current = b""
    for line in proc.stdout.split(b"\n"):
        if line.startswith(b"debugfs: ls -p "):
            current = line[len(b"debugfs: ls -p ") :].strip(b'"')
            theirs[current] = set()
        elif line.startswith(b"/") and line.endswith(b"/"):
            _, ino, mode, uid, gid, rest = line.split(b"/", 5)
            name, size = rest[:-1].rsplit(b"/", 1)
            if name not in (b".", b"..") and int(ino):  # ls -p shows empty slots, and no size for folders
                theirs[current].add((name, int(ino), int(mode, 8), int(uid) & 0xFFFFFFFF, int(gid) & 0xFFFFFFFF,
                                     int(size) if size else None))  # debugfs prints ids signed
    assert theirs.keys() == ours.keys()
    different = [d for d in folders if theirs[d] != ours[d]]
    assert not different, (different[:3], [sorted(theirs[d] ^ ours[d])[:5] for d in different[:3]])
