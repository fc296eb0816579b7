"""The Python API of the filesystem reader: paths, errors, symlinks, files, walks, threads; the kernel as oracle.

One ext4 image of tests/support/fstree.py's tree, loop-mounted read-only for the module: what the API says
about a path is compared with what the kernel says about the same path under the mount point.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import random
import subprocess
import threading
from pathlib import Path

import pytest
from conftest import require_root, require_tool
from support.fstree import LAYOUTS, mounted

import ubdcow
from ubdcow.errors import (
    CorruptFilesystemError,
    FsFileNotFoundError,
    FsIsADirectoryError,
    FsNotADirectoryError,
    FsPathError,
    UbdCowError,
    UnsupportedFilesystemError,
)
from ubdcow.fs import FileStat, FsFile


@pytest.fixture(scope="module")
def image(fs_images) -> Path:
    require_root("building the tree (owners, devices) and the loop mount")
    return fs_images.image("ext4")


@pytest.fixture(scope="module")
def mnt(image: Path):
    with mounted(image, noload=LAYOUTS["ext4"].journal) as point:
        yield point


@pytest.fixture
def fs(image: Path):
    with ubdcow.open_fs(image) as opened:
        yield opened


def host(mnt: Path, inside: str | bytes) -> bytes:
    return os.fsencode(mnt) + os.fsencode(inside)


def test_str_and_bytes_paths_come_back_in_their_type(fs, mnt):
    st = fs.stat("/names/ünïcödé 日本語")
    assert st.path == "/names/ünïcödé 日本語" and st.name == "ünïcödé 日本語"
    assert fs.stat(b"/names/latin1-\xe9\xff").path == b"/names/latin1-\xe9\xff"
    latin1 = b"/names/latin1-\xe9\xff"
    assert fs.stat(os.fsdecode(latin1)).inode == os.lstat(host(mnt, latin1)).st_ino
    assert sorted(fs.listdir("/names")) == sorted(os.listdir(os.fsdecode(host(mnt, "/names"))))
    assert sorted(fs.listdir(b"/names")) == sorted(os.listdir(host(mnt, "/names")))
    assert fs.stat(Path("/files/size-100")).inode == os.lstat(host(mnt, "/files/size-100")).st_ino
    relative = fs.stat("files/size-100")  # taken from the root
    assert relative.path == "files/size-100" and relative.inode == fs.stat("/files/size-100").inode


@pytest.mark.parametrize("inside,error,code", [
    ("/nope", FsFileNotFoundError, errno.ENOENT),
    ("/files/nope", FsFileNotFoundError, errno.ENOENT),
    ("/files/size-100/x", FsNotADirectoryError, errno.ENOTDIR),
    ("/files/size-100/", FsNotADirectoryError, errno.ENOTDIR),
    ("/links/dangling/x", FsFileNotFoundError, errno.ENOENT),
])  # fmt: skip
def test_missing_paths_fail_as_the_kernel_fails(fs, mnt, inside, error, code):
    with pytest.raises(OSError) as kernel:
        os.stat(host(mnt, inside))
    assert kernel.value.errno == code
    with pytest.raises(error) as ours:
        fs.stat(inside, follow_symlinks=True)
    assert isinstance(ours.value, UbdCowError) and isinstance(ours.value, OSError)
    assert ours.value.errno == code
    assert str(ours.value) == f"{fs.name}: {inside}: {ours.value.message.split(': ', 1)[1]}"
    assert "\n" not in str(ours.value)


def test_names_in_messages_stay_on_one_line(fs):
    with pytest.raises(FsNotADirectoryError) as err:
        fs.stat(b"/names/new\nline/more")
    assert "\n" not in str(err.value) and "new\\x0aline" in str(err.value)
    with pytest.raises(FsFileNotFoundError) as err:
        fs.stat(b"/names/\xff\xfe")
    assert "\\xff\\xfe" in str(err.value)


def test_symlinks_are_followed_inside_the_filesystem(fs, mnt):
    # relative targets: the kernel resolves them the same way under the mount point
    for inside in ("/links/short", "/links/to-dir/size-100", "/links/to-dir/../links/hard", "/links/to-dir/"):
        assert fs.stat(inside, follow_symlinks=True).inode == os.stat(host(mnt, inside)).st_ino, inside
        assert fs.stat(inside).inode == os.lstat(host(mnt, inside)).st_ino, inside
    # absolute targets start again at the filesystem's root, never at the host's
    assert fs.stat("/links/absolute", follow_symlinks=True).inode == fs.stat("/files/size-100").inode
    assert fs.read_bytes("/links/absolute") == fs.read_bytes("/files/size-100")
    assert fs.stat("/links/long-507").target.startswith("/links/long/")
    assert fs.stat("/../../files/..").inode == 2


def test_symlink_loops_and_dangling_links(fs, mnt):
    with pytest.raises(OSError) as kernel:
        os.stat(host(mnt, "/links/loop-a"))
    assert kernel.value.errno == errno.ELOOP
    with pytest.raises(FsPathError, match="symbolic links"):
        fs.stat("/links/loop-a", follow_symlinks=True)
    with pytest.raises(FsPathError, match="symbolic links"):
        fs.read_bytes("/links/loop-b")
    assert fs.stat("/links/loop-a").target == "loop-b"
    with pytest.raises(FsFileNotFoundError):
        fs.stat("/links/dangling", follow_symlinks=True)
    assert fs.exists("/links/dangling") and not fs.exists("/links/nowhere") and not fs.exists("/files/size-100/x")


def test_readlink(fs, mnt):
    for name in ("short", "fast-59", "slow-60", "long-507", "longest", "absolute", "dangling"):
        assert fs.readlink(f"/links/{name}") == os.readlink(os.fsdecode(host(mnt, f"/links/{name}")))
        assert fs.readlink(f"/links/{name}".encode()) == os.readlink(host(mnt, f"/links/{name}"))
    with pytest.raises(FsPathError, match="not a symbolic link"):
        fs.readlink("/files/size-100")


def test_files_are_read_only_raw_io_with_seek(fs, mnt):
    rng = random.Random(5)
    for inside in ("/files/holes", "/files/fragmented", "/files/random-3M", "/files/size-4097", "/files/past-4G"):
        with open(host(mnt, inside), "rb") as kernel, fs.open(inside) as ours:
            assert isinstance(ours, io.RawIOBase) and isinstance(ours, FsFile)
            assert ours.readable() and ours.seekable() and not ours.writable()
            size = os.fstat(kernel.fileno()).st_size
            assert ours.size == size and ours.seek(0, io.SEEK_END) == size
            for _ in range(40):
                offset, length = rng.randrange(size + 10), rng.choice((1, 100, 4096, 70_000, 1 << 20))
                kernel.seek(offset)
                assert ours.seek(offset) == offset
                buf = bytearray(length)
                n = ours.readinto(buf)
                assert bytes(buf[:n]) == kernel.read(length)
                assert ours.tell() == offset + n
            with pytest.raises(OSError):
                ours.write(b"x")
    with fs.open("/files/holes") as f:
        assert io.BufferedReader(f).read() == Path(os.fsdecode(host(mnt, "/files/holes"))).read_bytes()
    with fs.open("/files/size-4097") as f:
        f.seek(4000)
        assert f.read() == Path(os.fsdecode(host(mnt, "/files/size-4097"))).read_bytes()[4000:]
        assert f.read() == b""
    assert f.closed


def test_only_regular_files_open(fs):
    with pytest.raises(FsIsADirectoryError) as err:
        fs.open("/files")
    assert err.value.errno == errno.EISDIR and isinstance(err.value, IsADirectoryError)
    with pytest.raises(FsIsADirectoryError):
        fs.read_bytes("/links/to-dir")
    with pytest.raises(FsPathError, match="not a regular file"):
        fs.open("/special/fifo")
    with pytest.raises(FsNotADirectoryError):
        fs.listdir("/files/size-100")
    with pytest.raises(FsNotADirectoryError):
        list(fs.scandir("/special/null"))


def test_walk_is_depth_first_with_the_top_first(fs, mnt):
    entries = list(fs.walk("/deep"))
    assert entries[0].path == "/deep" and entries[0].type == "dir"
    assert [e.path.count("/") for e in entries] == list(range(1, 42)) + [42]
    seen: set[str] = set()
    for st in fs.walk("/"):
        parent = st.path.rsplit("/", 1)[0] or "/"
        assert st.path == "/" or parent in seen, st.path
        seen.add(st.path)
    assert len(seen) == 1 + sum(len(d) + len(f) for _, d, f in os.walk(mnt))  # every entry in its parent's list
    assert [st.path for st in fs.walk("/files/size-100")] == ["/files/size-100"]
    assert list(fs.walk("/links/to-dir"))[0].type == "dir"  # the top is followed, nothing below it


def test_scandir_and_listdir_agree_with_stat(fs, mnt):
    names = fs.listdir("/special")
    assert sorted(names) == sorted(os.listdir(os.fsdecode(host(mnt, "/special"))))
    stats = list(fs.scandir("/special"))
    assert [s.name for s in stats] == names
    for s in stats:
        assert s == fs.stat(s.path)
    assert {s.name: s.rdev for s in stats if s.rdev} == {"null": (1, 3), "sda1": (8, 1), "wide": (300, 70000)}
    assert len(list(fs.scandir(b"/big dir"))) == 3000


def test_stat_record(fs, mnt):
    st = fs.stat("/modes/suid")
    kernel = os.lstat(host(mnt, "/modes/suid"))
    assert st.st_mode == kernel.st_mode and st.mode == 0o4755 and st.type == "file"
    assert fs.stat("/modes/owner-3e9").uid == 3_000_000_000
    record = st.as_dict()
    assert json.loads(json.dumps(record))["path"] == "/modes/suid"
    assert fs.stat(b"/names/latin1-\xe9\xff").as_dict()["path"] == os.fsdecode(b"/names/latin1-\xe9\xff")
    assert fs.stat("/special/null").as_dict()["rdev"] == [1, 3]
    assert st.crtime_ns is not None and st.flags & 0x80000  # extents
    with pytest.raises(AttributeError):
        st.size = 1  # type: ignore[misc]
    assert isinstance(st, FileStat)


def test_xattrs(fs, mnt):
    for inside in ("/xattrs/file", "/xattrs/dir", "/xattrs/acl", "/xattrs/link", "/files/size-100"):
        path = host(mnt, inside)
        kernel = {n: os.getxattr(path, n, follow_symlinks=False) for n in os.listxattr(path, follow_symlinks=False)}
        assert fs.xattrs(inside) == kernel, inside
    followed = fs.xattrs("/xattrs/link", follow_symlinks=True)
    assert followed == fs.xattrs("/xattrs/file") and "trusted.on-link" not in followed


def test_threads_share_one_filesystem(fs):
    expected = {st.path: (st, hashlib.sha256(fs.read_bytes(st.path)).hexdigest() if st.type == "file" and
                          st.size < 1 << 24 else None) for st in fs.walk("/files")}  # fmt: skip
    failures: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            rng = random.Random(seed)
            for _ in range(30):
                path = rng.choice(sorted(expected))
                st, digest = expected[path]
                assert fs.stat(path) == st
                if digest:
                    assert hashlib.sha256(fs.read_bytes(path)).hexdigest() == digest
            assert [s.path for s in fs.walk("/links")] == [s.path for s in fs.walk("/links")]
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures


def test_a_closed_filesystem_refuses(image):
    fs = ubdcow.open_fs(image)
    fs.close()
    fs.close()
    assert fs.closed
    with pytest.raises(ValueError):
        fs.stat("/")


def test_an_unchanged_overlay_reads_as_its_backing(image, tmp_path):
    cow = tmp_path / "overlay.cow"
    ubdcow.create(cow, image)
    with ubdcow.open_fs(cow) as over, ubdcow.open_fs(image) as raw:
        assert [s for s in over.walk("/links")] == [s for s in raw.walk("/links")]
        assert over.read_bytes("/files/random-3M") == raw.read_bytes("/files/random-3M")
    assert image.stat().st_mtime == os.stat(image).st_mtime


def test_not_a_filesystem(tmp_path):
    plain = tmp_path / "zeros.img"
    plain.write_bytes(bytes(1 << 20))
    with pytest.raises(UnsupportedFilesystemError, match="no ext2/ext3/ext4 filesystem") as err:
        ubdcow.open_fs(plain)
    assert str(err.value).startswith(f"{plain}: ")
    tiny = tmp_path / "tiny.img"
    tiny.write_bytes(b"x" * 100)
    with pytest.raises(UnsupportedFilesystemError):
        ubdcow.open_fs(tiny)
    with pytest.raises(ubdcow.ImageIOError):
        ubdcow.open_fs(tmp_path / "missing.img")
    assert issubclass(CorruptFilesystemError, UbdCowError)


# -- sorted walks, pruning, entries named by their FileStat, SEEK_DATA/SEEK_HOLE -------------------------------


def test_a_sorted_walk_is_in_path_order_name_by_name(fs, mnt):
    plain = list(fs.walk(b"/"))
    ordered = list(fs.walk(b"/", sort=True))
    assert sorted(plain, key=lambda st: st.path) == sorted(ordered, key=lambda st: st.path)  # the same entries
    paths = [st.path for st in ordered]
    assert paths == sorted(paths, key=lambda p: p.split(b"/")) and paths != [st.path for st in plain]
    for st in ordered:  # each folder's entries in byte order, as the kernel lists them
        if st.type == "dir":
            names = sorted(os.listdir(host(mnt, st.path)))
            inside = [c.name for c in ordered if c.path != b"/" and c.path.rsplit(b"/", 1)[0] == st.path.rstrip(b"/")]
            assert inside == names, st.path


def test_descend_prunes_after_the_folder_was_seen(fs):
    seen: list[str] = []

    def descend(st: FileStat) -> bool:
        seen.append(st.path)
        return st.name != "links"

    paths = [st.path for st in fs.walk("/", sort=True, descend=descend)]
    assert "/links" in paths and not any(p.startswith("/links/") for p in paths)
    assert "/files/size-100" in paths and "/deep/level00/level01" in paths
    assert seen == [p for p in paths[1:] if fs.stat(p).type == "dir"]  # asked once per folder below the top
    assert [st.path for st in fs.walk("/", descend=lambda st: False)] == ["/", *(f"/{n}" for n in fs.listdir("/"))]


def test_a_filestat_names_its_own_entry_without_a_lookup(fs, mnt):
    for st in fs.scandir(b"/xattrs"):
        kernel = {n: os.getxattr(host(mnt, st.path), n, follow_symlinks=False)
                  for n in os.listxattr(host(mnt, st.path), follow_symlinks=False)}  # fmt: skip
        assert fs.xattrs(st) == kernel, st.path
    st = fs.stat("/files/size-4097")
    with fs.open(st) as f:
        assert f.read() == Path(os.fsdecode(host(mnt, "/files/size-4097"))).read_bytes()
    moved = FileStat(b"/nowhere/at/all", *[getattr(st, k) for k in st.__slots__[1:]])  # the inode counts
    with fs.open(moved) as f:
        assert f.read(5) == fs.read_bytes("/files/size-4097")[:5] and f.name == b"/nowhere/at/all"
    with pytest.raises(FsPathError, match="not a regular file"):
        fs.open(fs.stat("/links/short"))  # a symbolic link's own FileStat is not followed


def data_map(seek, size: int) -> list[tuple[int, int]]:
    """The (start, end) stretches of data that SEEK_DATA/SEEK_HOLE report, as ``seek(offset, whence)`` does."""
    out, pos = [], 0
    while pos < size:
        try:
            start = seek(pos, os.SEEK_DATA)
        except OSError as exc:
            assert exc.errno == errno.ENXIO
            break
        end = seek(start, os.SEEK_HOLE)
        assert end > start
        out.append((start, end))
        pos = end
    return out


@pytest.mark.parametrize("inside", ["/files/holes", "/files/hole-at-end", "/files/fragmented", "/files/past-4G",
                                    "/files/size-4097", "/files/size-0", "/files/random-3M"])  # fmt: skip
def test_seek_data_and_hole_as_the_kernel(fs, mnt, inside):
    fd = os.open(host(mnt, inside), os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        kernel = data_map(lambda off, whence: os.lseek(fd, off, whence), size)
        with fs.open(inside) as f:
            assert data_map(f.seek, size) == kernel
            for off in sorted({0, 1, 4095, 8192, 8193, 200_000, size - 1, size} - {-1}):
                for whence in (os.SEEK_DATA, os.SEEK_HOLE):
                    try:
                        want: object = os.lseek(fd, off, whence)
                    except OSError as exc:
                        want = exc.errno
                    try:
                        got: object = f.seek(off, whence)
                    except OSError as exc:
                        got = exc.errno
                    assert got == want, (off, whence)
    finally:
        os.close(fd)


def test_preallocated_extents_are_holes_to_seek_data(tmp_path):
    require_root("the loop mount")
    debugfs = require_tool("debugfs", "e2fsprogs")
    image = tmp_path / "prealloc.img"
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_bytes(os.urandom(40960))
    subprocess.run([require_tool("mkfs.ext4", "e2fsprogs"), "-q", "-b", "4096", "-d", str(tree), str(image), "16M"],
                   check=True, capture_output=True)  # fmt: skip
    proc = subprocess.run([debugfs, "-w", "-R", "fallocate /f 20 29", str(image)], capture_output=True, text=True)
    assert proc.returncode == 0 and "Uninit" in subprocess.run([debugfs, "-R", "dump_extents /f", str(image)],
                                                                capture_output=True, text=True).stdout  # fmt: skip
    with mounted(image) as point, ubdcow.open_fs(image) as fs, fs.open("/f") as f:
        fd = os.open(point / "f", os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            assert data_map(lambda off, whence: os.lseek(fd, off, whence), size) == data_map(f.seek, size)
            assert data_map(f.seek, size) == [(0, 40960)]
        finally:
            os.close(fd)
