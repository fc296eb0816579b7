"""Overlays changed by a real guest: the reader on the COW file against the kernel's view of the merged disk.

For each layout, a COW overlay on the layout's image is attached to a real UML guest as /dev/ubdb;
the guest mounts it, creates, deletes, renames, chmods/chowns, writes, truncates, sets xattrs, makes
folders (one of 600 entries: hashed by the kernel), hard links, symlinks, FIFOs and devices, punches
entries out of the big folder, writes into a hole, preallocates (uninitialized extents) where the
layout has extents, then unmounts cleanly and halts. The oracle is the kernel's read-only loop mount of
the overlay merged by ``uml_moo`` (not by ubdcow); ubdcow's reader reads the COW file itself.
"""

from __future__ import annotations

import base64
import os
import shlex
import subprocess
from pathlib import Path

import pytest
from conftest import require_root, require_tool
from support.fslab import boot, checked
from support.fstree import LAYOUTS, assert_same_view, kernel_view, mounted, reader_view

import ubdcow

pytestmark = [pytest.mark.uml, pytest.mark.slow]
OVERLAY_LAYOUTS = ["ext2", "ext3", "ext4", "1k-128", "inline", "ea_inode"]
GUEST_TOOLS = ("mount", "umount", "dd", "rm", "mv", "chmod", "chown", "truncate", "mkdir", "ln", "mkfifo",
               "mknod", "touch", "setfattr", "fallocate", "sync")  # fmt: skip


def guest_script(point: Path, layout: str, extents: bool, restore: Path | None) -> str:
    m = shlex.quote(str(point))
    lines = [
        f"mount /dev/ubdb {m}",
        f"echo guest > {m}/files/new-file",
        f"dd if=/dev/urandom of={m}/files/new-big bs=65536 count=48 status=none",
        f"rm {m}/files/size-100",
        f"mv {m}/files/size-4096 {m}/renamed",
        f"chmod 4711 {m}/renamed",
        f"chown 1234:5678 {m}/renamed",
        f"truncate -s 10 {m}/files/random-3M",
        f"truncate -s 9000000 {m}/files/size-70000",
        f"mkdir -p {m}/guest/sub/dir",
        f"i=0; while [ $i -lt 600 ]; do : > {m}/guest/sub/many-$i; i=$((i+1)); done",
        f"ln {m}/files/new-file {m}/guest/hard",
        f"ln -s /files/new-file {m}/guest/link",
        f"ln -s {'z' * 300} {m}/guest/long-link",
        f"mkfifo {m}/guest/fifo",
        f"mknod {m}/guest/dev c 10 200",
        f"rm -f {m}/'big dir'/entry-000*",
        f"printf 'in the hole' | dd of={m}/files/holes bs=1 seek=100000 conv=notrunc status=none",
        f"touch -h -d '1950-06-01 12:00:00.123456789' {m}/guest/hard",
        f"mkdir {m}/guest/small && echo tiny > {m}/guest/small/a",  # inline where the layout has inline_data
    ]
    if LAYOUTS[layout].xattrs:
        lines.append(f"setfattr -n user.guest -v added {m}/files/new-file")
    if extents:
        lines += [f"fallocate -l 1048576 {m}/guest/fallocated",
                  f"printf data | dd of={m}/guest/fallocated bs=1 seek=500000 conv=notrunc status=none"]  # fmt: skip
    if restore is not None:
        lines.append(f"setfattr --restore={shlex.quote(str(restore))}")
    lines += ["sync", f"umount {m}"]
    return "".join(checked(line) for line in lines)


def features(image: Path) -> set[str]:
    text = subprocess.run([require_tool("dumpe2fs", "e2fsprogs"), "-h", str(image)], capture_output=True,
                          text=True, timeout=60).stdout  # fmt: skip
    line = next(line for line in text.splitlines() if line.startswith("Filesystem features:"))
    return set(line.split(":", 1)[1].split())


@pytest.mark.parametrize("layout", OVERLAY_LAYOUTS)
def test_overlay_after_a_guest_reads_as_the_kernel_reads_the_merged_disk(fs_images, tmp_path, layout):
    require_root("building the tree and the loop mount")
    for tool in GUEST_TOOLS:
        require_tool(tool, "coreutils util-linux attr mount")
    moo = require_tool("uml_moo")
    image = fs_images.image(layout)
    before = os.stat(image)
    cow = tmp_path / "overlay.cow"
    ubdcow.create(cow, image)
    point = tmp_path / "guest-mnt"
    point.mkdir()
    restore = None
    if LAYOUTS[layout].ea_inode_size:  # a value of two blocks and more, set by the kernel: an ea_inode
        restore = tmp_path / "xattr.dump"
        value = base64.b64encode(os.urandom(9000)).decode()
        restore.write_text(f"# file: {point}/xattrs/file\nuser.guest-huge=0s{value}\n")
    boot(guest_script(point, layout, "extent" in features(image), restore), f"ubdb={cow}", workdir=tmp_path)
    merged = tmp_path / "merged.img"
    proc = subprocess.run([moo, "-b", str(image), str(cow), str(merged)], capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    with mounted(merged) as merged_point:
        kernel = kernel_view(merged_point)
    with ubdcow.open_fs(cow) as fs:
        ours = reader_view(fs)
    assert b"/guest/sub/many-599" in kernel and b"/files/size-100" not in kernel  # the guest's work is there
    assert_same_view(kernel, ours)
    covered(merged, layout, image)
    after = os.stat(image)
    assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)  # the backing is untouched


def covered(merged: Path, layout: str, image: Path) -> None:
    """The guest made what the layout is meant to exercise (seen by debugfs on the merged disk)."""
    debugfs = require_tool("debugfs", "e2fsprogs")

    def ask(request: str) -> str:
        return subprocess.run([debugfs, "-R", request, str(merged)], capture_output=True, text=True,
                              timeout=60).stdout  # fmt: skip

    found = features(image)
    if "dir_index" in found and layout != "ext2":  # the guest's ext2 driver writes linear folders
        assert "Root node dump" in ask("htree_dump /guest/sub")  # hashed by the kernel
    if "extent" in found:
        assert "Uninit" in ask("dump_extents /guest/fallocated")
    if "inline_data" in found:
        assert "Flags: 0x10000000" in ask("stat /guest/small")  # an inline directory made by the kernel
    if LAYOUTS[layout].ea_inode_size:
        assert "user.guest-huge (9000)" in ask("ea_list /xattrs/file")
