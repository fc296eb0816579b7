"""``compact``: pages equal to the backing file's go back to it, pages of zeros are punched, dead data is
freed, and what the disk reads never changes -- not even when compact is killed at a random point.

The test files are put together by hand from the format (data, then bits), so that every kind of page
is there in known places; what the disk reads is compared with a model of its bytes.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli

import ubdcow
from ubdcow import compact

SECTOR = 512
PAGE = 4096


def honoured(path: Path) -> np.ndarray:
    """The honoured bits of a COW file, read from its bytes."""
    h = ubdcow.read_header(path)
    with open(path, "rb") as f:
        f.seek(h.bitmap_offset)
        raw = f.read(h.bitmap_len)
    return np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")[: h.mapped_sectors].astype(bool)


def is_data(path: Path, offset: int, length: int) -> bool:
    """Whether any of [offset, offset+length) of the file is allocated (SEEK_DATA)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            return os.lseek(fd, offset, os.SEEK_DATA) < offset + length
        except OSError:
            return False
    finally:
        os.close(fd)


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def disk_bytes(cow: Path) -> bytes:
    with ubdcow.open(cow) as disk:
        return disk.read()


def stamp(path: Path) -> tuple[int, bytes]:
    return os.stat(path).st_mtime_ns, path.read_bytes()


@dataclass
class Lab:
    cow: Path
    backing: Path
    model: bytes  # what the disk reads
    pages: dict[str, list[int]]  # kind -> page numbers
    trailing: int  # bytes written past the end of the data area


def build(folder: Path, size: int = (4 << 20) + 3 * SECTOR, seed: int = 1, layout: str = "v3",
          per_kind: int = 12) -> Lab:
    """A COW file with ``per_kind`` pages of each kind (and a set last partial page equal to the backing)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    backing = folder / "backing.img"
    content = bytearray(rng.randbytes(size))
    npages = -(-size // PAGE)
    zero_pages = set(range(npages // 2, npages // 2 + 3 * per_kind))  # a zero stretch of the backing file
    for p in zero_pages:
        content[p * PAGE : (p + 1) * PAGE] = bytes(PAGE)
    backing.write_bytes(content)
    cow = folder / "overlay.cow"
    ubdcow.create(cow, backing, layout=layout)
    h = ubdcow.read_header(cow)
    # dead data lies under clear pages after the last page that keeps set bits (before the last page, returned)
    dead = list(range(npages - 1 - per_kind, npages - 1))
    free = [p for p in range(npages - 1 - per_kind) if p not in zero_pages]
    rng.shuffle(free)
    kinds = ("returned", "zeros", "hole", "differs", "mixed")
    pages = {k: sorted(free[i * per_kind : (i + 1) * per_kind]) for i, k in enumerate(kinds)}
    pages["dead"] = dead
    pages["zero-over-zero"] = sorted(rng.sample(sorted(zero_pages), per_kind))
    pages["last"] = [npages - 1]
    model = bytearray(content)
    data: dict[int, bytes] = {}  # page -> bytes put in the data area
    bits = np.zeros(h.sectors, dtype=bool)
    for p in pages["returned"] + pages["zero-over-zero"] + pages["last"]:
        data[p] = bytes(content[p * PAGE : (p + 1) * PAGE])
        bits[8 * p : 8 * p + 8] = True
    for p in pages["zeros"]:
        data[p] = bytes(PAGE)
        bits[8 * p : 8 * p + 8] = True
        model[p * PAGE : (p + 1) * PAGE] = bytes(PAGE)
    for p in pages["hole"]:  # set bits over a hole: reads zeros
        bits[8 * p : 8 * p + 8] = True
        model[p * PAGE : (p + 1) * PAGE] = bytes(PAGE)
    for p in pages["differs"]:
        data[p] = new = rng.randbytes(PAGE)
        bits[8 * p : 8 * p + 8] = True
        model[p * PAGE : (p + 1) * PAGE] = new
    for p in pages["mixed"]:  # three sectors set, equal to the backing file: left alone all the same
        data[p] = bytes(content[p * PAGE : (p + 1) * PAGE])
        bits[8 * p : 8 * p + 3] = True
    for p in pages["dead"]:  # data under clear bits
        data[p] = rng.randbytes(PAGE)
    bits = bits[: h.mapped_sectors]
    trailing = 10_000
    with open(cow, "r+b") as f:
        for p, d in data.items():
            f.seek(h.data_offset + p * PAGE)
            f.write(d[: max(0, h.sectors * SECTOR - p * PAGE)])
        f.seek(h.data_offset + h.sectors * SECTOR + 5000)
        f.write(rng.randbytes(trailing - 5000))
        f.flush()
        os.fsync(f.fileno())
        f.seek(h.bitmap_offset)
        raw = np.packbits(np.concatenate([bits, np.zeros(8 * h.bitmap_len - len(bits), bool)]), bitorder="little")
        f.write(raw.tobytes())
    assert disk_bytes(cow) == bytes(model[:size])
    return Lab(cow, backing, bytes(model[:size]), pages, trailing)


# -- what it does --------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["v3", "v2", "v1"])
def test_compact_returns_punches_and_frees_each_kind_of_page(tmp_path, layout):
    lab = build(tmp_path, layout=layout)
    h = ubdcow.read_header(lab.cow)
    bits_before = honoured(lab.cow)
    before = allocated(lab.cow)
    mixed_before = ubdcow.check(lab.cow).mixed_pages
    r = compact(lab.cow)
    # in v1/v2 the last partial page has no bits (the rounding formula): it always reads the backing file,
    # and the data written under it is dead
    last = 1 if layout == "v3" else 0
    assert r.pages_returned == 12 + 12 + last  # equal pages, zeros over zeros, the last partial page
    if layout == "v3":
        assert r.pages_punched == 12
        assert r.dead_pages == 12 + 1 - last
    else:  # a 512-aligned data area: a page shares its file blocks with its neighbours, so a lone page of zeros
        # has no block of its own to punch, and a clear page beside a page that had data may still hold some
        assert r.pages_punched <= 12
        assert r.dead_pages >= 12 + 1 - last
    assert r.mixed_pages == mixed_before == 12
    assert r.truncated_bytes == lab.trailing
    assert r.allocated_before == before and r.allocated_after == allocated(lab.cow)
    assert r.reclaimed_bytes == before - r.allocated_after
    if layout == "v3":  # every punched page held a 4 KiB block of data (the data area is block aligned)
        assert r.reclaimed_bytes >= (12 + 12 + 1 + 12 + 12) * PAGE
    else:  # a 512-aligned data area: a lone page spans two blocks and punching it frees neither (it zeroes)
        assert r.reclaimed_bytes > 0
    assert os.stat(lab.cow).st_size == r.apparent_after == h.data_offset + h.sectors * SECTOR
    assert disk_bytes(lab.cow) == lab.model
    bits = honoured(lab.cow)
    for p in lab.pages["returned"] + lab.pages["zero-over-zero"] + lab.pages["last"]:
        assert not bits[8 * p : 8 * p + 8].any(), p
        if layout == "v3":
            assert not is_data(lab.cow, h.data_offset + p * PAGE, min(PAGE, h.sectors * SECTOR - p * PAGE))
    for p in lab.pages["zeros"] + lab.pages["hole"]:
        assert bits[8 * p : 8 * p + 8].all(), p  # bits kept: they read as zeros, not as the backing file
        if layout == "v3":
            assert not is_data(lab.cow, h.data_offset + p * PAGE, PAGE)
    for p in lab.pages["differs"]:
        assert bits[8 * p : 8 * p + 8].all() and is_data(lab.cow, h.data_offset + p * PAGE, PAGE)
    for p in lab.pages["mixed"]:
        assert (bits[8 * p : 8 * p + 8] == bits_before[8 * p : 8 * p + 8]).all()
    if layout == "v3":
        for p in lab.pages["dead"]:
            assert not is_data(lab.cow, h.data_offset + p * PAGE, PAGE)
    report = ubdcow.check(lab.cow)
    assert report.exit_code == 0 and report.mixed_pages == mixed_before, report.as_dict()
    again = compact(lab.cow)  # nothing left to do
    assert (again.pages_returned, again.pages_punched, again.dead_pages, again.truncated_bytes) == (0, 0, 0, 0)
    assert again.reclaimed_bytes == 0 and disk_bytes(lab.cow) == lab.model


def test_dry_run_changes_nothing_and_predicts_the_result(tmp_path):
    lab = build(tmp_path / "a")
    twin = build(tmp_path / "b")
    before = stamp(lab.cow)
    dry = compact(lab.cow, dry_run=True)
    assert stamp(lab.cow) == before
    real = compact(twin.cow)
    for key in ("pages_returned", "pages_punched", "dead_pages", "truncated_bytes", "mixed_pages",
                "allocated_before", "apparent_before", "apparent_after"):
        assert getattr(dry, key) == getattr(real, key), key
    assert dry.dry_run and not real.dry_run
    assert dry.allocated_after == real.allocated_after  # v3: pages are whole 4 KiB blocks, the estimate is exact
    proc = run_cli("compact", "--dry-run", lab.cow)
    assert proc.returncode == 0 and stamp(lab.cow) == before
    line = proc.stdout.decode().splitlines()[0]
    assert line.startswith(f"{lab.cow} (dry run): ") and "25 pages would return to the backing file" in line


def test_compact_cli_human_and_json(tmp_path):
    lab = build(tmp_path)
    proc = run_cli("compact", "--json", lab.cow)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert set(doc) == {"disks", "exit_code"} and doc["exit_code"] == 0 and len(doc["disks"]) == 1
    data = doc["disks"][0]
    assert data["disk"] == str(lab.cow) and data["pages_returned"] == 25 and data["pages_punched"] == 12
    assert data["allocated_after"] == allocated(lab.cow)
    assert data["reclaimed_bytes"] == data["allocated_before"] - data["allocated_after"] > 0
    lab2 = build(tmp_path / "two", seed=2)
    before = allocated(lab2.cow)
    proc = run_cli("compact", "--bytes", lab2.cow)
    assert proc.returncode == 0
    after = allocated(lab2.cow)
    text = proc.stdout.decode().splitlines()
    assert text == [
        f"{lab2.cow}: {before} allocated before, {after} after ({before - after} reclaimed): 25 pages returned to "
        "the backing file, 12 pages of zeros punched, 12 unused pages punched, 10000 past the data area cut",
        f"note: 12 mixed pages left as they are; to make them whole: ubdcow check {lab2.cow} --repair",
    ]
    again = run_cli("compact", "--bytes", lab2.cow).stdout.decode().splitlines()[0]
    assert again.endswith(f"{after} allocated before, {after} after (0 reclaimed): 0 pages returned to the backing "
                          "file, 0 pages of zeros punched, 0 unused pages punched")
    assert disk_bytes(lab2.cow) == lab2.model


def test_compact_of_a_fresh_overlay_is_a_no_op(tmp_path):
    backing = tmp_path / "b.img"
    backing.write_bytes(os.urandom(1 << 20))
    cow = tmp_path / "c.cow"
    ubdcow.create(cow, backing)
    before = stamp(cow)
    r = compact(cow)
    assert (r.pages_returned, r.pages_punched, r.dead_pages, r.truncated_bytes, r.reclaimed_bytes) == (0, 0, 0, 0, 0)
    assert stamp(cow)[1] == before[1]


# -- refusals ------------------------------------------------------------------------------------


def test_refuses_a_missing_or_mismatched_backing_file_and_changes_nothing(tmp_path):
    lab = build(tmp_path)
    before = stamp(lab.cow)
    moved = tmp_path / "moved.img"
    os.rename(lab.backing, moved)
    proc = run_cli("compact", lab.cow)
    assert proc.returncode == 1
    assert_one_line_error(proc, str(lab.cow), "not found")
    assert f"hint: if it moved, name it: ubdcow compact {lab.cow} --backing PATH".encode() in proc.stderr
    os.rename(moved, lab.backing)
    mtime = os.stat(lab.backing).st_mtime
    os.utime(lab.backing, (mtime + 100, mtime + 100))
    proc = run_cli("compact", lab.cow)
    assert proc.returncode == 1
    assert_one_line_error(proc, "mtime mismatch")
    assert b"hint: " in proc.stderr and b"rebase --unsafe" in proc.stderr
    with pytest.raises(ubdcow.BackingMismatchError):
        compact(lab.cow)
    assert stamp(lab.cow) == before


def test_refuses_a_locked_file_naming_the_holder(tmp_path):
    lab = build(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, ubdcow; d = ubdcow.open(sys.argv[1], 'r+'); "
         "print('R', flush=True); sys.stdin.read()", str(lab.cow)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout.readline() == b"R\n"
        before = stamp(lab.cow)
        for extra in ([], ["--dry-run"]):
            proc = run_cli("compact", *extra, lab.cow)
            assert proc.returncode == 1
            assert_one_line_error(proc, "locked by", f"process {holder.pid}")
        with pytest.raises(ubdcow.ImageLockedError) as err:
            compact(lab.cow)
        assert err.value.pid == holder.pid
        assert stamp(lab.cow) == before
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)


def test_v1_file_with_bits_past_its_bitmap_is_refused_and_convert_is_the_way(unpack, tmp_path):
    c = unpack("v1-rounding-tail")  # a real guest wrote sectors 1952-1953, which have no bit
    before = stamp(c.cow)
    proc = run_cli("compact", c.cow, "--backing", c.backing)
    assert proc.returncode == 1
    assert_one_line_error(proc, str(c.cow), "no bit", "v1")
    assert b"hint: convert the file to v3 first: ubdcow convert" in proc.stderr
    assert stamp(c.cow) == before
    out = tmp_path / "v3.cow"
    ubdcow.convert(c.cow, out, layout="v3", backing=c.backing)
    with ubdcow.open(out, "r+", backing=c.backing) as disk:
        page = next(p for p in range(100) if not honoured(out)[8 * p : 8 * p + 8].any())
        disk.pwrite(disk.pread(PAGE, page * PAGE), page * PAGE)  # a page rewritten with what it had
        expected = disk.read()
    assert honoured(out)[8 * page : 8 * page + 8].all()
    r = compact(out, backing=c.backing)
    with ubdcow.open(out, backing=c.backing) as disk:
        assert disk.read() == expected
    assert ubdcow.check(out, backing=c.backing).exit_code == 0
    assert r.pages_returned == 1 and not honoured(out)[8 * page : 8 * page + 8].any()


def test_v1_file_with_bitless_sectors_but_no_stray_bits_compacts(tmp_path):
    # 1,000,000 bytes: 1954 sectors, a v1 bitmap of 244 bytes: sectors 1952-1953 have no bit (they read the
    # backing file whatever is written); the rest compacts as usual
    backing = tmp_path / "b.img"
    backing.write_bytes(os.urandom(1_000_000))
    cow = tmp_path / "c.cow"
    ubdcow.create(cow, backing, layout="v1")
    h = ubdcow.read_header(cow)
    assert h.mapped_sectors == 1952 < h.sectors == 1954
    with ubdcow.open(cow, "r+") as d:
        d.pwrite(d.pread(PAGE * 10, 0), 0)
        d.pwrite(bytes(4 * PAGE), PAGE * 20)  # 4 pages of zeros: 3 file blocks wholly inside them
        d.pwrite(bytes(PAGE), PAGE * 40)  # a lone page of zeros shares both its blocks with its neighbours
    model = disk_bytes(cow)
    os.sync()
    before = allocated(cow)
    r = compact(cow)
    assert h.data_offset % PAGE == 1024
    assert (r.pages_returned, r.pages_punched) == (10, 4)
    # the returned run's 9 inner blocks and the zero run's 3, less an extent block the filesystem may add
    assert before - allocated(cow) >= (9 + 3 - 1) * PAGE
    assert disk_bytes(cow) == model


# -- several files -------------------------------------------------------------------------------


def test_several_files_each_processed_worst_exit_code(tmp_path):
    good = build(tmp_path / "good")
    other = build(tmp_path / "other", seed=3)
    missing = tmp_path / "nope.cow"
    proc = run_cli("compact", good.cow, missing, other.cow)
    assert proc.returncode == 1
    err = proc.stderr.decode().splitlines()
    assert err == [f"ubdcow: {missing}: cannot open COW file: No such file or directory"]
    lines = proc.stdout.decode().splitlines()
    assert [x for x in lines if x.startswith(f"{good.cow}: ") or x.startswith(f"{other.cow}: ")] == [
        x for x in lines if ": " in x and not x.startswith("note")]
    assert disk_bytes(good.cow) == good.model and disk_bytes(other.cow) == other.model
    assert honoured(good.cow).sum() < 8 * 80  # compacted
    proc = run_cli("compact", "--json", "--dry-run", good.cow, missing)
    doc = json.loads(proc.stdout)
    data = doc["disks"]
    assert proc.returncode == doc["exit_code"] == 1 and len(data) == 2
    assert data[0]["disk"] == str(good.cow) and data[0]["pages_returned"] == 0 and data[0]["exit_code"] == 0
    assert data[1]["disk"] == str(missing) and data[1]["exit_code"] == 1 and "No such file" in data[1]["error"]
    proc = run_cli("compact", "--quiet", good.cow, other.cow)
    assert proc.returncode == 0 and proc.stdout == b""


# -- kill -9 at random points ------------------------------------------------------------------

CHILD = """
import os, sys
import ubdcow.compact
c = sys.modules["ubdcow.compact"]  # the module (ubdcow.compact is the function)
c._WINDOW_PAGES = 16  # many windows and commits (clear bits, fsync, punch): many places to be killed
c._BATCH = 8
commit = c._commit
def announced(job):
    commit(job)
    os.write(1, b"B")
c._commit = announced
os.write(1, b"R")
c.compact(sys.argv[1])
os.write(1, b"D")
"""


def test_kill_9_during_compact_never_changes_the_content(tmp_path):
    rng = random.Random(0xC0FFEE)
    lab = build(tmp_path / "lab", size=2 << 20, per_kind=40, seed=7)
    pristine = tmp_path / "pristine.cow"
    subprocess.run(["cp", "--sparse=always", lab.cow, pristine], check=True)
    ubdcow.merge(lab.cow, tmp_path / "merged.img")
    merged = (tmp_path / "merged.img").read_bytes()
    assert merged == lab.model
    bits_before = int(honoured(pristine).sum())
    twin = build(tmp_path / "twin", size=2 << 20, per_kind=40, seed=7).cow
    compact(twin)
    bits_after = int(honoured(twin).sum())  # an uninterrupted run
    assert bits_after < bits_before
    outcomes = {"before": 0, "inside": 0, "done": 0, "some bits cleared": 0}
    trials = 60
    for trial in range(trials):
        subprocess.run(["cp", "--sparse=always", pristine, lab.cow], check=True)
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(lab.cow)], stdout=subprocess.PIPE)
        assert child.stdout.read(1) == b"R"
        commits = rng.randrange(0, 14)  # about ten commits in a whole run: some kills land after the end
        got = child.stdout.read(commits)
        time.sleep(rng.uniform(0.0, 0.003))
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        rest = child.stdout.read()
        child.stdout.close()
        deadline = time.monotonic() + 5
        while True:
            try:
                content = disk_bytes(lab.cow)
                break
            except ubdcow.ImageLockedError:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        assert content == merged, f"trial {trial}: the content changed (killed after {got + rest!r})"
        report = ubdcow.check(lab.cow)
        assert report.exit_code == 0, (trial, report.as_dict())
        assert report.mixed_pages == 40, (trial, report.mixed_pages)  # none made, none touched
        set_now = int(honoured(lab.cow).sum())
        assert bits_after <= set_now <= bits_before
        outcomes["some bits cleared"] += bits_after < set_now < bits_before
        if b"D" in rest:
            outcomes["done"] += 1
        elif set_now == bits_before and not (got + rest):
            outcomes["before"] += 1
        else:
            outcomes["inside"] += 1
        if trial % 10 == 0:  # finish the job: the result is the same as an uninterrupted run
            r = compact(lab.cow)
            assert disk_bytes(lab.cow) == merged
            assert int(honoured(lab.cow).sum()) == bits_after
            assert r.mixed_pages == 40
    print(f"OBSERVED: {trials} kills: {outcomes}")
    assert outcomes["inside"] >= 20 and outcomes["some bits cleared"] >= 10, outcomes
