"""merge on filesystems that share extents (XFS with reflink=1, btrfs), on loop-mounted images.

The merged image must be byte-identical to the copy path's (``reflink=False``), to the engine's reads
and to uml_moo's (on their common length: uml_moo drops a partial last sector), while using about no
new space beyond the COW data; holes stay holes; a kill -9 leaves nothing at the final path; and the
backing and COW files never change, not even when the merged image that shares their blocks is then
written to. v1/v2 data areas (and v3 with alignment 512) are only sector-aligned: the COW runs are
then copied, the backing still shared. Needs root and loop devices (skips elsewhere; fails under
UBDCOW_REQUIRE_UML=1, as CI runs).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import require, require_root, require_tool, run_cli

import ubdcow
from ubdcow._io import punch_hole
from ubdcow.merge import MergeResult, merge

MiB = 1 << 20
PAGE = 4096
FS_SIZE = 1 << 30  # the loop image (sparse, on the host's temp dir)
SIZE = 40 * MiB + 1234  # a partial last sector
BACKING_HOLE = (16 * MiB, 20 * MiB)  # a hole in the backing file
COW_OVER_HOLE = (17 * MiB, 17 * MiB + 64 * 1024)  # COW data inside it
ZEROED = (24 * MiB, 25 * MiB)  # write_zeroes over backing data: set bits over a hole in the data area
WRITTEN_ZEROS = (28 * MiB, 28 * MiB + 64 * 1024)  # zeros written as data
BIG_RUN = (8 * MiB, 10 * MiB)


@dataclass
class LoopFs:
    """A filesystem made on a loop device and mounted for this module."""

    kind: str
    mount: Path


def _run(*cmd: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module", params=["xfs", "btrfs"])
def reflink_fs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopFs]:
    """XFS (``mkfs.xfs -m reflink=1``) or btrfs on a loop device; unmounted and detached even on failure."""
    kind = request.param
    require_root(f"mounting a loop {kind} filesystem")
    losetup, mount, umount = (require_tool(name, "util-linux") for name in ("losetup", "mount", "umount"))
    mkfs = require_tool(f"mkfs.{kind}", {"xfs": "xfsprogs", "btrfs": "btrfs-progs"}[kind])
    base = tmp_path_factory.mktemp(f"reflink-{kind}")
    image, point = base / "fs.img", base / "mnt"
    point.mkdir()
    with open(image, "wb") as f:
        f.truncate(FS_SIZE)
    proc = _run(losetup, "--find", "--show", image)
    require(proc.returncode == 0, f"no loop device for a {kind} image (losetup: {proc.stderr.strip()})")
    device = proc.stdout.strip()
    mounted = False
    try:
        proc = _run(mkfs, "-q", *(["-m", "reflink=1"] if kind == "xfs" else []), device)
        assert proc.returncode == 0, proc.stderr
        proc = _run(mount, device, point)
        require(proc.returncode == 0, f"cannot mount {kind} (no kernel support?): {proc.stderr.strip()}")
        mounted = True
        yield LoopFs(kind, point)
    finally:
        if mounted and _run(umount, point).returncode != 0:
            _run(umount, "-l", point)
        _run(losetup, "-d", device)
        image.unlink()


@pytest.fixture
def folder(reflink_fs: LoopFs, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh folder on the loop filesystem for one test, removed afterwards."""
    path = reflink_fs.mount / request.node.name.replace("/", "_")
    path.mkdir()
    yield path
    shutil.rmtree(path)


def sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 * MiB):
            h.update(block)
    return h.hexdigest()


def free_bytes(folder: Path) -> int:
    """Free bytes of the filesystem once it has settled (synced until two readings agree)."""
    before = -1
    for _ in range(100):
        os.sync()
        st = os.statvfs(folder)
        now = st.f_bfree * st.f_frsize
        if now == before:
            break
        before = now
        time.sleep(0.2)
    return now


@dataclass
class Image:
    cow: Path
    backing: Path
    expected: bytes  # what the engine reads
    cow_data: int  # bytes of the disk the COW file holds (set bits)


def build(folder: Path, layout: str = "v3", alignment: int = PAGE, size: int = SIZE, seed: int = 1) -> Image:
    """A backing file (random, with a hole) and an overlay with scattered pages, a long run, COW data over
    the backing's hole, zeroed ranges (holes in the data area), written zeros and a partial last page."""
    rng = np.random.default_rng(seed)
    backing, cow = folder / "backing.img", folder / "overlay.cow"
    with open(backing, "wb") as f:
        f.write(rng.bytes(size))
        f.flush()
        # punched, not skipped: XFS zeroes (allocates) a gap left by seeking past its preallocation
        assert punch_hole(f.fileno(), BACKING_HOLE[0], BACKING_HOLE[1] - BACKING_HOLE[0])
    ubdcow.create(cow, backing, layout=layout, alignment=alignment)  # type: ignore[arg-type]
    pages = np.flatnonzero(rng.random(size // PAGE) < 0.1)
    pages = pages[(pages < BACKING_HOLE[0] // PAGE) | (pages >= 32 * MiB // PAGE)]
    with ubdcow.open(cow, "r+") as img:
        for page in pages.tolist():
            img.pwrite(rng.bytes(PAGE), page * PAGE)
        img.pwrite(rng.bytes(BIG_RUN[1] - BIG_RUN[0]), BIG_RUN[0])
        img.pwrite(rng.bytes(COW_OVER_HOLE[1] - COW_OVER_HOLE[0]), COW_OVER_HOLE[0])
        img.write_zeroes(ZEROED[0], ZEROED[1] - ZEROED[0])
        img.pwrite(bytes(WRITTEN_ZEROS[1] - WRITTEN_ZEROS[0]), WRITTEN_ZEROS[0])
        # v1/v2 bitmaps have no bit for a partial last sector (their rounding bug): stop short of it there
        img.pwrite(rng.bytes(700), size - 700 if layout == "v3" else size // PAGE * PAGE - 700)
    with ubdcow.open(cow) as img:
        expected = img.read()
        cow_data = img.count_cow_sectors() * 512
    assert len(expected) == size
    return Image(cow, backing, expected, cow_data)


def is_hole(path: Path, start: int, end: int) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, start, os.SEEK_DATA) >= end
    except OSError:  # ENXIO: no data after start
        return True
    finally:
        os.close(fd)


def measured_merge(image: Image, out: Path, **kwargs: object) -> tuple[MergeResult, int]:
    """Merge and return the result with the new space it used (free-space difference, settled)."""
    before = free_bytes(out.parent)
    done: list[int] = []
    result = merge(image.cow, out, progress=done.append, **kwargs)  # type: ignore[arg-type]
    used = before - free_bytes(out.parent)
    assert sum(done) == result.size
    return result, used


def budget(image: Image) -> float:
    return 1.05 * image.cow_data + MiB


def test_shares_the_backing_and_cow_data_and_matches_the_copy(folder):
    image = build(folder)
    shared, used = measured_merge(image, folder / "shared.img")
    assert (folder / "shared.img").read_bytes() == image.expected
    assert used <= budget(image), f"{used} bytes of new space for {image.cow_data} bytes of COW data"
    assert shared.shared_bytes > SIZE // 2
    for hole in [(BACKING_HOLE[0], COW_OVER_HOLE[0]), (COW_OVER_HOLE[1], BACKING_HOLE[1]), ZEROED]:
        assert is_hole(folder / "shared.img", *hole), hole
    copied, used_by_copy = measured_merge(image, folder / "copied.img", reflink=False)
    assert (folder / "copied.img").read_bytes() == image.expected
    assert copied.shared_bytes == 0
    assert used_by_copy >= SIZE - (BACKING_HOLE[1] - BACKING_HOLE[0]) - (ZEROED[1] - ZEROED[0])  # it did copy
    assert is_hole(folder / "copied.img", *ZEROED)


@pytest.mark.parametrize("layout,alignment", [("v2", 512), ("v1", 512), ("v3", 512)])
def test_sector_aligned_data_area_copies_the_cow_runs_and_shares_the_backing(folder, layout, alignment):
    image = build(folder, layout, alignment, seed=2)
    assert ubdcow.read_header(image.cow).data_offset % PAGE != 0
    result, used = measured_merge(image, folder / "out.img")
    assert (folder / "out.img").read_bytes() == image.expected
    assert 0 < result.shared_bytes <= result.backing_bytes  # nothing of the COW file is shared
    assert used <= budget(image), f"{used} bytes of new space for {image.cow_data} bytes of COW data"
    assert is_hole(folder / "out.img", *ZEROED)


@pytest.mark.uml
@pytest.mark.parametrize("layout,alignment", [("v3", PAGE), ("v2", 512)])
def test_identical_to_uml_moo(folder, layout, alignment):
    moo = require_tool("uml_moo")
    image = build(folder, layout, alignment, seed=3)
    subprocess.run(
        [moo, "-b", str(image.backing), str(image.cow), str(folder / "moo.img")], check=True, capture_output=True
    )
    assert merge(image.cow, folder / "ours.img").shared_bytes > 0
    ours, theirs = (folder / "ours.img").read_bytes(), (folder / "moo.img").read_bytes()
    common = SIZE // 512 * 512
    assert len(ours) == SIZE and len(theirs) == common
    assert ours[:common] == theirs


def test_set_bits_past_the_end_of_a_short_cow_file_read_zeros(folder):
    image = build(folder, seed=8)
    header = ubdcow.read_header(image.cow)
    os.truncate(image.cow, header.data_offset + 36 * MiB + 512)  # mid-page: set pages from here on have no data
    with ubdcow.open(image.cow) as img:
        expected = img.read()
    assert expected[36 * MiB + 512 :].count(0) < len(expected) - 36 * MiB - 512  # backing data is still there
    result = merge(image.cow, folder / "out.img")
    assert result.shared_bytes > 0
    assert (folder / "out.img").read_bytes() == expected


def test_inputs_never_change_even_when_the_merged_image_is_written(folder):
    image = build(folder, seed=4)
    before = {p: (sha(p), p.stat().st_mtime_ns) for p in (image.backing, image.cow)}
    out = folder / "out.img"
    assert merge(image.cow, out).shared_bytes > 0
    assert {p: (sha(p), p.stat().st_mtime_ns) for p in before} == before
    rng = np.random.default_rng(5)
    expected = bytearray(image.expected)
    with open(out, "r+b") as f:  # every 64th page, the big run and the zeroed range: shared blocks of both
        for start in [*range(0, SIZE - PAGE, 64 * PAGE), BIG_RUN[0] + 3 * PAGE, ZEROED[0] + 5 * PAGE]:
            data = rng.bytes(PAGE)
            f.seek(start)
            f.write(data)
            expected[start : start + PAGE] = data
        os.fsync(f.fileno())
    os.sync()
    assert out.read_bytes() == expected
    assert {p: (sha(p), p.stat().st_mtime_ns) for p in before} == before
    with ubdcow.open(image.cow) as img:
        assert img.read() == image.expected


def test_unshareable_inputs_fall_back_to_the_copy(folder, tmp_path):
    """A backing file on another filesystem: nothing shared. A COW file on another one: the backing is."""
    other = build(tmp_path, seed=6)  # the host's temp dir (not the loop filesystem)
    result = merge(other.cow, folder / "far-backing.img")
    assert result.shared_bytes == 0
    assert (folder / "far-backing.img").read_bytes() == other.expected
    backing = folder / "backing.img"
    backing.write_bytes(other.backing.read_bytes())
    os.utime(backing, ns=(other.backing.stat().st_atime_ns, other.backing.stat().st_mtime_ns))
    result = merge(other.cow, folder / "far-cow.img", backing=backing)
    assert 0 < result.shared_bytes <= result.backing_bytes
    assert (folder / "far-cow.img").read_bytes() == other.expected


def test_cli_no_reflink_no_sparse_and_stdout(folder):
    image = build(folder, seed=7)
    proc = run_cli("merge", image.cow, "-o", folder / "a.img", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["shared_bytes"] > SIZE // 2
    proc = run_cli("merge", image.cow, "-o", folder / "b.img", "--json", "--no-reflink")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["shared_bytes"] == 0
    proc = run_cli("merge", image.cow, "-o", folder / "c.img", "--json", "--no-sparse")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["shared_bytes"] == 0 and json.loads(proc.stdout)["hole_bytes"] == 0
    assert (folder / "c.img").stat().st_blocks * 512 >= SIZE
    proc = run_cli("merge", image.cow, "-o", "-", "--json")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == image.expected and json.loads(proc.stderr)["shared_bytes"] == 0
    for name in ("a.img", "b.img", "c.img"):
        assert (folder / name).read_bytes() == image.expected, name


def many_runs(folder: Path) -> Path:
    """An overlay with every other page of a 128 MiB disk written: a reflink merge of 16,384 clones."""
    backing = folder / "backing.img"
    block = os.urandom(MiB)
    with open(backing, "wb") as f:
        for i in range(128):
            f.write(block[i:] + block[:i])
    cow = folder / "many.cow"
    ubdcow.create(cow, backing)
    data = os.urandom(PAGE)
    with ubdcow.open(cow, "r+") as img:
        for page in range(0, 128 * MiB // PAGE, 2):
            img.pwrite(data, page * PAGE)
    return cow


@pytest.mark.slow
def test_kill_9_during_a_reflink_merge_leaves_nothing_at_the_final_path(folder):
    cow = many_runs(folder)
    out = folder / "out.img"
    interrupted = 0
    for _ in range(5):
        proc = subprocess.Popen(
            [sys.executable, "-m", "ubdcow", "merge", str(cow), "-o", str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 60
        temp: list[Path] = []
        while proc.poll() is None and time.monotonic() < deadline:  # until sharing has begun
            temp = [p for p in folder.iterdir() if p.name.endswith(".ubdcow-tmp") and p.stat().st_blocks]
            if temp:
                break
            time.sleep(0.002)
        proc.send_signal(signal.SIGSTOP)
        time.sleep(0.05)  # a system call under way when the signal came finishes
        if out.exists():  # the merge finished first: try again
            proc.wait()
            out.unlink()
            continue
        assert proc.poll() is None and temp
        interrupted += 1
        proc.kill()
        proc.wait()
        assert not out.exists()
        assert [p.name for p in folder.iterdir() if p.name.endswith(".ubdcow-tmp")]
    assert interrupted >= 2
    assert run_cli("merge", cow, "-o", out).returncode == 0
    assert not [p for p in folder.iterdir() if p.name.endswith(".ubdcow-tmp")]
    with ubdcow.open(cow) as img:
        assert out.read_bytes() == img.read()
