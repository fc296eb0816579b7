"""Fixtures of the filesystem reader's tests: an awkward tree, images of every layout, and two views of them.

- :func:`build_tree`: every case the issue lists (every file type, suid/sgid/sticky modes, owners past
  16 bits, a directory of thousands of entries, short/fast-limit/slow/long symlinks, hard links, holes
  and a size past 4 GiB, inline-data edges of 0, 60 and 61 bytes, xattrs in the inode, in a block and in
  an ea_inode, POSIX ACLs, names with spaces, UTF-8, invalid UTF-8 and 255 bytes, 40-level nesting,
  times before 1970 and after 2038 with nanoseconds);
- :data:`LAYOUTS` and :func:`make_image`: ``mkfs.ext2/3/4 -d`` with the options of each layout;
- :func:`mounted`: the kernel's read-only loop mount (always unmounted);
- :func:`kernel_view` / :func:`reader_view`: the same record per entry from the kernel (lstat,
  readlink, listxattr/getxattr, sha256) and from ubdcow's reader; :func:`assert_same_view`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import stat
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest import require_root, require_tool

GiB = 1 << 30
#: 1960-01-01 and 2100-01-01 and 2400-01-01 (UTC), with nanoseconds
BEFORE_1970 = -315_619_200 * 10**9 + 123_456_789
AFTER_2038 = 4_102_444_800 * 10**9 + 987_654_321
FAR_FUTURE = 13_569_465_600 * 10**9 + 5
BIG_DIR_ENTRIES = 3000
NESTING = 40


@dataclass(frozen=True)
class Layout:
    """One way of making the filesystem: the mkfs program, its options and what the tree may hold."""

    name: str
    mkfs: str
    options: tuple[str, ...] = ()
    size: str = "600M"  # sparse image files; past mke2fs's "small" type, so 4 KiB blocks by default
    xattr_size: int = 1500  # one value of this size goes to the external block
    ea_inode_size: int = 0  # a value of this size in an ea_inode (needs -O ea_inode)
    xattrs: bool = True  # revision 0 has no extended attributes
    big_sparse: bool = False  # a sparse file past 4 GiB (needs large_file; hashing it takes seconds)
    index_dirs: bool = False  # e2fsck -fD afterwards: hashed (htree) directories
    journal: bool = False
    long_symlink: int = 4000  # the longest symlink target (less than a block)
    inodes: int = 8192


LAYOUTS = {
    layout.name: layout
    for layout in (
        # default: extents, flex_bg, 64bit, huge_file, metadata_csum
        Layout("ext4", "mkfs.ext4", index_dirs=True, journal=True, big_sparse=True),
        Layout("1k-128", "mkfs.ext4", ("-b", "1024", "-I", "128"), xattr_size=700, journal=True, long_symlink=1000,
               big_sparse=True),  # fmt: skip
        Layout("ext2", "mkfs.ext2", index_dirs=True, big_sparse=True),  # past 4 GiB: triple indirect blocks
        Layout("ext2-rev0", "mke2fs", ("-t", "ext2", "-r", "0"), xattrs=False),
        Layout("ext3", "mkfs.ext3", journal=True),
        Layout("inline", "mkfs.ext4", ("-O", "inline_data"), journal=True),
        Layout("no64", "mkfs.ext4", ("-O", "^64bit,^metadata_csum,^flex_bg"), journal=True),
        Layout("2k-largedir", "mkfs.ext4", ("-b", "2048", "-O", "large_dir"), index_dirs=True, journal=True,
               long_symlink=2000),  # fmt: skip
        # 38 groups of 1 KiB blocks, 16 descriptors per block: three meta groups; few inodes per group, so
        # that the tree's inodes spread into all three (their inode tables found through meta_bg)
        Layout("meta_bg", "mkfs.ext4", ("-b", "1024", "-O", "meta_bg,^resize_inode"), size="300M",
               xattr_size=700, journal=True, long_symlink=1000, inodes=3400),  # fmt: skip
        Layout("ea_inode", "mkfs.ext4", ("-O", "ea_inode"), ea_inode_size=9000, journal=True),
    )
}


def _acl(entries: list[tuple[int, int, int]]) -> bytes:
    """A POSIX ACL in the xattr form setxattr takes (version 2; id -1 for the owner/group/mask/other)."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, ident) for tag, perm, ident in entries)


ACL = _acl([(1, 6, 0xFFFFFFFF), (2, 4, 1000), (4, 4, 0xFFFFFFFF), (8, 5, 2000), (0x10, 5, 0xFFFFFFFF),
            (0x20, 0, 0xFFFFFFFF)])  # fmt: skip
DEFAULT_ACL = _acl([(1, 7, 0xFFFFFFFF), (4, 5, 0xFFFFFFFF), (0x20, 5, 0xFFFFFFFF)])


def build_tree(root: Path, layout: Layout) -> None:
    """Write the awkward tree under ``root`` (as root: owners, devices, trusted.* xattrs)."""
    root.mkdir(parents=True)
    r = root
    (r / "files").mkdir()
    for size in (0, 1, 59, 60, 61, 100, 160, 4095, 4096, 4097, 70_000, 1_000_003):
        (r / "files" / f"size-{size}").write_bytes(bytes((i * 7 + size) % 251 for i in range(size)))
    (r / "files" / "random-3M").write_bytes(os.urandom(3 << 20))
    _sparse(r / "files" / "holes", [(8192, b"after a hole"), (200_000, os.urandom(5000)), (3 << 20, b"end")])
    _sparse(r / "files" / "hole-at-end", [(0, b"start")], size=1 << 20)
    # 1500 pieces: 1500 extents, a tree of depth 2 (a leaf holds 340 of them in 4 KiB, 84 in 1 KiB)
    _sparse(r / "files" / "fragmented", [(i * 8192, b"piece %d" % i) for i in range(1500)])
    if layout.big_sparse:
        past = 4 * GiB + (16 << 20)  # beyond the double indirect blocks of 4 KiB blocks: triple indirect
        _sparse(r / "files" / "past-4G", [(0, b"head"), (past, b"past four GiB")], size=past + (1 << 20))
    _modes(r)
    _special(r)
    _links(r, layout)
    _names(r)
    big = r / "big dir"
    big.mkdir()
    for i in range(BIG_DIR_ENTRIES):
        (big / f"entry-{i:05d}-{'x' * (i % 40)}").write_bytes(b"%d" % i if i % 10 == 0 else b"")
    deep = r / "deep"
    for i in range(NESTING):
        deep = deep / f"level{i:02d}"
    deep.mkdir(parents=True)
    (deep / "bottom").write_text("40 levels down\n")
    if layout.xattrs:
        _xattrs(r, layout)
    _times(r)


def _sparse(path: Path, pieces: list[tuple[int, bytes]], size: int | None = None) -> None:
    with open(path, "wb") as f:
        for offset, data in pieces:
            f.seek(offset)
            f.write(data)
        if size is not None:
            f.truncate(size)


def _modes(r: Path) -> None:
    m = r / "modes"
    m.mkdir()
    for name, mode in (("suid", 0o4755), ("sgid", 0o2750), ("all", 0o7777), ("none", 0o000), ("exec", 0o711)):
        (m / name).write_text(name)
        os.chmod(m / name, mode)
    (m / "sticky-dir").mkdir()
    os.chmod(m / "sticky-dir", 0o1777)
    (m / "sgid-dir").mkdir()
    os.chmod(m / "sgid-dir", 0o2775)
    for name, (uid, gid) in {"owner-1000": (1000, 1000), "owner-70000": (70000, 70001),
                             "owner-3e9": (3_000_000_000, 4_000_000_000)}.items():  # fmt: skip
        (m / name).write_text(name)
        os.chown(m / name, uid, gid)


def _special(r: Path) -> None:
    s = r / "special"
    s.mkdir()
    os.mkfifo(s / "fifo")
    os.mknod(s / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(s / "sda1", 0o660 | stat.S_IFBLK, os.makedev(8, 1))
    os.mknod(s / "wide", 0o600 | stat.S_IFCHR, os.makedev(300, 70000))  # the new 32-bit encoding
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(s / "socket"))


def _links(r: Path, layout: Layout) -> None:
    ln = r / "links"
    ln.mkdir()
    (ln / "target").write_text("the target\n")
    os.symlink("target", ln / "short")
    os.symlink("t" * 59, ln / "fast-59")  # the longest that fits i_block
    os.symlink("t" * 60, ln / "slow-60")
    os.symlink("/links/" + "long/" * 100 + "end", ln / "long-507")
    os.symlink("/" + "x" * (layout.long_symlink - 1), ln / "longest")
    os.symlink("/files/size-100", ln / "absolute")
    os.symlink("../files", ln / "to-dir")
    os.symlink("nowhere", ln / "dangling")
    os.symlink("loop-b", ln / "loop-a")
    os.symlink("loop-a", ln / "loop-b")
    (ln / "hard").write_text("three names\n")
    os.link(ln / "hard", ln / "hard-2")
    os.link(ln / "hard", r / "files" / "hard-3")


def _names(r: Path) -> None:
    n = os.fsencode(r / "names")
    os.mkdir(n)
    for name in (b"with space", "ünïcödé 日本語".encode(), b"latin1-\xe9\xff", b"x" * 255, "日".encode() * 85,
                 b"new\nline", b"-dash", b".hidden", b"tab\there"):  # fmt: skip
        with open(os.path.join(n, name), "wb") as f:
            f.write(name)


def _xattrs(r: Path, layout: Layout) -> None:
    x = r / "xattrs"
    x.mkdir()
    f = x / "file"
    f.write_text("with attributes\n")
    os.setxattr(f, "user.small", b"v")
    os.setxattr(f, "user.empty", b"")
    os.setxattr(f, "trusted.binary", bytes(range(256))[:64])
    os.setxattr(f, "security.label", b"ubdcow_t")
    os.setxattr(f, "user.large", os.urandom(layout.xattr_size))
    d = x / "dir"
    d.mkdir()
    os.setxattr(d, "user.on-dir", b"dir value")
    os.setxattr(d, "system.posix_acl_default", DEFAULT_ACL)
    acl = x / "acl"
    acl.write_text("acl\n")
    os.setxattr(acl, "system.posix_acl_access", ACL)
    os.symlink("file", x / "link")
    os.setxattr(x / "link", "trusted.on-link", b"link value", follow_symlinks=False)
    if layout.ea_inode_size:
        (x / "ea-inode").write_text("big\n")  # its attribute is added after mkfs (see make_image)


def _times(r: Path) -> None:
    t = r / "times"
    t.mkdir()
    for name, ns in (("before-1970", BEFORE_1970), ("after-2038", AFTER_2038), ("year-2400", FAR_FUTURE),
                     ("epoch", 0), ("nanos", 1_700_000_000_123_456_789)):  # fmt: skip
        (t / name).write_text(name)
        os.utime(t / name, ns=(ns, ns))
    os.symlink("epoch", t / "link-2100")
    os.utime(t / "link-2100", ns=(AFTER_2038, AFTER_2038), follow_symlinks=False)
    os.utime(t, ns=(BEFORE_1970, AFTER_2038))


def make_image(tree: Path, image: Path, layout: Layout) -> None:
    """``mkfs -d tree`` with the layout's options (and ``e2fsck -fyD`` for hashed directories)."""
    mkfs = require_tool(layout.mkfs, "e2fsprogs")
    cmd = [mkfs, "-q", "-F", "-N", str(layout.inodes), *layout.options, "-d", str(tree), str(image), layout.size]
    proc = subprocess.run(cmd, capture_output=True, timeout=600)
    assert proc.returncode == 0, f"{cmd}: {proc.stderr.decode(errors='replace')}"
    if layout.ea_inode_size:  # larger than a block: the host's filesystem cannot hold it, debugfs writes it
        value = image.with_suffix(".value")
        value.write_bytes(os.urandom(layout.ea_inode_size))
        debugfs = require_tool("debugfs", "e2fsprogs")
        proc = subprocess.run([debugfs, "-w", "-R", f"ea_set -f {value} /xattrs/ea-inode user.huge", str(image)],
                              capture_output=True, timeout=60)  # fmt: skip
        assert proc.returncode == 0 and b"rror" not in proc.stderr, proc.stderr
        value.unlink()
    if layout.index_dirs:
        e2fsck = require_tool("e2fsck", "e2fsprogs")
        proc = subprocess.run([e2fsck, "-fyD", str(image)], capture_output=True, timeout=600)
        assert proc.returncode in (0, 1), proc.stdout.decode(errors="replace")[-2000:]


@dataclass
class Images:
    """Trees and images made once per session, by layout name."""

    folder: Path
    built: dict[str, Path] = field(default_factory=dict)

    def image(self, name: str) -> Path:
        if name not in self.built:
            layout = LAYOUTS[name]
            tree = self.folder / f"tree-{name}"
            build_tree(tree, layout)
            image = self.folder / f"{name}.img"
            make_image(tree, image, layout)
            shutil.rmtree(tree)
            self.built[name] = image
        return self.built[name]


# -- the kernel's view -------------------------------------------------------------------------------------


def _run(*cmd: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([os.fspath(c) for c in cmd], capture_output=True, text=True, timeout=300)


@contextlib.contextmanager
def mounted(image: Path, *, offset: int = 0, noload: bool = True) -> Iterator[Path]:
    """``mount -o loop,ro[,noload][,offset=N] image``: the kernel's read-only view; unmounted on exit."""
    require_root("a loop mount")
    mount, umount = require_tool("mount", "mount"), require_tool("umount", "mount")
    point = Path(tempfile.mkdtemp(prefix="ubdcow-mnt-"))
    options = "loop,ro" + (",noload" if noload else "") + (f",offset={offset}" if offset else "")
    proc = _run(mount, "-t", "ext4", "-o", options, image, point)
    if proc.returncode != 0 and noload:  # ext2 without a journal: noload is refused by some kernels
        proc = _run(mount, "-t", "ext4", "-o", options.replace(",noload", ""), image, point)
    try:
        assert proc.returncode == 0, f"mount {image}: {proc.stderr}"
        yield point
    finally:
        if proc.returncode == 0 and _run(umount, point).returncode != 0:
            _run(umount, "-l", point)
        point.rmdir()


def _kind(mode: int) -> str:
    return {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFCHR: "char",
            stat.S_IFBLK: "block", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket"}[stat.S_IFMT(mode)]  # fmt: skip


def _sha256(read: Any) -> str:
    h = hashlib.sha256()
    while chunk := read(1 << 20):
        h.update(chunk)
    return h.hexdigest()


def kernel_view(point: Path, *, hashes: bool = True) -> dict[bytes, dict[str, Any]]:
    """path inside -> record, from the mounted filesystem: lstat, readlink, xattrs, sha256."""
    base = os.fsencode(point)
    out: dict[bytes, dict[str, Any]] = {}
    pending = [base]
    while pending:
        path = pending.pop()
        st = os.lstat(path)
        kind = _kind(st.st_mode)
        inside = path[len(base) :] or b"/"
        names = os.listxattr(path, follow_symlinks=False)
        record = {
            "type": kind, "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid,
            "size": st.st_size, "nlink": st.st_nlink, "atime_ns": st.st_atime_ns, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns, "inode": st.st_ino, "blocks": st.st_blocks,
            "rdev": (os.major(st.st_rdev), os.minor(st.st_rdev)) if kind in ("char", "block") else None,
            "target": os.readlink(path) if kind == "symlink" else None,
            "xattrs": {n: os.getxattr(path, n, follow_symlinks=False) for n in names},
            "sha256": None,
        }  # fmt: skip
        if kind == "file" and hashes:
            with open(path, "rb") as f:
                record["sha256"] = _sha256(f.read)
        if kind == "dir":
            pending += [os.path.join(path, name) for name in os.listdir(path)]
        out[inside] = record
    return out


def reader_view(fs: Any, *, hashes: bool = True) -> dict[bytes, dict[str, Any]]:
    """The same records from ubdcow's reader (a ``FileSystem``), through ``walk``, ``xattrs`` and ``open``."""
    out: dict[bytes, dict[str, Any]] = {}
    for st in fs.walk(b"/"):
        keys = ("type", "mode", "uid", "gid", "size", "nlink", "atime_ns", "mtime_ns", "ctime_ns", "inode", "blocks",
                "rdev", "target")  # fmt: skip
        record = {key: getattr(st, key) for key in keys}
        record["xattrs"] = fs.xattrs(st.path)
        record["sha256"] = None
        if st.type == "file" and hashes:
            with fs.open(st.path) as f:
                record["sha256"] = _sha256(f.read)
        out[st.path] = record
    return out


def assert_same_view(kernel: dict[bytes, dict[str, Any]], ours: dict[bytes, dict[str, Any]]) -> None:
    """Entry by entry, field by field; the message lists the first differences."""
    problems = [f"only the kernel has {p!r}" for p in sorted(kernel.keys() - ours.keys())]
    problems += [f"only ubdcow has {p!r}" for p in sorted(ours.keys() - kernel.keys())]
    for path in sorted(kernel.keys() & ours.keys()):
        for key, value in kernel[path].items():
            if ours[path].get(key) != value:
                problems.append(f"{path!r} {key}: kernel {value!r:.200} ubdcow {ours[path].get(key)!r:.200}")
    assert not problems, f"{len(problems)} differences:\n" + "\n".join(problems[:30])


# -- fuzzing seeds ------------------------------------------------------------------------------------------

#: small filesystems (256 KiB, 1 KiB blocks) of four kinds, as fuzzing seeds
SEED_LAYOUTS = {
    "ext4": ("mkfs.ext4", "-O", "^has_journal"),
    "ext2": ("mkfs.ext2",),
    "inline": ("mkfs.ext4", "-O", "^has_journal,inline_data"),
    "rev0": ("mke2fs", "-t", "ext2", "-r", "0"),
}


def make_fuzz_seeds(folder: Path) -> list[Path]:
    """256 KiB images of a small tree with a bit of everything: 40 small files, a fragmented file (an extent
    tree of depth 1), symlinks fast and slow, an xattr, a FIFO, nested folders."""
    tree = folder / "seed-tree"
    (tree / "d" / "e").mkdir(parents=True)
    for i in range(40):
        (tree / "d" / f"f{i:02d}").write_bytes(b"x" * (i * 3))
    _sparse(tree / "frag", [(i * 2048, b"p%d" % i) for i in range(12)])
    os.symlink("d/f01", tree / "l")
    os.symlink("/" + "y" * 80, tree / "long")
    (tree / "big").write_bytes(bytes(range(256)) * 80)
    os.mkfifo(tree / "fifo")
    os.setxattr(tree / "d" / "f01", "user.a", b"1" * 300)
    seeds = []
    for name, (mkfs, *options) in SEED_LAYOUTS.items():
        image = folder / f"seed-{name}.img"
        proc = subprocess.run([require_tool(mkfs, "e2fsprogs"), "-q", "-F", "-b", "1024", "-N", "128", *options,
                               "-d", str(tree), str(image), "256K"], capture_output=True, timeout=60)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        seeds.append(image)
    shutil.rmtree(tree)
    return seeds
