"""Faults and concurrency: a full disk, a backing file that shrinks, a running guest."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from conftest import assert_one_line_error, require, require_root, require_tool, run_cli

import ubdcow
from ubdcow.errors import ImageIOError
from ubdcow.merge import merge


def random_image(tmp_path: Path, size: int, dirty: list[int] = ()) -> tuple[Path, Path]:
    backing = tmp_path / "b.img"
    backing.write_bytes(os.urandom(size))
    cow = tmp_path / "o.cow"
    ubdcow.create(cow, backing)
    if dirty:
        with ubdcow.open(cow, "r+") as img:
            for offset in dirty:
                img.pwrite(os.urandom(4096), offset)
    return cow, backing


@pytest.fixture
def small_fs(tmp_path: Path):
    """A 4 MiB tmpfs mounted for the test (root only: skipped elsewhere, a failure under UBDCOW_REQUIRE_UML=1)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    require_root("mounting a small tmpfs")
    mount = require_tool("mount", "mount")
    proc = subprocess.run([mount, "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    require(proc.returncode == 0, f"cannot mount a small tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_is_a_clear_error_and_leaves_nothing(tmp_path, small_fs):
    cow, backing = random_image(tmp_path, 16 << 20, dirty=[0, 1 << 20, 9 << 20])
    before = (cow.read_bytes(), backing.read_bytes(), cow.stat().st_mtime_ns, backing.stat().st_mtime_ns)
    out = small_fs / "merged.img"
    proc = run_cli("merge", cow, "-o", out)
    assert proc.returncode == 1
    assert_one_line_error(proc, str(out), "No space left on device")
    assert list(small_fs.iterdir()) == []
    assert (cow.read_bytes(), backing.read_bytes(), cow.stat().st_mtime_ns, backing.stat().st_mtime_ns) == before


def test_backing_that_shrinks_during_merge_is_reported_with_the_offset(tmp_path):
    size = 8 << 20
    cow, backing = random_image(tmp_path, size, dirty=[1 << 20, 3 << 20, 6 << 20])
    out = tmp_path / "out.img"
    calls = []

    def shrink(n: int) -> None:
        calls.append(n)
        if len(calls) == 1:
            os.truncate(backing, 2 << 20)

    with pytest.raises(ImageIOError) as info:
        merge(cow, out, progress=shrink)
    message = str(info.value)
    assert message.startswith(str(backing))
    assert re.search(r"offset \d+", message), message
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if "ubdcow-tmp" in p.name] == []


def test_backing_that_shrinks_under_an_open_image_is_an_error_not_zeros(tmp_path):
    cow, backing = random_image(tmp_path, 1 << 20)
    with ubdcow.open(cow) as img:
        os.truncate(backing, 512 * 1024)
        with pytest.raises(ImageIOError, match=r"short read at offset 614400: the backing file is now 524288 bytes"):
            img.pread(4096, 600 * 1024)


def _replace_fd_of(path: Path, folder: Path) -> None:
    """Point this process's one descriptor of ``path`` at a folder: its reads then fail with EISDIR."""
    fds = [int(n) for n in os.listdir("/proc/self/fd") if _link(f"/proc/self/fd/{n}") == str(path)]
    assert len(fds) == 1, fds
    other = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.dup2(other, fds[0])
    finally:
        os.close(other)


def _link(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def test_a_read_error_keeps_its_errno_for_nbd_clients(tmp_path):
    """Every OSError becomes an ImageIOError through one wrapper that keeps the errno and the file name, so an
    NBD client gets the real errno (nbd.errno_of), not EIO: a raw disk's read error too (it dropped it)."""
    from ubdcow.disk import open_disk
    from ubdcow.nbd import errno_of

    raw = tmp_path / "raw.img"
    raw.write_bytes(os.urandom(1 << 20))
    with open_disk(raw) as disk:
        _replace_fd_of(raw, tmp_path)
        with pytest.raises(ImageIOError) as info:
            disk.preadinto(memoryview(bytearray(4096)), 8192)
    assert info.value.errno == errno.EISDIR and errno_of(info.value) == errno.EISDIR
    assert str(info.value) == f"{raw}: read error at offset 8192: {os.strerror(errno.EISDIR)}"


def test_backing_that_grows_or_is_touched_during_merge_discards_the_output(tmp_path):
    cow, backing = random_image(tmp_path, 4 << 20, dirty=[0, 2 << 20])
    out = tmp_path / "out.img"

    def touch(n: int) -> None:
        os.utime(backing, (1, 1))

    with pytest.raises(ImageIOError, match="changed during the merge"):
        merge(cow, out, progress=touch)
    assert not out.exists()


# -- a running UML guest -------------------------------------------------------------
@pytest.fixture
def running_guest(tmp_path: Path):
    """A real guest holding /dev/ubdb open on a fresh COW file; yields (cow, backing, pid)."""
    from support.uml import run_guest, ubd_arg

    backing = tmp_path / "b.img"
    backing.write_bytes(os.urandom(2 << 20))
    cow = tmp_path / "o.cow"
    ubdcow.create(cow, backing)
    proc = run_guest("exec 3</dev/ubdb\necho GUEST-READY\nsleep 60\n", ubd_arg(cow), workdir=tmp_path,
                     background=True)
    assert isinstance(proc, subprocess.Popen) and proc.stdout is not None
    deadline = time.monotonic() + 60
    seen = b""
    try:
        while b"GUEST-READY" not in seen:
            assert time.monotonic() < deadline, seen[-2000:]
            line = proc.stdout.readline()
            assert line, f"guest exited early: {seen[-2000:]!r}"
            seen += line
        yield cow, backing, proc.pid
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()


@pytest.mark.uml
def test_a_running_guest_keeps_every_mutating_command_out(tmp_path, running_guest):
    cow, backing, pid = running_guest
    spare = tmp_path / "spare.img"
    spare.write_bytes(backing.read_bytes())
    os.utime(spare, (backing.stat().st_mtime, backing.stat().st_mtime))
    before = cow.read_bytes()
    refused = {
        "merge": ["merge", cow, "-o", tmp_path / "out.img"],
        "rebase": ["rebase", cow, "--backing", spare],
        "rebase-unsafe": ["rebase", cow, "--backing", spare, "--unsafe"],
        "convert": ["convert", cow, "-o", tmp_path / "v2.cow", "--layout", "v2"],
        "create-force": ["create", "--force", cow, backing],
        "compare": ["compare", cow, backing],
        "diff": ["diff", backing, cow, "-o", tmp_path / "d.cow"],
    }
    for name, args in refused.items():
        proc = run_cli(*args)
        assert proc.returncode == (2 if name == "compare" else 1), name
        assert_one_line_error(proc, str(cow), str(pid))
    assert cow.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".img", ".cow")) == ["b.img", "o.cow",
                                                                                         "spare.img"]
    info = run_cli("info", cow)
    assert info.returncode == 0 and f"locked by process {pid}".encode() in info.stdout
    check = run_cli("check", cow)
    assert check.returncode == 0 and str(pid).encode() in check.stdout and b"in use" in check.stdout
    assert run_cli("map", cow).returncode == 0
    # the documented escape hatch still works, read-only
    assert run_cli("merge", cow, "-o", tmp_path / "anyway.img", "--no-lock").returncode == 0
