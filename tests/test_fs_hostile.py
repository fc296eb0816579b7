"""Hostile filesystems: hand-corrupted copies of a small mkfs -d image give one clear error, fast, in bounded memory.

Each case corrupts a fresh copy (with debugfs where it can, by patching bytes where debugfs cannot
make the damage), then a child process with a 1 GiB address-space limit opens it and does one
operation under a timeout. It must answer with a :class:`~ubdcow.UbdCowError` whose one line names the
disk, the path and the problem (no traceback, no hang, no memory blow-up).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import require_tool

RUNNER = r"""
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
import ubdcow
image, op, path = sys.argv[1:4]
try:
    with ubdcow.open_fs(image) as fs:
        if op == "walk":
            n = sum(1 for _ in fs.walk(path))
        elif op == "read":
            fs.read_bytes(path)
        elif op == "list":
            fs.listdir(path)
        elif op == "stat":
            fs.stat(path, follow_symlinks=True)
        elif op == "xattrs":
            fs.xattrs(path)
    print(json.dumps({"ok": True}))
except ubdcow.UbdCowError as exc:
    print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
"""
BS = 4096


def run(*cmd: str | os.PathLike[str]) -> str:
    proc = subprocess.run([os.fspath(c) for c in cmd], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 32 MiB ext4 (4 KiB blocks): /a/b/c, /a/file, /frag (30 extents: a tree of depth 1), /two (two
    extents), /plain (one), /x (an xattr block), /loop1 <-> /loop2."""
    mkfs = require_tool("mkfs.ext4", "e2fsprogs")
    folder = tmp_path_factory.mktemp("hostile")
    tree = folder / "tree"
    (tree / "a" / "b" / "c").mkdir(parents=True)
    (tree / "a" / "file").write_text("hi\n")
    with open(tree / "frag", "wb") as f:
        for i in range(30):
            f.seek(i * 8192)
            f.write(b"piece%d" % i)
    with open(tree / "two", "wb") as f:
        f.write(b"a" * BS)
        f.seek(65536)
        f.write(b"b" * BS)
    (tree / "plain").write_bytes(b"p" * 10000)
    os.symlink("loop2", tree / "loop1")
    os.symlink("loop1", tree / "loop2")
    (tree / "x").write_text("x")
    os.setxattr(tree / "x", "user.big", b"v" * 1500)
    image = folder / "base.img"
    run(mkfs, "-q", "-b", str(BS), "-d", tree, image, "32M")
    return image


def debugfs(image: Path, *requests: str, write: bool = False) -> str:
    tool = require_tool("debugfs", "e2fsprogs")
    out = ""
    for request in requests:
        out += run(tool, *(["-w"] if write else []), "-R", request, image)
    return out


def first_block(image: Path, path: str) -> int:
    return int(debugfs(image, f"blocks {path}").split()[0])


def extent_tree_block(image: Path, path: str) -> int:
    return int(re.search(r"\(ETB0\):(\d+)", debugfs(image, f"stat {path}")).group(1))  # type: ignore[union-attr]


def inode_table(image: Path) -> int:
    text = run(require_tool("dumpe2fs", "e2fsprogs"), image)
    return int(re.search(r"Inode table at (\d+)", text).group(1))  # type: ignore[union-attr]


def patch(image: Path, offset: int, data: bytes) -> None:
    fd = os.open(image, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def sif(field: str, value: int | str, path: str = "/plain") -> Callable[[Path], None]:
    return lambda image: debugfs(image, f"sif {path} {field} {value}", write=True) and None


def loop_dir(image: Path) -> None:
    debugfs(image, "link /a /a/b/c/up", write=True)


def self_index(image: Path) -> None:
    """The leaf under /frag's root becomes an index node (depth 1) whose entry points at itself."""
    block = extent_tree_block(image, "/frag")
    patch(image, block * BS + 6, struct.pack("<H", 1))
    patch(image, block * BS + 12, struct.pack("<IIHH", 0, block, 0, 0))


def deep_self_index(image: Path) -> None:
    self_index(image)
    debugfs(image, f"sif /frag block[1] {(2 << 16) | 4:#x}", write=True)  # the root now says depth 2


def zero_rec_len(image: Path) -> None:
    patch(image, first_block(image, "/a") * BS + 4, struct.pack("<H", 0))


def entry_inode_out_of_range(image: Path) -> None:
    block = first_block(image, "/a")
    patch(image, block * BS + 24, struct.pack("<I", 0xFFFFFFF0))  # the entry after "." and ".."


def extent_into_inode_table(image: Path) -> None:
    debugfs(image, f"sif /plain block[5] {inode_table(image) + 1}", write=True)


def extent_past_the_end(image: Path) -> None:
    debugfs(image, f"sif /plain block[5] {(32 << 20) // BS + 10}", write=True)


def overlapping_extents(image: Path) -> None:
    debugfs(image, "sif /two block[6] 0", write=True)  # the second extent starts at block 0 too


def truncate_half(image: Path) -> None:
    os.truncate(image, (16 << 20))


def xattr_value_outside(image: Path) -> None:
    block = int(re.search(r"File ACL: (\d+)", debugfs(image, "stat /x")).group(1))  # type: ignore[union-attr]
    patch(image, block * BS + 32 + 2, struct.pack("<H", 4000))  # e_value_offs of the first entry


def huge_directory(image: Path) -> None:
    debugfs(image, "sif /a size 0xFFFFFFFF", write=True)  # one block mapped, 4 GiB claimed


def bad_inode_table(image: Path) -> None:
    debugfs(image, "set_bg 0 inode_table 0x7FFFFFFF", write=True)


def huge_block_count(image: Path) -> None:
    debugfs(image, "ssv blocks_count 0x100000000", write=True)


CASES = {
    # name: (corrupt, operation, path, error class, words the message holds)
    "directory loop": (loop_dir, "walk", "/", "CorruptFilesystemError", ["/a/b/c/up", "reached twice"]),
    "extent index to itself": (self_index, "read", "/frag", "CorruptFilesystemError", ["/frag", "depth 1"]),
    "extent loop at depth 2": (deep_self_index, "read", "/frag", "CorruptFilesystemError", ["/frag", "depth"]),
    "depth 60000": (sif("block[1]", "0xEA600004", "/frag"), "read", "/frag", "CorruptFilesystemError",
                    ["/frag", "depth 60000"]),  # fmt: skip
    "size 2^64-1": (sif("size", "0xFFFFFFFFFFFFFFFF"), "stat", "/plain", "CorruptFilesystemError",
                    ["/plain", "impossible size"]),  # fmt: skip
    "size 2^64-1 in a walk": (sif("size", "0xFFFFFFFFFFFFFFFF"), "walk", "/", "CorruptFilesystemError",
                              ["/plain", "impossible size"]),  # fmt: skip
    "extent into the inode table": (extent_into_inode_table, "read", "/plain", "CorruptFilesystemError",
                                    ["/plain", "overlap filesystem metadata"]),  # fmt: skip
    "extent past the end": (extent_past_the_end, "read", "/plain", "CorruptFilesystemError",
                            ["/plain", "outside the filesystem"]),  # fmt: skip
    "overlapping extents": (overlapping_extents, "read", "/two", "CorruptFilesystemError", ["/two", "overlap"]),
    "zero rec_len": (zero_rec_len, "list", "/a", "CorruptFilesystemError", ["/a", "rec_len 0"]),
    "entry inode out of range": (entry_inode_out_of_range, "list", "/a", "CorruptFilesystemError",
                                 ["/a", "inode 4294967280"]),  # fmt: skip
    "truncated image": (truncate_half, "walk", "/", "CorruptFilesystemError", ["truncated"]),
    "xattr value outside its block": (xattr_value_outside, "xattrs", "/x", "CorruptFilesystemError",
                                      ["/x", "outside its block"]),  # fmt: skip
    "inode table past the end": (bad_inode_table, "walk", "/", "CorruptFilesystemError",
                                 ["inode table", "outside the filesystem"]),  # fmt: skip
    "block count past the disk": (huge_block_count, "walk", "/", "CorruptFilesystemError", ["truncated image"]),
    "symlink loop": (lambda image: None, "stat", "/loop1", "FsPathError", ["/loop1", "symbolic links"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_image_gives_one_clear_error(base, tmp_path, case):
    corrupt, op, path, error, words = CASES[case]
    image = tmp_path / "hostile.img"
    shutil.copyfile(base, image)
    corrupt(image)
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parent.parent))
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(image), op, path], capture_output=True, text=True,
                          timeout=30, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    answer = json.loads(proc.stdout)
    assert answer.get("error") == error, answer
    message = answer["message"]
    assert message.startswith(f"{image}: ") and "\n" not in message, message
    for word in words:
        assert word in message, (word, message)


def test_a_huge_directory_size_costs_only_its_mapped_blocks(base, tmp_path):
    image = tmp_path / "big.img"
    shutil.copyfile(base, image)
    huge_directory(image)
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(image), "list", "/a"], capture_output=True, text=True,
                          timeout=30, env=env)  # fmt: skip
    assert proc.returncode == 0 and json.loads(proc.stdout) == {"ok": True}, proc.stdout + proc.stderr


def set_incompat(image: Path, bits: int) -> None:
    with open(image, "r+b") as f:
        f.seek(1024 + 0x60)
        value = struct.unpack("<I", f.read(4))[0]
        f.seek(1024 + 0x60)
        f.write(struct.pack("<I", value | bits))


@pytest.mark.parametrize("bits,name", [(0x20000, "casefold"), (0x10000, "encrypt"), (0x1, "compression"),
                                       (0x1000, "dirdata"), (0x80000, "unknown incompat feature 0x80000")])  # fmt: skip
def test_unknown_features_are_refused_by_name(base, tmp_path, bits, name):
    import ubdcow

    image = tmp_path / "feature.img"
    shutil.copyfile(base, image)
    set_incompat(image, bits)
    with pytest.raises(ubdcow.UnsupportedFilesystemError) as err:
        ubdcow.open_fs(image)
    assert str(err.value) == f"{image}: the filesystem uses {name}, which this reader does not support"


def test_bigalloc_is_refused(tmp_path):
    import ubdcow

    image = tmp_path / "bigalloc.img"
    run(require_tool("mkfs.ext4", "e2fsprogs"), "-q", "-O", "bigalloc", "-C", "16384", image, "64M")
    with pytest.raises(ubdcow.UnsupportedFilesystemError, match="uses bigalloc"):
        ubdcow.open_fs(image)


def test_an_encrypted_inode_is_refused_for_its_path_only(base, tmp_path):
    import ubdcow

    image = tmp_path / "encrypted.img"
    shutil.copyfile(base, image)
    debugfs(image, "sif /plain flags 0x80800", write=True)  # extents + encrypt
    with ubdcow.open_fs(image) as fs:
        assert fs.stat("/plain").size == 10000
        with pytest.raises(ubdcow.UnsupportedFilesystemError, match=r"/plain: inode \d+ is encrypted"):
            fs.read_bytes("/plain")
        assert fs.read_bytes("/a/file") == b"hi\n"
