"""rebase, diff and convert: against real files, independent models and the real UML kernel.

Truth here is never ubdcow's own reader: headers, bits and content are read
by the model (tests/test_oracle_model.py, written from the spec without
ubdcow code), differing sectors are computed by comparing plain byte strings,
conformance cases are checked against the bytes a real guest read
(expected.img), and the ``uml`` tests boot Debian's linux.uml and dump
/dev/ubdb with 4 KiB O_DIRECT reads (larger or buffered reads return wrong
data with this kernel).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import test_oracle_model as spec
from conftest import Case, assert_one_line_error, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.uml import FAIL, checked, dump_devices, guest, ubd_arg

import ubdcow
from ubdcow._io import punch_hole
from ubdcow.check import check
from ubdcow.diff import diff
from ubdcow.inspect import map_image
from ubdcow.merge import merge

SECTOR = 512
PAGE = 4096
WINDOW = 4 << 20  # the window size rebase and diff work in: runs crossing it are interesting
OTHER_MTIME = 1_577_836_800  # 2020-01-01: differs from every header mtime used here
CONVERT_CASES = ["v1-native", "v1-rounding-tail", "v2-bigendian", "v3-broken-64bit"]


# -- helpers -------------------------------------------------------------------------


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stamp(path: Path) -> tuple[str, int, int]:
    """Content, mtime (ns) and inode: enough to tell that a file was not touched."""
    st = path.stat()
    return sha(path), st.st_mtime_ns, st.st_ino


def snapshot(folder: Path) -> dict[str, tuple[str, int, int]]:
    return {p.name: stamp(p) for p in sorted(folder.iterdir()) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if "ubdcow-tmp" in p.name)


def honoured_bits(path: Path) -> set[int]:
    """Sectors whose bit is set, read by the model from the file's bitmap bytes (bits the kernel ignores
    excluded)."""
    return set(spec.bits(path))


def pages_of(sectors: set[int], nsect: int) -> set[int]:
    """The sectors of the whole 4 KiB pages (8 sectors; the disk's last page may be short) holding ``sectors``."""
    return {s for p in {x // 8 for x in sectors} for s in range(8 * p, min(8 * p + 8, nsect))}


def mixed_pages(path: Path) -> list[int]:
    """Pages whose honoured bits are neither all set nor all clear, from the file's bitmap bytes."""
    return spec.mixed_pages(path)


def sectors_of(extents: list[list[int]]) -> set[int]:
    return {s for first, count in extents for s in range(first, first + count)}


def differing_sectors(a: bytes | bytearray, b: bytes | bytearray) -> set[int]:
    assert len(a) == len(b)
    return {i // SECTOR for i in range(0, len(a), SECTOR) if a[i : i + SECTOR] != b[i : i + SECTOR]}


def first_difference(a: bytes | bytearray, b: bytes | bytearray) -> str:
    n = min(len(a), len(b))
    bad = [i for i in range(0, n, SECTOR) if a[i : i + SECTOR] != b[i : i + SECTOR]]
    where = f"; first differing sector {bad[0] // SECTOR}, {len(bad)} sectors differ" if bad else ""
    return f"lengths {len(a)} vs {len(b)}{where}"


def assert_same(actual: bytes | bytearray, expected: bytes | bytearray, what: str) -> None:
    # never let pytest diff megabytes: say where they differ
    assert bytes(actual) == bytes(expected), f"{what}: {first_difference(actual, expected)}"


def virtual_disk(cow: Path, backing: Path | None = None) -> bytes:
    """The virtual disk as the model reads the file (tests/test_oracle_model.py: the spec's offsets and bits,
    no ubdcow code), once ubdcow's reader is checked to agree; ``backing`` defaults to the recorded path."""
    expected = spec.disk(cow, backing or Path(spec.read_header(cow).backing_file))
    with ubdcow.open(cow, backing=backing) as disk:
        ours = disk.pread(disk.size, 0)
    assert_same(ours, expected, f"ubdcow's reader vs the model on {cow.name}")
    return expected


def data_blocks(path: Path, start: int, end: int) -> set[int]:
    """Indices (from ``start``) of filesystem blocks in [start, end) that hold data, by SEEK_DATA/SEEK_HOLE."""
    block = os.statvfs(path).f_frsize
    assert start % block == 0
    found: set[int] = set()
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = start
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                break
            if data >= end:
                break
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
            found.update(range((data - start) // block, (hole - start + block - 1) // block))
            pos = hole
    finally:
        os.close(fd)
    return found


def cli_ok(*args: object, cwd: Path | None = None) -> str:
    proc = run_cli(*map(str, args), cwd=cwd)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout.decode()


def check_exit(cow: Path, *extra: object) -> tuple[int, str]:
    proc = run_cli("check", str(cow), *map(str, extra))
    return proc.returncode, proc.stdout.decode() + proc.stderr.decode()


# -- the real guest -------------------------------------------------------------------


def guest_dump(cow: Path, workdir: Path) -> bytes:
    """Boot a guest with ``cow`` as /dev/ubdb and return the whole device as it read it (4 KiB O_DIRECT)."""
    return dump_devices([cow], workdir)[0]


def assert_guest_refuses(cow: Path, workdir: Path, header_mtime: int, actual_mtime: int) -> None:
    """The kernel refuses the device with its mtime complaint, and a read from /dev/ubdb fails."""
    before = stamp(cow)
    result = guest(checked("dd if=/dev/ubdb of=/dev/null bs=4096 count=1 iflag=direct status=none"),
                   ubd_arg(cow), workdir=workdir)
    console = result.console
    assert f"mtime mismatch ({header_mtime} vs {actual_mtime}) of COW header vs backing file" in console, (
        console[-3000:])
    assert f'Can\'t open "{cow}"' in console, console[-3000:]
    failures = [line for line in console.splitlines() if line.startswith(FAIL)]
    assert len(failures) == 1 and "dd if=/dev/ubdb" in failures[0], console[-3000:]
    assert stamp(cow) == before  # the kernel does not repair the header


def device_bytes(size: int) -> int:
    return -(-size // SECTOR) * SECTOR


# -- rebase --unsafe: the mtime-mismatch repair ------------------------------------------------


def make_cow_with_writes(tmp_path: Path, size: int, rng: random.Random) -> tuple[Path, Path, bytearray]:
    """A random backing, a v3 COW on it made by ubdcow.create, and random writes; returns the model."""
    backing = tmp_path / "backing.img"
    cow = tmp_path / "overlay.cow"
    model = bytearray(rng.randbytes(size))
    backing.write_bytes(model)
    ubdcow.create(cow, backing)
    with ubdcow.open(cow, "r+") as disk:
        for _ in range(8):
            offset = rng.randrange(size)
            data = rng.randbytes(min(rng.randrange(1, 12 * SECTOR), size - offset))
            disk.pwrite(data, offset)
            model[offset : offset + len(data)] = data
        disk.write_zeroes(16 * SECTOR, 8 * SECTOR)  # a set bit over a hole
        model[16 * SECTOR : 24 * SECTOR] = bytes(8 * SECTOR)
    return cow, backing, model


@pytest.mark.uml
def test_unsafe_rebase_repairs_mtime_mismatch_of_v3_file_for_a_real_guest(tmp_path):
    size = 1 << 20
    cow, backing, model = make_cow_with_writes(tmp_path, size, random.Random(0x5AFE))
    header = spec.read_header(cow)
    assert header.mtime == int(backing.stat().st_mtime) != OTHER_MTIME
    os.utime(backing, (OTHER_MTIME, OTHER_MTIME))  # touched: the content is unchanged
    raw_before = cow.read_bytes()

    code, text = check_exit(cow)
    assert code == 3, text
    assert f"mtime mismatch ({header.mtime} vs {OTHER_MTIME}) of COW header vs backing file {backing}" in text
    assert "[backing-mtime]" in text
    with pytest.raises(ubdcow.BackingMismatchError):
        ubdcow.open(cow)

    assert_guest_refuses(cow, tmp_path, header.mtime, OTHER_MTIME)

    out = cli_ok("rebase", "--unsafe", cow, "--backing", backing)
    assert "rebased" in out
    after = spec.read_header(cow)
    assert (after.layout, after.backing_file, after.mtime, after.size) == (
        "v3", os.path.realpath(backing), OTHER_MTIME, size)
    raw_after = cow.read_bytes()
    assert len(raw_after) == len(raw_before)
    assert raw_after[after.header_size :] == raw_before[after.header_size :], "rebase --unsafe wrote past the header"
    assert raw_after[: after.header_size] != raw_before[: after.header_size]

    code, text = check_exit(cow)
    assert code == 0, text
    assert_same(virtual_disk(cow), model, "ubdcow after the rebase")
    dump = guest_dump(cow, tmp_path)
    assert len(dump) == device_bytes(size)
    assert_same(dump[:size], model, "the guest's /dev/ubdb after the rebase")


@pytest.mark.uml
@pytest.mark.parametrize("name", ["v1-native", "v2-bigendian"])
def test_unsafe_rebase_of_v1_v2_file_keeps_its_layout_and_bitmap(unpack, name):
    c: Case = unpack(name)
    original = c.cow.read_bytes()
    h0 = spec.read_header(c.cow)
    assert h0.layout == c.meta["layout"]
    bitmap = slice(h0.bitmap_offset, h0.bitmap_offset + h0.bitmap_len)

    def assert_only_header_changed() -> None:
        raw = c.cow.read_bytes()
        assert len(raw) == len(original)
        assert raw[bitmap] == original[bitmap], "the bitmap changed"
        assert raw[h0.header_size :] == original[h0.header_size :], "bytes past the header changed"
        h = spec.read_header(c.cow)
        assert (h.layout, h.byteorder, h.version, h.size, h.sectorsize, h.bitmap_offset, h.data_offset) == (
            h0.layout, h0.byteorder, h0.version, h0.size, h0.sectorsize, h0.bitmap_offset, h0.data_offset)

    # the recorded /srv/... path does not exist here: record the unpacked backing (its mtime matches)
    code, text = check_exit(c.cow)
    assert code == 3 and "not found" in text, text
    cli_ok("rebase", "--unsafe", c.cow, "--backing", c.backing)
    assert_only_header_changed()
    h1 = spec.read_header(c.cow)
    assert (h1.backing_file, h1.mtime) == (os.path.realpath(c.backing), c.meta["mtime"])
    assert check(c.cow).exit_code == 0

    # now touch the backing file: the kernel refuses, check says so
    os.utime(c.backing, (OTHER_MTIME, OTHER_MTIME))
    code, text = check_exit(c.cow)
    assert code == 3, text
    assert f"mtime mismatch ({c.meta['mtime']} vs {OTHER_MTIME}) of COW header vs backing file" in text
    assert_guest_refuses(c.cow, c.dir, c.meta["mtime"], OTHER_MTIME)

    cli_ok("rebase", "--unsafe", c.cow, "--backing", c.backing)
    assert_only_header_changed()
    assert spec.read_header(c.cow).mtime == OTHER_MTIME
    code, text = check_exit(c.cow)
    assert code == 0, text
    assert_same(virtual_disk(c.cow), c.expected_bytes, "ubdcow after the rebase")
    dump = guest_dump(c.cow, c.dir)
    assert_same(dump[: c.meta["size"]], c.expected_bytes, "the guest's /dev/ubdb after the rebase")


@pytest.mark.parametrize("unsafe", [True, False], ids=["unsafe", "safe"])
@pytest.mark.parametrize("delta", [SECTOR, -SECTOR, 1])
def test_rebase_refuses_a_backing_of_another_size(tmp_path, unsafe, delta):
    size = 256 * 1024
    cow, backing, _ = make_cow_with_writes(tmp_path, size, random.Random(delta))
    other = tmp_path / "other.img"
    shutil.copyfile(backing, other)
    os.truncate(other, size + delta)
    before = snapshot(tmp_path)
    proc = run_cli("rebase", *(["--unsafe"] if unsafe else []), str(cow), "--backing", str(other))
    assert_one_line_error(proc, f"{size + delta}", f"{size}", "sizes must match")
    assert snapshot(tmp_path) == before


def test_unsafe_rebase_refuses_a_path_too_long_for_a_v1_header(unpack, tmp_path):
    c = unpack("v1-native")
    deep = tmp_path.joinpath(*["d" * 60] * 4)
    deep.mkdir(parents=True)
    far = deep / "backing.img"
    shutil.copyfile(c.backing, far)
    assert len(os.fsencode(os.path.realpath(far))) > 255
    before = stamp(c.cow)
    proc = run_cli("rebase", "--unsafe", str(c.cow), "--backing", str(far))
    assert_one_line_error(proc, "v1")
    assert stamp(c.cow) == before


# -- safe rebase: the content is kept ---------------------------------------------------------


@pytest.mark.parametrize(
    "seed,size", [(1, 1 << 20), (2, 777_777), (3, WINDOW + 3 * SECTOR + 100)], ids=["1MiB", "odd", "past-window"]
)
def test_safe_rebase_onto_modified_copy_keeps_the_content(tmp_path, seed, size):
    rng = random.Random(seed)
    cow, old, model = make_cow_with_writes(tmp_path, size, rng)
    set_before = honoured_bits(cow)
    content_before = virtual_disk(cow)
    assert_same(content_before, model, "the virtual disk before the rebase vs the writes replayed")
    old_bytes = old.read_bytes()
    nsect = -(-size // SECTOR)

    # a copy of the backing, then changes: over COW-written sectors (no copy needed) and elsewhere
    new = tmp_path / "new-backing.img"
    shutil.copyfile(old, new)
    new_bytes = bytearray(old_bytes)
    clear = sorted(set(range(nsect)) - set_before)
    starts = [s * SECTOR + rng.randrange(SECTOR) for s in rng.sample(sorted(set_before), 4) + rng.sample(clear, 6)]
    if size > WINDOW:
        starts.append(WINDOW - 700)  # a run across the window boundary
    for start in starts:
        n = min(rng.randrange(1, 3 * SECTOR), size - start)
        new_bytes[start : start + n] = rng.randbytes(n)
    new_bytes[-1] ^= 0xFF  # the last (possibly partial) sector
    with open(new, "r+b") as f:
        f.write(new_bytes)
    os.utime(new, (OTHER_MTIME, OTHER_MTIME))
    differ = differing_sectors(old_bytes, new_bytes)
    assert differ & set_before and differ - set_before  # both kinds are exercised
    old_stamp = stamp(old)

    out = json.loads(cli_ok("rebase", cow, "--backing", new, "--json"))
    assert out["unsafe"] is False
    assert out["differing_sectors"] == len(differ - set_before)
    h = spec.read_header(cow)
    assert (h.layout, h.backing_file, h.mtime, h.size) == ("v3", os.path.realpath(new), OTHER_MTIME, size)
    assert out["backing_file"] == h.backing_file and out["mtime"] == OTHER_MTIME
    assert not mixed_pages(cow)
    grown = set_before | pages_of(differ, nsect)
    assert honoured_bits(cow) == grown, "the set bits must grow by exactly the pages of the copied sectors"
    assert out["copied_sectors"] == len(grown - set_before) > out["differing_sectors"]  # what was written
    assert_same(virtual_disk(cow), content_before, "the virtual disk after the rebase")
    assert stamp(old) == old_stamp, "the old backing file changed"
    assert new.read_bytes() == new_bytes and new.stat().st_mtime == OTHER_MTIME
    assert check(cow).exit_code == 0


def test_safe_rebase_of_identical_copy_copies_nothing(tmp_path):
    cow, old, model = make_cow_with_writes(tmp_path, 128 * 1024, random.Random(7))
    bits = honoured_bits(cow)
    data_before = cow.read_bytes()[spec.read_header(cow).data_offset :]
    new = tmp_path / "copy.img"
    shutil.copyfile(old, new)
    out = json.loads(cli_ok("rebase", cow, "--backing", new, "--json"))
    assert out["copied_sectors"] == out["differing_sectors"] == 0
    assert honoured_bits(cow) == bits
    assert cow.read_bytes()[spec.read_header(cow).data_offset :] == data_before
    assert spec.read_header(cow).backing_file == os.path.realpath(new)
    assert_same(virtual_disk(cow), model, "content")


def test_safe_rebase_of_v1_file_with_the_rounding_bug(unpack):
    """v1, size 1,000,000: differences in the bitless sectors 1952-1953 cannot be kept; elsewhere they can."""
    c = unpack("v1-rounding-tail")
    old_bytes = c.backing.read_bytes()
    honoured = sectors_of(c.meta["effective_extents"])
    assert honoured_bits(c.cow) == honoured

    tail = c.dir / "tail.img"
    changed = bytearray(old_bytes)
    changed[1952 * SECTOR + 10] ^= 0x55
    tail.write_bytes(changed)
    before = snapshot(c.dir)
    proc = run_cli("rebase", str(c.cow), "--backing", str(tail), "--old-backing", str(c.backing))
    assert_one_line_error(proc, "1952")
    assert b"convert" in proc.stderr
    assert snapshot(c.dir) == before

    good = c.dir / "good.img"
    changed = bytearray(old_bytes)
    for s in [*range(10, 21), 1949]:
        changed[s * SECTOR : s * SECTOR + 3] = b"new"
    good.write_bytes(changed)
    original = c.cow.read_bytes()
    h0 = spec.read_header(c.cow)
    out = json.loads(cli_ok("rebase", c.cow, "--backing", good, "--old-backing", c.backing, "--json"))
    assert out["differing_sectors"] == 11  # 1949 is already in the COW file
    assert out["copied_sectors"] == len(set(range(8, 24)) - honoured)  # the whole pages 1 and 2 were written
    # the mixed page 243 (1948-1951 written by the kernel) was made whole from the old backing file
    assert (out["filled_pages"], mixed_pages(c.cow)) == (1, [])
    h = spec.read_header(c.cow)
    assert (h.layout, h.byteorder, h.data_offset) == ("v1", h0.byteorder, h0.data_offset)
    assert h.backing_file == os.path.realpath(good)
    assert honoured_bits(c.cow) == honoured | set(range(8, 24)) | set(range(1944, 1952))
    raw = c.cow.read_bytes()
    # the stray bits the kernel wrote past the bitmap, and the data of untouched sectors, are as they were
    assert raw[h.bitmap_offset + h.bitmap_len : h.data_offset + 8 * SECTOR] == original[
        h.bitmap_offset + h.bitmap_len : h.data_offset + 8 * SECTOR]
    assert raw[h.data_offset + 24 * SECTOR : h.data_offset + 1944 * SECTOR] == original[
        h.data_offset + 24 * SECTOR : h.data_offset + 1944 * SECTOR]
    assert raw[h.data_offset + 1948 * SECTOR :] == original[h.data_offset + 1948 * SECTOR :]
    # the filled sectors hold the old backing's bytes
    assert raw[h.data_offset + 1944 * SECTOR : h.data_offset + 1948 * SECTOR] == old_bytes[
        1944 * SECTOR : 1948 * SECTOR]
    assert_same(virtual_disk(c.cow), c.expected_bytes, "content after the rebase")


def test_safe_rebase_with_old_backing_missing(tmp_path):
    cow, old, model = make_cow_with_writes(tmp_path, 128 * 1024, random.Random(11))
    new = tmp_path / "new.img"
    shutil.copyfile(old, new)
    moved = tmp_path / "moved.img"
    os.rename(old, moved)
    before = snapshot(tmp_path)
    proc = run_cli("rebase", str(cow), "--backing", str(new))
    assert_one_line_error(proc, str(old), "not found")
    assert snapshot(tmp_path) == before
    # with the old backing named, it works (and keeps the content)
    cli_ok("rebase", cow, "--backing", new, "--old-backing", moved)
    assert spec.read_header(cow).backing_file == os.path.realpath(new)
    assert_same(virtual_disk(cow), model, "content")


def test_safe_rebase_missing_old_backing_hint_names_old_backing(tmp_path):
    """In ``rebase``, --backing is the NEW file: the hint must point at --old-backing."""
    cow, old, _ = make_cow_with_writes(tmp_path, 64 * 1024, random.Random(12))
    new = tmp_path / "new.img"
    shutil.copyfile(old, new)
    old.unlink()
    proc = run_cli("rebase", str(cow), "--backing", str(new))
    assert_one_line_error(proc, "not found")
    assert b"--old-backing" in proc.stderr, proc.stderr.decode()


# -- diff, then merge ------------------------------------------------------------------------

MOD_KINDS = ["random", "zero", "same", "flip"]


def apply_modifications(base: bytes, mods: list[tuple[str, int, int]], rng: random.Random) -> bytearray:
    out = bytearray(base)
    size = len(base)
    for kind, start, length in mods:
        start %= size
        n = min(length, size - start)
        if kind == "random":
            out[start : start + n] = rng.randbytes(n)
        elif kind == "zero":
            out[start : start + n] = bytes(n)
        elif kind == "same":
            out[start : start + n] = base[start : start + n]
        else:
            out[start] ^= 0x80
    return out


def random_base(size: int, rng: random.Random) -> bytes:
    data = bytearray(rng.randbytes(size))
    for _ in range(2):  # some all-zero stretches, so zero-over-zero is no difference
        a = rng.randrange(size)
        n = min(rng.randrange(1, 4 * SECTOR), size - a)
        data[a : a + n] = bytes(n)
    return bytes(data)


def differing_pages(a: bytes | bytearray, b: bytes | bytearray) -> set[int]:
    assert len(a) == len(b)
    return {i // PAGE for i in range(0, len(a), PAGE) if a[i : i + PAGE] != b[i : i + PAGE]}


def verify_diff(base: Path, modified: bytes, cow: Path, result: object | None = None) -> None:
    """Everything a diff output must satisfy, checked against plain byte comparisons: whole pages."""
    size = len(modified)
    nsect = -(-size // SECTOR)
    base_bytes = base.read_bytes()
    pages = differing_pages(base_bytes, modified)
    zero_pages = {p for p in pages if not any(modified[p * PAGE : (p + 1) * PAGE])}
    bits = {s for p in pages for s in range(8 * p, min(8 * p + 8, nsect))}
    zero = {s for p in zero_pages for s in range(8 * p, min(8 * p + 8, nsect))}
    assert differing_sectors(base_bytes, modified) <= bits
    h = spec.read_header(cow)
    assert (h.layout, h.backing_file, h.mtime, h.size, h.sectorsize) == (
        "v3", os.path.realpath(base), int(base.stat().st_mtime), size, SECTOR)
    assert honoured_bits(cow) == bits
    assert not mixed_pages(cow)
    facts = ubdcow.info(cow)
    assert (facts["cow_sectors"], facts["cow_bytes"]) == (len(bits), spec.cow_bytes(cow))
    if result is not None:
        got = (result.sectors, result.zero_sectors, result.pages)  # type: ignore[attr-defined]
        assert got == (len(bits), len(zero), len(pages))
    # data only where a differing page is non-zero: the zero ones are holes with their bits set
    block = os.statvfs(cow).f_frsize
    allowed = {b for p in pages - zero_pages for b in range(p * PAGE // block, -(-(p + 1) * PAGE // block))}
    have = data_blocks(cow, h.data_offset, h.data_offset + device_bytes(size))
    assert have <= allowed, f"data in blocks {sorted(have - allowed)} that hold no non-zero differing page"
    assert_same(virtual_disk(cow), modified, "the diff's virtual disk")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    size=st.one_of(st.integers(1, 40).map(lambda n: n * SECTOR), st.integers(1, 40 * SECTOR)),
    seed=st.integers(0, 2**32 - 1),
    mods=st.lists(
        st.tuples(st.sampled_from(MOD_KINDS), st.integers(0, 40 * SECTOR), st.integers(1, 12 * SECTOR)),
        max_size=8,
    ),
)
def test_diff_then_merge_round_trips(tmp_path, size, seed, mods):
    rng = random.Random(seed)
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    base = work / "base.img"
    base_bytes = random_base(size, rng)
    base.write_bytes(base_bytes)
    modified = apply_modifications(base_bytes, mods, rng)
    mod_path = work / "modified.img"
    mod_path.write_bytes(modified)
    cow = work / "thin.cow"
    result = diff(base, mod_path, cow)
    verify_diff(base, modified, cow, result)
    merge(cow, work / "merged.img")
    assert_same((work / "merged.img").read_bytes(), modified, "merge of the diff")
    assert base.read_bytes() == base_bytes and leftovers(work) == []
    shutil.rmtree(work)


def test_diff_across_the_window_with_zeroed_megabyte_is_sparse(tmp_path):
    rng = random.Random(21)
    size = 2 * WINDOW + 3 * SECTOR + 123  # odd, and three windows
    base_bytes = rng.randbytes(size)
    base = tmp_path / "base.img"
    base.write_bytes(base_bytes)
    modified = bytearray(base_bytes)
    modified[WINDOW - 1000 : WINDOW + 1000] = rng.randbytes(2000)  # across a window boundary
    modified[SECTOR : SECTOR + (1 << 20)] = bytes(1 << 20)  # 1 MiB of zeros over data: holes with bits set
    modified[2 * WINDOW - 5] ^= 1
    modified[-1] ^= 1  # the partial last sector
    mod = tmp_path / "modified.img"
    mod.write_bytes(modified)
    cow = tmp_path / "thin.cow"
    out = json.loads(cli_ok("diff", base, mod, "-o", cow, "--json"))
    pages = differing_pages(base_bytes, modified)
    # pages 1-255 are all zeros; pages 0 and 256 keep some of the base's bytes, so they are data;
    # the last page (it differs) is short: 4 sectors
    assert out["sectors"] == 8 * (len(pages) - 1) + 4 and out["zero_sectors"] == 8 * 255
    assert out["pages"] == len(pages)
    verify_diff(base, bytes(modified), cow)
    assert cow.stat().st_blocks * 512 < 256 * 1024, "the zeroed megabyte was written as data"
    cli_ok("merge", cow, "-o", tmp_path / "merged.img")
    assert_same((tmp_path / "merged.img").read_bytes(), modified, "merge")


@pytest.mark.parametrize("tail", ["random", "zero", "same"])
def test_diff_of_odd_size_image_partial_last_sector(tmp_path, tail):
    rng = random.Random(31)
    size = 100 * SECTOR + 77
    base_bytes = rng.randbytes(size)
    base = tmp_path / "base.img"
    base.write_bytes(base_bytes)
    modified = bytearray(base_bytes)
    modified[3 * SECTOR : 4 * SECTOR] = rng.randbytes(SECTOR)
    if tail == "random":
        modified[-77:] = rng.randbytes(77)
    elif tail == "zero":
        modified[-77:] = bytes(77)
    mod = tmp_path / "modified.img"
    mod.write_bytes(modified)
    cow = tmp_path / "thin.cow"
    cli_ok("diff", base, mod, "-o", cow)
    # whole pages: sector 3's page, and the short last page (sectors 96-100)
    assert honoured_bits(cow) == (set(range(8)) | set(range(96, 101)) if tail != "same" else set(range(8)))
    verify_diff(base, bytes(modified), cow)
    cli_ok("merge", cow, "-o", tmp_path / "merged.img")
    merged = (tmp_path / "merged.img").read_bytes()
    assert len(merged) == size
    assert_same(merged, modified, "merge")


def test_diff_of_a_cow_file_as_modified(tmp_path):
    cow, backing, model = make_cow_with_writes(tmp_path, 256 * 1024, random.Random(41))
    thin = tmp_path / "thin.cow"
    cli_ok("diff", backing, cow, "-o", thin)
    verify_diff(backing, bytes(model), thin)


def test_diff_refuses_sizes_that_differ_and_writes_nothing(tmp_path):
    rng = random.Random(51)
    base = tmp_path / "base.img"
    base.write_bytes(rng.randbytes(64 * 1024))
    mod = tmp_path / "modified.img"
    mod.write_bytes(base.read_bytes() + b"x")
    before = snapshot(tmp_path)
    proc = run_cli("diff", str(base), str(mod), "-o", str(tmp_path / "thin.cow"))
    assert_one_line_error(proc, "sizes must match")
    assert not (tmp_path / "thin.cow").exists()
    assert snapshot(tmp_path) == before and leftovers(tmp_path) == []


def test_diff_refuses_a_cow_file_as_base(tmp_path):
    cow, backing, _ = make_cow_with_writes(tmp_path, 64 * 1024, random.Random(52))
    proc = run_cli("diff", str(cow), str(backing), "-o", str(tmp_path / "thin.cow"))
    assert_one_line_error(proc, "COW file")
    assert not (tmp_path / "thin.cow").exists()


def test_diff_existing_output_needs_overwrite(tmp_path):
    rng = random.Random(53)
    base = tmp_path / "base.img"
    base.write_bytes(rng.randbytes(64 * 1024))
    modified = bytearray(base.read_bytes())
    modified[5000:6000] = rng.randbytes(1000)
    mod = tmp_path / "modified.img"
    mod.write_bytes(modified)
    out = tmp_path / "thin.cow"
    out.write_bytes(b"keep me")
    before = snapshot(tmp_path)
    proc = run_cli("diff", str(base), str(mod), "-o", str(out))
    assert_one_line_error(proc, str(out), "already exists")
    assert snapshot(tmp_path) == before
    for target in (base, mod):  # an input as output is refused even with --overwrite
        proc = run_cli("diff", str(base), str(mod), "-o", str(target), "--overwrite")
        assert_one_line_error(proc, "output is the")
        assert snapshot(tmp_path) == before
    cli_ok("diff", base, mod, "-o", out, "--overwrite")
    verify_diff(base, bytes(modified), out)
    assert leftovers(tmp_path) == []


@pytest.mark.uml
def test_a_real_guest_reads_modified_through_the_diff(tmp_path):
    rng = random.Random(61)
    size = (1 << 20) + 1000  # odd: the device has a partial last sector
    base_bytes = rng.randbytes(size)
    base = tmp_path / "base.img"
    base.write_bytes(base_bytes)
    modified = bytearray(base_bytes)
    for _ in range(12):
        a = rng.randrange(size)
        n = min(rng.randrange(1, 20 * SECTOR), size - a)
        modified[a : a + n] = rng.randbytes(n) if rng.random() < 0.6 else bytes(n)
    modified[0:4096] = bytes(4096)  # a zeroed page: holes with bits set, over non-zero backing
    modified[-1000:] = rng.randbytes(1000)
    mod = tmp_path / "modified.img"
    mod.write_bytes(modified)
    cow = tmp_path / "thin.cow"
    cli_ok("diff", base, mod, "-o", cow)
    verify_diff(base, bytes(modified), cow)
    dump = guest_dump(cow, tmp_path)
    assert len(dump) == device_bytes(size)
    assert_same(dump[:size], modified, "the guest's /dev/ubdb")


# -- convert ---------------------------------------------------------------------------------


def plain_map(cow: Path) -> list[tuple[int, int, str]]:
    """``ubdcow map`` without the offsets (they differ between layouts)."""
    return [(e["start"], e["length"], e["source"]) for e in map_image(cow)]


def convert_cli(c: Case, out: Path, *extra: str) -> dict:
    return json.loads(cli_ok("convert", c.cow, "-o", out, "--json", *extra))


def assert_converted(c: Case, out: Path, layout: str) -> None:
    h = spec.read_header(out)
    m = c.meta
    assert (h.layout, h.backing_file, h.mtime, h.size, h.sectorsize) == (
        layout, m["backing_file_in_header"], m["mtime"], m["size"], m["sectorsize"])
    assert honoured_bits(out) == sectors_of(m["effective_extents"])
    assert plain_map(out) == plain_map(c.cow)
    assert ubdcow.info(out, backing=c.backing)["cow_bytes"] == spec.cow_bytes(out)
    assert_same(virtual_disk(out, c.backing), c.expected_bytes, f"{out.name}'s virtual disk")
    report = check(out, backing=c.backing)
    assert report.exit_code == 0, report.as_dict()


@pytest.mark.parametrize("name", CONVERT_CASES)
def test_convert_to_v3(unpack, name):
    c = unpack(name)
    source = stamp(c.cow)
    out = c.dir / "converted.cow"
    result = convert_cli(c, out)
    assert (result["layout"], result["source_layout"]) == ("v3", c.meta["layout"])
    assert result["sectors"] == len(sectors_of(c.meta["effective_extents"]))
    assert_converted(c, out, "v3")
    h = spec.read_header(out)
    assert (h.alignment, h.bitmap_offset) == (4096, 8192)  # what uml_mkcow and the kernel write
    assert stamp(c.cow) == source, "the source changed"
    assert leftovers(c.dir) == []


@pytest.mark.uml
def test_a_real_guest_reads_the_converted_files(unpack):
    """The four conversions to v3, attached to one guest as /dev/ubdb.. /dev/ubde."""
    cases = [unpack(name) for name in CONVERT_CASES]
    outs = []
    for c in cases:
        out = c.dir / "converted.cow"
        cli_ok("convert", c.cow, "-o", out)
        cli_ok("rebase", "--unsafe", out, "--backing", c.backing)  # record the unpacked backing's path
        assert spec.read_header(out).layout == "v3"
        outs.append(out)
    for c, dump in zip(cases, dump_devices(outs, cases[0].dir.parent), strict=True):
        assert len(dump) == device_bytes(c.meta["size"])
        assert_same(dump[: c.meta["size"]], c.expected_bytes, f"the guest's view of {c.name} converted to v3")


def test_convert_output_is_atomic_and_never_an_input(unpack):
    c = unpack("v2-bigendian")
    out = c.dir / "converted.cow"
    out.write_bytes(b"old content")
    before = snapshot(c.dir)
    proc = run_cli("convert", str(c.cow), "-o", str(out))
    assert_one_line_error(proc, str(out), "already exists")
    assert snapshot(c.dir) == before
    proc = run_cli("convert", str(c.cow), "-o", str(c.cow), "--overwrite")
    assert_one_line_error(proc, "output is the")
    assert snapshot(c.dir) == before
    with open(out, "rb") as reader:  # a reader of the old file keeps it whole: replaced by rename, not rewritten
        old_inode = os.fstat(reader.fileno()).st_ino
        cli_ok("convert", c.cow, "-o", out, "--overwrite")
        assert reader.read() == b"old content"
    assert out.stat().st_ino != old_inode
    assert_converted(c, out, "v3")
    assert leftovers(c.dir) == []


@pytest.mark.parametrize("layout", ["v1", "v2"])
def test_convert_v3_to_v1_v2_and_back(unpack, layout):
    c = unpack("v3-kernel-written")  # 1 MiB: the v1/v2 bitmap has a bit for every sector
    source = stamp(c.cow)
    old = c.dir / f"{layout}.cow"
    result = convert_cli(c, old, "--layout", layout)
    assert (result["layout"], result["source_layout"]) == (layout, "v3")
    assert_converted(c, old, layout)
    h = spec.read_header(old)
    assert h.bitmap_offset == h.header_size == {"v1": 280, "v2": 4120}[layout]
    back = c.dir / "back.cow"
    cli_ok("convert", old, "-o", back)
    assert_converted(c, back, "v3")
    assert stamp(c.cow) == source and leftovers(c.dir) == []


def test_convert_to_v1_writes_host_byte_order(unpack):
    """The kernel reads v1 fields in host byte order (only the version is byte-swapped)."""
    c = unpack("v3-kernel-written")
    out = c.dir / "v1.cow"
    cli_ok("convert", c.cow, "-o", out, "--layout", "v1")
    raw = out.read_bytes()
    order = sys.byteorder
    assert int.from_bytes(raw[0:4], order) == 0x4F4F4F4D
    assert int.from_bytes(raw[268:276], order) == c.meta["size"], "size is not in host byte order"
    assert int.from_bytes(raw[264:268], order) == c.meta["mtime"], "mtime is not in host byte order"


@pytest.mark.uml
@pytest.mark.parametrize("layout", ["v1", "v2"])
def test_a_real_guest_reads_v3_converted_to_v1_v2(unpack, layout):
    c = unpack("v3-kernel-written")
    out = c.dir / f"{layout}.cow"
    cli_ok("convert", c.cow, "-o", out, "--layout", layout)
    cli_ok("rebase", "--unsafe", out, "--backing", c.backing)  # only the COW on the command line: no switch
    assert spec.read_header(out).layout == layout
    dump = guest_dump(out, c.dir)
    assert_same(dump, c.expected_bytes, f"the guest's /dev/ubdb (v3 -> {layout})")
    assert spec.read_header(out).layout == layout


@pytest.mark.parametrize("layout", ["v1", "v3"])
def test_convert_keeps_holes_under_set_bits(unpack, layout):
    """Discarded sectors (set bits over holes in the data area) stay holes: zeros, not backing, not data."""
    c = unpack("v3-discard")
    h = spec.read_header(c.cow)
    raw = c.cow.read_bytes()
    backing = c.backing.read_bytes()
    # gzip lost the holes the guest's discards punched: punch whole zero pages of set sectors again
    pages = [
        p for p in range(0, h.sectors, 8)
        if all(s in sectors_of(c.meta["effective_extents"]) for s in range(p, p + 8))
        and not raw[h.data_offset + SECTOR * p : h.data_offset + SECTOR * (p + 8)].strip(b"\0")
        and backing[SECTOR * p : SECTOR * (p + 8)].strip(b"\0")  # falling through to the backing would show
    ]
    assert len(pages) >= 8
    fd = os.open(c.cow, os.O_RDWR)
    try:
        for p in pages:
            assert punch_hole(fd, h.data_offset + SECTOR * p, 8 * SECTOR)
    finally:
        os.close(fd)
    zero_before = [e for e in plain_map(c.cow) if e[2] == "zero"]
    assert zero_before
    out = c.dir / f"{layout}.cow"
    convert_cli(c, out, "--layout", layout)
    assert_converted(c, out, layout)  # includes: the map, with its zero extents, is the same
    # every filesystem block of the new file that lies wholly inside a punched range is a hole there too
    oh = spec.read_header(out)
    block = os.statvfs(out).f_frsize
    runs: list[list[int]] = []  # punched sector runs
    for p in pages:
        if runs and runs[-1][1] == p:
            runs[-1][1] = p + 8
        else:
            runs.append([p, p + 8])
    should_be_holes = {
        b
        for first, end in runs
        for b in range(-(-(oh.data_offset + SECTOR * first) // block), (oh.data_offset + SECTOR * end) // block)
    }
    assert len(should_be_holes) >= 4, "too few whole blocks to check"
    have = data_blocks(out, 0, oh.data_offset + h.size)
    assert not should_be_holes & have, f"blocks {sorted(should_be_holes & have)} were written as data"


def test_convert_refuses_written_sectors_v1_cannot_record(unpack):
    c = unpack("v3-odd-size")  # size 1,000,000: sector 1952 is written but has no bit in a v1 bitmap
    assert 1952 in honoured_bits(c.cow)
    before = snapshot(c.dir)
    out = c.dir / "v1.cow"
    proc = run_cli("convert", str(c.cow), "-o", str(out), "--layout", "v1")
    assert_one_line_error(proc, "rounding bug")
    assert not out.exists() and snapshot(c.dir) == before and leftovers(c.dir) == []


def test_convert_refuses_a_path_too_long_for_v1(tmp_path):
    deep = tmp_path.joinpath(*["d" * 60] * 4)
    deep.mkdir(parents=True)
    backing = deep / "backing.img"
    backing.write_bytes(random.Random(71).randbytes(64 * 1024))
    recorded = os.path.realpath(backing)
    assert len(os.fsencode(recorded)) > 255
    cow = tmp_path / "c.cow"
    ubdcow.create(cow, backing)
    with ubdcow.open(cow, "r+") as disk:
        disk.pwrite(b"written", 1000)
    before = snapshot(tmp_path)
    proc = run_cli("convert", str(cow), "-o", str(tmp_path / "v1.cow"), "--layout", "v1")
    assert_one_line_error(proc, "cannot convert to v1", f"{len(os.fsencode(recorded))} bytes", "255")
    assert not (tmp_path / "v1.cow").exists() and snapshot(tmp_path) == before and leftovers(tmp_path) == []
    cli_ok("convert", cow, "-o", tmp_path / "v2.cow", "--layout", "v2")  # a v2 header holds 4095 bytes
    assert spec.read_header(tmp_path / "v2.cow").backing_file == recorded
    assert_same(virtual_disk(tmp_path / "v2.cow"), virtual_disk(cow), "v2 content")



def test_safe_rebase_reports_the_sectors_it_wrote_not_only_those_that_differ(tmp_path):
    """Issue 21, item 4: one differing sector makes a whole 4 KiB page written; the report says 8, not 1."""
    assert run_cli("demo", "--keep", tmp_path).returncode == 0
    cow, old = tmp_path / "overlay.cow", tmp_path / "backing.img"
    new = tmp_path / "new.img"
    data = bytearray(old.read_bytes())
    data[3 * 4096 + 512 + 7] ^= 0xFF  # one sector of page 3, which the overlay does not hold
    new.write_bytes(data)
    assert not (honoured_bits(cow) & set(range(24, 32)))
    before = len(honoured_bits(cow))
    text = cli_ok("rebase", cow, "--backing", new)
    after = len(honoured_bits(cow))
    assert after - before == 8
    assert "; 8 sectors copied in to keep the content (the whole 4 KiB pages around 1 differing sector)" in text
