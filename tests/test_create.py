"""``create`` against the real uml_mkcow, and its refusals."""

from __future__ import annotations

import os
import subprocess

import pytest
from conftest import assert_one_line_error, require, require_root, require_tool, run_cli

import ubdcow
from ubdcow.format import parse_header


def make_backing(path, size=3 * 1024 * 1024 + 1234, mtime=1_650_000_000):
    data = os.urandom(4096) * (size // 4096) + os.urandom(size % 4096)
    path.write_bytes(data)
    os.utime(path, (mtime, mtime))
    return data


def header_fields(path):
    h = ubdcow.read_header(path)
    return {
        k: getattr(h, k)
        for k in (
            "version",
            "layout",
            "backing_file",
            "mtime",
            "size",
            "sectorsize",
            "alignment",
            "cow_format",
            "bitmap_offset",
            "bitmap_len",
            "data_offset",
        )
    }


@pytest.mark.uml
@pytest.mark.parametrize("how", ["absolute", "relative", "through-linked-folder", "link-to-file"])
def test_create_matches_uml_mkcow(tmp_path, how):
    mkcow = require_tool("uml_mkcow")
    real = tmp_path / "real"
    real.mkdir()
    make_backing(real / "backing.img")
    (tmp_path / "linked").symlink_to("real")
    (tmp_path / "file-link.img").symlink_to("real/backing.img")
    arg = {
        "absolute": str(real / "backing.img"),
        "relative": "real/backing.img",
        "through-linked-folder": "linked/backing.img",
        "link-to-file": "file-link.img",
    }[how]
    subprocess.run([mkcow, "theirs.cow", arg], cwd=tmp_path, check=True, capture_output=True)
    proc = run_cli("create", "ours.cow", arg, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    theirs, ours = tmp_path / "theirs.cow", tmp_path / "ours.cow"
    assert header_fields(ours) == header_fields(theirs)
    assert ours.stat().st_size == theirs.stat().st_size
    # ours zeroes the path field's tail, and the bitmap is zero
    h = ubdcow.read_header(ours)
    raw = ours.read_bytes()
    assert raw[32 + len(h.backing_file_raw) : 32 + 4096] == bytes(4096 - len(h.backing_file_raw))
    assert raw[h.bitmap_offset : h.data_offset] == bytes(h.data_offset - h.bitmap_offset)
    # and sparse: a few KiB on disk whatever the size
    assert ours.stat().st_blocks * 512 <= 64 * 1024


def test_create_api_returns_the_header_and_a_readable_image(tmp_path):
    data = make_backing(tmp_path / "b.img", size=1_000_000)
    h = ubdcow.create(tmp_path / "o.cow", tmp_path / "b.img")
    assert h == parse_header((tmp_path / "o.cow").read_bytes()[:8192])
    assert (h.layout, h.size, h.mtime, h.sectorsize, h.alignment) == ("v3", 1_000_000, 1_650_000_000, 512, 4096)
    assert h.backing_file == str(tmp_path / "b.img")
    with ubdcow.open(tmp_path / "o.cow") as img:
        assert img.read() == data


def test_existing_cow_is_an_error_and_left_untouched(tmp_path):
    make_backing(tmp_path / "b.img")
    existing = tmp_path / "o.cow"
    existing.write_bytes(b"precious")
    proc = run_cli("create", existing, tmp_path / "b.img")
    assert proc.returncode == 1
    assert_one_line_error(proc, str(existing), "already exists")
    assert existing.read_bytes() == b"precious"
    with pytest.raises(ubdcow.OutputError):
        ubdcow.create(existing, tmp_path / "b.img")
    assert existing.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.img", "o.cow"]


@pytest.mark.uml
def test_force_starts_from_an_empty_bitmap_unlike_uml_mkcow_f(tmp_path):
    mkcow = require_tool("uml_mkcow")
    make_backing(tmp_path / "b.img")
    for name in ("ours.cow", "theirs.cow"):
        ubdcow.create(tmp_path / name, tmp_path / "b.img")
        with ubdcow.open(tmp_path / name, "r+") as img:
            img.pwrite(b"x" * 4096, 8192)
    subprocess.run([mkcow, "-f", "theirs.cow", "b.img"], cwd=tmp_path, check=True, capture_output=True)
    assert run_cli("create", "--force", "ours.cow", "b.img", cwd=tmp_path).returncode == 0
    assert ubdcow.info(tmp_path / "theirs.cow")["cow_sectors"] == 8  # uml_mkcow -f kept the old bitmap
    assert ubdcow.info(tmp_path / "ours.cow")["cow_sectors"] == 0


def test_cow_path_that_is_the_backing_file_is_refused_even_with_force(tmp_path):
    data = make_backing(tmp_path / "b.img")
    (tmp_path / "alias.cow").symlink_to("b.img")
    before = os.stat(tmp_path / "b.img")
    for args in (
        ["create", "alias.cow", "b.img"],
        ["create", "--force", "alias.cow", "b.img"],
        ["create", "--force", "b.img", "b.img"],
    ):
        proc = run_cli(*args, cwd=tmp_path)
        assert_one_line_error(proc, "backing file")
    assert (tmp_path / "b.img").read_bytes() == data
    assert os.stat(tmp_path / "b.img").st_mtime_ns == before.st_mtime_ns
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_backing_is_only_read(tmp_path):
    data = make_backing(tmp_path / "b.img")
    os.chmod(tmp_path / "b.img", 0o444)
    chattr = require_tool("chattr", "e2fsprogs")
    proc = subprocess.run([chattr, "+i", str(tmp_path / "b.img")], capture_output=True, text=True)
    require(proc.returncode == 0, f"chattr +i does not work here (needs root): {proc.stderr.strip()}")
    try:
        with pytest.raises(PermissionError):  # the immutable flag is in force: even root cannot open it to write
            os.open(tmp_path / "b.img", os.O_WRONLY)
        ubdcow.create(tmp_path / "o.cow", tmp_path / "b.img")
        assert ubdcow.info(tmp_path / "o.cow")["backing"]["mtime_matches"]
    finally:
        subprocess.run([chattr, "-i", str(tmp_path / "b.img")], check=True)
    assert (tmp_path / "b.img").read_bytes() == data
    assert int(os.stat(tmp_path / "b.img").st_mtime) == 1_650_000_000


@pytest.mark.parametrize("problem", ["missing", "directory", "fifo", "empty", "dev-zero"])
def test_unusable_backing_files(tmp_path, problem):
    target = tmp_path / "b.img"
    if problem == "directory":
        target.mkdir()
    elif problem == "fifo":
        os.mkfifo(target)
    elif problem == "empty":
        target.write_bytes(b"")
    elif problem == "dev-zero":
        target = "/dev/zero"
    proc = run_cli("create", tmp_path / "o.cow", target, timeout=20)
    words = {
        "missing": "No such file",
        "directory": "directory",
        "fifo": "FIFO",
        "empty": "empty",
        "dev-zero": "character device",
    }[problem]
    assert_one_line_error(proc, str(target), words)
    assert not (tmp_path / "o.cow").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_block_device_backing_uses_the_device_size(tmp_path):
    losetup = require_tool("losetup", "util-linux")
    require_root("making a loop device")
    data = make_backing(tmp_path / "b.img", size=2 * 1024 * 1024)
    proc = subprocess.run([losetup, "--find", "--show", str(tmp_path / "b.img")], capture_output=True, text=True)
    require(proc.returncode == 0, f"cannot attach a loop device here: {proc.stderr.strip()}")
    dev = proc.stdout.strip()
    try:
        h = ubdcow.create(tmp_path / "o.cow", dev)
        assert h.size == 2 * 1024 * 1024
        assert h.backing_file == dev
        with ubdcow.open(tmp_path / "o.cow") as img:  # the device is read as the backing file
            assert img.read() == data
    finally:
        subprocess.run([losetup, "-d", dev], check=False)
