"""Output paths: what every writing command refuses to replace, and what a replacement keeps."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_one_line_error, require_root, run_cli

import ubdcow
from ubdcow.check import check


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    backing = tmp_path / "base.img"
    backing.write_bytes(os.urandom(256 * 1024))
    cow = tmp_path / "o.cow"
    ubdcow.create(cow, backing)
    with ubdcow.open(cow, "r+") as img:
        img.pwrite(b"changed" * 100, 5000)
    return cow, backing


def writers(cow: Path, backing: Path, out: Path) -> dict[str, list[object]]:
    return {
        "merge": ["merge", cow, "-o", out, "--overwrite"],
        "convert": ["convert", cow, "-o", out, "--overwrite"],
        "diff": ["diff", backing, cow, "-o", out, "--overwrite"],
        "create": ["create", "--force", out, backing],
    }


@pytest.mark.parametrize("command", ["merge", "convert", "diff"])
def test_overwrite_never_replaces_the_backing_file(files, command):
    cow, backing = files
    before = backing.read_bytes()
    proc = run_cli(*writers(cow, backing, backing)[command])
    assert_one_line_error(proc, "output is the")
    assert backing.read_bytes() == before


def test_diff_never_replaces_the_backing_file_of_a_cow_modified(tmp_path, files):
    cow, backing = files
    other = tmp_path / "other.img"
    other.write_bytes(backing.read_bytes())
    before = backing.read_bytes()
    # MODIFIED is a COW file whose backing is base.img; the output must not be base.img
    proc = run_cli("diff", other, cow, "-o", backing, "--overwrite")
    assert_one_line_error(proc, "output is the")
    assert backing.read_bytes() == before


@pytest.mark.parametrize("kind", ["fifo", "char-device", "directory"])
def test_overwrite_refuses_what_is_not_a_regular_file(tmp_path, files, kind):
    cow, backing = files
    out = tmp_path / "special"
    if kind == "fifo":
        os.mkfifo(out)
    elif kind == "directory":
        out.mkdir()
    else:
        require_root("making a device node")
        os.mknod(out, 0o600 | stat.S_IFCHR, os.makedev(1, 7))  # like /dev/full
    mode = os.lstat(out).st_mode
    for command, args in writers(cow, backing, out).items():
        proc = run_cli(*args, timeout=30)
        assert proc.returncode == 1, command
        assert b"Traceback" not in proc.stderr
        assert os.lstat(out).st_mode == mode, f"{command} replaced the {kind}"


def test_overwrite_refuses_a_file_another_process_holds_locked(tmp_path, files):
    cow, backing = files
    live = tmp_path / "live.cow"
    ubdcow.create(live, backing)
    before = live.read_bytes()
    # a POSIX write lock, as the kernel's ubd driver holds on a COW file in use
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        f"f = open({str(live)!r}, 'r+b'); fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        "print('LOCKED', flush=True); time.sleep(60)\n")], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"LOCKED"
        for args in writers(cow, backing, live).values():
            proc = run_cli(*args)
            assert_one_line_error(proc, str(live), f"process {holder.pid}")
        assert live.read_bytes() == before
    finally:
        holder.kill()
        holder.wait()


def test_an_existing_link_is_refused_without_overwrite_and_replaced_with_it(tmp_path, files):
    cow, _ = files
    link = tmp_path / "out.img"
    link.symlink_to("nowhere.img")
    proc = run_cli("merge", cow, "-o", link)
    assert_one_line_error(proc, str(link), "already exists")
    assert link.is_symlink() and not [p for p in tmp_path.iterdir() if "ubdcow-tmp" in p.name]
    assert run_cli("merge", cow, "-o", link, "--overwrite").returncode == 0
    assert not link.is_symlink() and link.stat().st_size == 256 * 1024


def test_a_replaced_file_keeps_its_owner(tmp_path, files):
    cow, _ = files
    out = tmp_path / "out.img"
    out.write_bytes(b"old")
    os.chmod(out, 0o640)
    require_root("giving the replaced file another owner")
    os.chown(out, 1000, 1000)
    assert run_cli("merge", cow, "-o", out, "--overwrite").returncode == 0
    st = out.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 1000, 1000)


def test_a_replaced_file_keeps_its_mode(tmp_path, files):
    cow, _ = files
    out = tmp_path / "out.img"
    out.write_bytes(b"old")
    os.chmod(out, 0o640)
    assert run_cli("merge", cow, "-o", out, "--overwrite").returncode == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    new = tmp_path / "new.img"
    assert run_cli("merge", cow, "-o", new).returncode == 0
    assert stat.S_IMODE(new.stat().st_mode) == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_backing_mtime_the_header_cannot_hold_is_refused_with_a_hint(tmp_path):
    backing = tmp_path / "old.img"
    backing.write_bytes(bytes(4096))
    os.utime(backing, (-86400, -86400))  # 1969-12-31
    proc = run_cli("create", tmp_path / "o.cow", backing)
    assert_one_line_error(proc, str(backing), "does not fit")
    assert b"hint: give it a current mtime first: touch" in proc.stderr
    assert not (tmp_path / "o.cow").exists()


def test_zeroing_the_end_of_a_short_cow_file_keeps_it_consistent(tmp_path):
    backing = tmp_path / "b.img"
    backing.write_bytes(os.urandom(64 * 1024))
    cow = tmp_path / "short.cow"
    h = ubdcow.create(cow, backing)
    os.truncate(cow, h.data_offset)  # legal: a file as long as its data offset, like a fresh one cut short
    with ubdcow.open(cow, "r+") as img:
        img.write_zeroes(0, 64 * 1024)
        assert img.pread(64 * 1024, 0) == bytes(64 * 1024)
    assert check(cow).exit_code == 0, check(cow).findings
