"""The engine: ``ubdcow.open`` / ``CowImage`` against the conformance corpus and real files.

Every expectation comes from the manifest, the guest's ``expected.img``, the
backing file's bytes, or the COW file's own bytes read back directly.
"""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from conftest import require, require_tool

import ubdcow
from ubdcow._io import punch_hole
from ubdcow.format import make_header, read_header

SECTOR = 512


# -- helpers -------------------------------------------------------------------


def sector_runs(extents) -> list[list[int]]:
    """``[first_sector, count]`` runs of the "cow" extents (byte extents rounded out to sectors)."""
    runs = []
    for start, length, source in extents:
        if source != "cow":
            continue
        first = start // SECTOR
        last = -(-(start + length) // SECTOR)
        if runs and runs[-1][0] + runs[-1][1] == first:
            runs[-1][1] += last - first
        else:
            runs.append([first, last - first])
    return runs


def bit_is_set(cow: Path, sector: int) -> bool:
    """Read bit ``sector`` straight from the COW file (LSB-first bytes)."""
    header = read_header(cow)
    with open(cow, "rb") as f:
        f.seek(header.bitmap_offset + sector // 8)
        return bool(f.read(1)[0] >> (sector % 8) & 1)


def raw_data(cow: Path, offset: int, length: int) -> bytes:
    """Bytes of the COW data area for virtual-disk bytes [offset, offset+length)."""
    header = read_header(cow)
    with open(cow, "rb") as f:
        f.seek(header.data_offset + offset)
        return f.read(length)


def make_disk(folder: Path, size: int, seed: int = 1) -> tuple[Path, Path, bytearray]:
    """A random (never all-zero) backing file of ``size`` bytes and a fresh COW file on it."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    content = bytearray(rng.randbytes(size))
    for i in range(0, size, SECTOR):  # no sector is all zeros, so zeros never pass for backing data
        content[i] = 0xA5
    backing = folder / "backing.img"
    backing.write_bytes(content)
    cow = folder / "disk.cow"
    header = ubdcow.create(cow, backing)
    # the raw checks below rely on this geometry: the spec's v3 formulas, alignment 4096
    sectors = (size + SECTOR - 1) // SECTOR
    bitmap_len = (sectors + 7) // 8
    assert (header.bitmap_offset, header.bitmap_len) == (8192, bitmap_len)
    assert header.data_offset == -(-(8192 + bitmap_len) // 4096) * 4096
    return cow, backing, content


def write_cow_file(path: Path, header) -> None:
    """A COW file with ``header``, an empty bitmap and a sparse data area (as uml_mkcow makes it)."""
    with open(path, "wb") as f:
        f.write(header.to_bytes())
        f.truncate(header.data_offset + header.size)


# -- the conformance corpus --------------------------------------------------------


def test_read_whole_disk(case) -> None:
    expected = case.expected_bytes
    assert len(expected) == case.meta["size"]
    with ubdcow.open(case.cow, backing=case.backing) as img:
        assert img.size == case.meta["size"]
        assert img.read() == expected
        assert img.tell() == len(expected)
        assert img.read() == b""
        img.seek(0)
        assert img.readall() == expected


def test_readinto_odd_chunks(case) -> None:
    expected = case.expected_bytes
    got = bytearray()
    with ubdcow.open(case.cow, backing=case.backing) as img:
        for chunk_size in (4093, 511, 513, 65537):
            img.seek(0)
            got.clear()
            buf = bytearray(chunk_size)
            while True:
                n = img.readinto(buf)
                if n == 0:
                    break
                got += buf[:n]
            assert got == expected, chunk_size
            assert img.tell() == len(expected)


def test_pread_random_offsets(case) -> None:
    expected = case.expected_bytes
    size = len(expected)
    rng = random.Random(case.name)
    with ubdcow.open(case.cow, backing=case.backing) as img:
        for _ in range(300):
            offset = rng.randrange(size + 600)
            length = rng.choice([1, 7, 511, 512, 513, 4096, 9000, rng.randrange(70000)])
            assert img.pread(length, offset) == expected[offset : offset + length], (offset, length)
            buf = bytearray(length)
            n = img.preadinto(buf, offset)
            assert buf[:n] == expected[offset : offset + length]
        assert img.tell() == 0  # positional reads leave the position alone


def test_extents_match_manifest(case) -> None:
    with ubdcow.open(case.cow, backing=case.backing) as img:
        extents = list(img.extents())
        assert sector_runs(extents) == case.meta["effective_extents"]
        assert img.count_cow_sectors() == sum(n for _, n in case.meta["effective_extents"])
    expected = case.expected_bytes
    backing = case.backing.read_bytes()
    with open(case.cow, "rb") as f:
        f.seek(case.meta["data_offset"])
        data_area = f.read(case.meta["size"])
    # the extents tile [0, size) without gaps, and the bytes of each come from where they say
    pos = 0
    for start, length, source in extents:
        assert start == pos and length > 0
        pos += length
        origin = data_area if source == "cow" else backing
        assert expected[start : start + length] == origin[start : start + length], (start, length, source)
    assert pos == case.meta["size"]
    with ubdcow.open(case.cow, backing=case.backing) as img:
        # mapping() refines cow runs (cow/zero) but covers the same bytes with the same backing runs
        mapped = [(e.start, e.length, "cow" if e.source == "zero" else e.source) for e in img.mapping()]
        merged: list[list] = []
        for start, length, source in mapped:
            if merged and merged[-1][2] == source and merged[-1][0] + merged[-1][1] == start:
                merged[-1][1] += length
            else:
                merged.append([start, length, source])
        assert [tuple(m) for m in merged] == extents


def test_discarded_runs_read_as_zeros_over_holes(unpack) -> None:
    case = unpack("v3-discard")
    expected = case.expected_bytes
    backing = case.backing.read_bytes()
    data_offset = case.meta["data_offset"]
    zero_runs = [
        (first, count)
        for first, count in case.meta["effective_extents"]
        if not any(expected[first * SECTOR : (first + count) * SECTOR])
    ]
    assert zero_runs, "the discard case has discarded (all-zero) runs"
    for first, count in zero_runs:  # the point: the backing has data there, the guest saw zeros
        assert any(backing[first * SECTOR : (first + count) * SECTOR])

    blocks_before = os.stat(case.cow).st_blocks
    fd = os.open(case.cow, os.O_RDWR)
    try:
        for first, count in zero_runs:
            assert punch_hole(fd, data_offset + first * SECTOR, count * SECTOR)
    finally:
        os.close(fd)
    assert os.stat(case.cow).st_blocks < blocks_before

    with ubdcow.open(case.cow, backing=case.backing) as img:
        assert img.read() == expected
        for first, count in zero_runs:
            start, length = first * SECTOR, count * SECTOR
            assert img.pread(length, start) == bytes(length)
            assert list(img.mapping(start, length)) == [ubdcow.Extent(start, length, "zero", data_offset + start)]
        # the written (non-zero) runs are still "cow", backed by data
        for first, count in case.meta["effective_extents"]:
            if (first, count) not in zero_runs:
                sources = {e.source for e in img.mapping(first * SECTOR, count * SECTOR)}
                assert sources == {"cow"}


def test_set_bits_over_punched_data_read_as_zeros(case) -> None:
    """Punch the whole data area of every set run: those sectors read zeros, never the backing."""
    runs = case.meta["effective_extents"]
    size = case.meta["size"]
    data_offset = case.meta["data_offset"]
    model = bytearray(case.expected_bytes)
    fd = os.open(case.cow, os.O_RDWR)
    try:
        if not runs:  # clear bits never look at the data area: punching all of it changes nothing
            assert punch_hole(fd, data_offset, size)
        for first, count in runs:
            assert punch_hole(fd, data_offset + first * SECTOR, count * SECTOR)
            model[first * SECTOR : (first + count) * SECTOR] = bytes(min(count * SECTOR, size - first * SECTOR))
    finally:
        os.close(fd)
    block = os.stat(case.cow).st_blksize
    with ubdcow.open(case.cow, backing=case.backing) as img:
        assert img.read() == model
        assert sector_runs(img.extents()) == runs  # punching the data area leaves the bitmap alone
        for first, count in runs:
            start, end = first * SECTOR, min(size, (first + count) * SECTOR)
            extents = list(img.mapping(start, end - start))
            assert {e.source for e in extents} <= {"zero", "cow"}
            # every whole file-system block of the run's data area is now a hole, hence "zero"
            lo = -(-(data_offset + start) // block) * block - data_offset
            hi = (data_offset + end) // block * block - data_offset
            for e in extents:
                overlap = min(hi, e.start + e.length) - max(lo, e.start)
                assert overlap <= 0 or e.source == "zero", (e, lo, hi)


# -- reads and writes at the edges -------------------------------------------------


@pytest.mark.parametrize("size", [65536, 50001])
def test_reads_past_end_are_short(tmp_path, size) -> None:
    cow, _, content = make_disk(tmp_path, size)
    with ubdcow.open(cow) as img:
        assert img.pread(100, size - 30) == content[-30:]
        assert img.pread(100, size) == b""
        assert img.pread(100, size + 5000) == b""
        assert img.preadinto(bytearray(10), size + 1) == 0
        img.seek(size - 3)
        assert img.read(10) == content[-3:]
        assert img.read(10) == b""
        img.seek(10, os.SEEK_END)
        assert img.tell() == size + 10
        assert img.read() == b""
        assert img.readinto(bytearray(8)) == 0


@pytest.mark.parametrize("size", [65536, 50001])
def test_write_past_end_refused_and_changes_nothing(tmp_path, size) -> None:
    cow, _, _ = make_disk(tmp_path, size)
    before = cow.read_bytes()
    with ubdcow.open(cow, "r+") as img:
        with pytest.raises(ubdcow.ImageRangeError):
            img.pwrite(b"x" * 20, size - 10)
        with pytest.raises(ubdcow.ImageRangeError):
            img.pwrite(b"x", size)
        with pytest.raises(ubdcow.ImageRangeError):
            img.write_zeroes(size - 100, 101)
        with pytest.raises(ubdcow.ImageRangeError):
            img.discard(0, size + 1)
        img.seek(size - 1)
        with pytest.raises(ubdcow.ImageRangeError):
            img.write(b"ab")
        assert img.tell() == size - 1
        assert img.pwrite(b"", size) == 0  # empty write at the end is fine
    assert cow.read_bytes() == before


def test_unaligned_write_fills_its_whole_page_from_backing(tmp_path) -> None:
    cow, backing, model = make_disk(tmp_path, 65536)
    data = bytes(range(256)) * 4  # 1024 bytes at 700: sectors 1..3, inside page 0
    with ubdcow.open(cow, "r+") as img:
        assert img.pwrite(data, 700) == len(data)
        model[700:1724] = data
        assert img.pread(65536, 0) == model
    # the whole page (sectors 0..7) is COW now, and no sector of the next page
    assert [bit_is_set(cow, s) for s in range(10)] == [True] * 8 + [False, False]
    # the COW data area holds the whole page: the untouched sectors were filled from the backing
    assert raw_data(cow, 0, 4096) == model[:4096]
    original = backing.read_bytes()
    assert raw_data(cow, 0, 700) == original[:700]
    assert raw_data(cow, 1724, 4096 - 1724) == original[1724:4096]
    with ubdcow.open(cow) as img:  # and it survives a reopen
        assert img.read() == model


def test_unaligned_write_fills_its_page_from_cow_and_backing(tmp_path) -> None:
    cow, _, model = make_disk(tmp_path, 65536)
    with ubdcow.open(cow, "r+") as img:
        img.pwrite(b"A" * 10, 1000)  # page 0 now lives in the COW file
        img.pwrite(b"B" * 10, 1020)  # must keep the A's, not refill from the backing
        img.pwrite(b"C" * 600, 4000)  # crosses from page 0 into page 1
        model[1000:1010] = b"A" * 10
        model[1020:1030] = b"B" * 10
        model[4000:4600] = b"C" * 600
        assert img.read() == model
    assert raw_data(cow, 0, 8192) == model[:8192]
    assert [bit_is_set(cow, s) for s in range(18)] == [True] * 16 + [False, False]


def test_write_partial_last_page_of_odd_disk(tmp_path) -> None:
    size = 50001  # 97 full sectors and 337 bytes: the last page is sectors 96 and 97
    cow, _, model = make_disk(tmp_path, size)
    last = size // SECTOR
    page = last // 8 * 8
    with ubdcow.open(cow, "r+") as img:
        img.pwrite(b"Z" * 5, size - 5)
        model[-5:] = b"Z" * 5
        assert img.pread(size, 0) == model
        assert [e for e in img.extents() if e[2] == "cow"] == [(page * SECTOR, size - page * SECTOR, "cow")]
    assert [bit_is_set(cow, s) for s in range(page - 1, last + 1)] == [False, True, True]
    assert raw_data(cow, page * SECTOR, size - page * SECTOR) == model[page * SECTOR :]


def test_write_zeroes_sets_bits_punches_holes_and_zeroes_edges(tmp_path) -> None:
    size = 1 << 20
    cow, _, model = make_disk(tmp_path, size)
    header = read_header(cow)
    with ubdcow.open(cow, "r+") as img:
        img.pwrite(b"\x77" * size, 0)  # everything in the COW file, all allocated
        model[:] = b"\x77" * size
    blocks_full = os.stat(cow).st_blocks

    start, length = 100, 300_000  # partial first and last sectors
    with ubdcow.open(cow, "r+") as img:
        img.write_zeroes(start, length)
        model[start : start + length] = bytes(length)
        assert img.read() == model
        sources = [e.source for e in img.mapping(0, 512)]
        assert sources == ["cow"]  # the partial head sector was written, not punched
    assert os.stat(cow).st_blocks < blocks_full - (250_000 // 512)
    # the whole sectors inside the range are a hole in the data area
    first_full = -(-start // SECTOR) * SECTOR
    fd = os.open(cow, os.O_RDONLY)
    try:
        hole = os.lseek(fd, header.data_offset + first_full, os.SEEK_HOLE)
        assert hole < header.data_offset + 8192  # within a block or so of the first whole sector
        data = os.lseek(fd, hole, os.SEEK_DATA)
        assert data >= header.data_offset + (start + length) // SECTOR * SECTOR - 4096
    finally:
        os.close(fd)
    # the edge sectors keep their non-zero bytes in the data area
    assert raw_data(cow, 0, SECTOR) == model[:SECTOR]
    tail = (start + length) // SECTOR * SECTOR
    assert raw_data(cow, tail, SECTOR) == model[tail : tail + SECTOR]


def page_runs(byte_ranges: list[tuple[int, int]], size: int) -> list[list[int]]:
    """``[first_sector, count]`` of the whole pages (8 sectors, the last one short) that byte ranges touch."""
    sectors = -(-size // SECTOR)
    runs: list[list[int]] = []
    for a, b in byte_ranges:
        first, last = a // 4096 * 8, min(-(-b // 4096) * 8, sectors)
        if runs and runs[-1][0] + runs[-1][1] >= first:
            runs[-1][1] = max(runs[-1][1], last - runs[-1][0])
        else:
            runs.append([first, last - first])
    return runs


@pytest.mark.parametrize("method", ["write_zeroes", "discard"])
@pytest.mark.parametrize("size", [65536, 50001])
def test_zeroing_over_backing_reads_zeros_not_backing(tmp_path, method, size) -> None:
    cow, backing, model = make_disk(tmp_path, size)
    with ubdcow.open(cow, "r+") as img:
        getattr(img, method)(1000, 20000)
        getattr(img, method)(size - 700, 700)  # through the (maybe partial) last sector
        model[1000:21000] = bytes(20000)
        model[size - 700 :] = bytes(700)
        assert img.read() == model
        cow_runs = sector_runs(img.extents())
        zero = [e for e in img.mapping() if e.source == "zero"]
    # whole pages: the partial pages at either end became COW with their other bytes kept
    assert cow_runs == page_runs([(1000, 21000), (size - 700, size)], size)
    assert any(e.length >= 4096 for e in zero)  # whole blocks of the data area are holes
    with ubdcow.open(cow) as img:
        assert img.read() == model
    original = backing.read_bytes()  # the zeros did not come from the backing
    assert all(original[a:b].strip(b"\0") for a, b in ((1000, 21000), (size - 700, size)))
    assert raw_data(cow, 0, 1000) == original[:1000]  # the rest of the first page was filled from the backing


def test_write_zeroes_inside_one_sector(tmp_path) -> None:
    cow, backing, model = make_disk(tmp_path, 65536)
    with ubdcow.open(cow, "r+") as img:
        img.write_zeroes(5000, 10)
        model[5000:5010] = bytes(10)
        assert img.read() == model
        assert sector_runs(img.extents()) == [[8, 8]]  # its page, sectors 8..15
    assert raw_data(cow, 4096, 4096) == model[4096:8192]
    assert raw_data(cow, 4096, 904) == backing.read_bytes()[4096:5000]


# -- the read path: whole-page bitmap bytes, mixed pages, threads, the map of sources -----------


def _raw_cow(folder: Path, size: int, seed: int, mixed: float, cut: int | None = None) -> tuple[Path, Path, bytes]:
    """A COW file whose bitmap bytes and data area are written directly (random pages 0x00, 0xFF or, with
    probability ``mixed``, mixed), its data area cut ``cut`` bytes short; returns it, its backing and the
    disk's bytes as the kernel reads them (set bits past the end of the file read as zeros)."""
    cow, backing, content = make_disk(folder, size, seed)
    header = read_header(cow)
    rng = random.Random(seed)
    sectors = -(-size // SECTOR)
    bits = bytearray(header.bitmap_len)
    for page in range(len(bits)):
        roll = rng.random()
        if roll < mixed:
            bits[page] = rng.randrange(1, 255)
        elif roll < mixed + 0.35:
            bits[page] = 0xFF
        # runs of several pages, not only isolated ones
        if page and rng.random() < 0.5:
            bits[page] = bits[page - 1]
    if sectors % 8:  # bits past the last sector are never set
        bits[-1] &= (1 << (sectors % 8)) - 1
    data = rng.randbytes(sectors * SECTOR)
    length = header.data_offset + len(data) - (cut or 0)
    with open(cow, "r+b") as f:
        f.seek(header.bitmap_offset)
        f.write(bits)
        f.seek(header.data_offset)
        f.write(data)
        f.truncate(length)
    disk = bytearray(content)
    for s in range(sectors):
        if bits[s // 8] >> (s % 8) & 1:
            got = data[s * SECTOR : (s + 1) * SECTOR][: max(0, length - header.data_offset - s * SECTOR)]
            disk[s * SECTOR : (s + 1) * SECTOR] = got.ljust(SECTOR, b"\0")[: size - s * SECTOR]
    return cow, backing, bytes(disk[:size])


@pytest.mark.parametrize(("mixed", "cut"), [(0.0, None), (0.15, None), (0.0, 300_000), (0.05, 12_345)])
def test_reads_of_any_shape_match_the_bits(tmp_path, mixed, cut) -> None:
    """Reads planned from whole-page bitmap bytes, and the sector path for mixed pages, agree with the bits."""
    size = (3 << 20) + 5000  # the last page is short
    cow, backing, disk = _raw_cow(tmp_path, size, seed=int(mixed * 100) + (cut or 0), mixed=mixed, cut=cut)
    rng = random.Random(7)
    with ubdcow.open(cow, backing=backing) as img:
        assert img.read() == disk
        for _ in range(400):
            length = rng.choice([1, 511, 4096, 8192, 65536, 65537, 262144, 1 << 20, rng.randrange(1, 3 << 20)])
            offset = rng.choice([rng.randrange(size), rng.randrange(size // 4096) * 4096, size - length])
            offset = max(0, offset)
            assert img.pread(length, offset) == disk[offset : offset + length]
            buf = bytearray(length)
            n = img.preadinto(buf, offset)
            assert buf[:n] == disk[offset : offset + length]


def _sector_stamp(index: int, sector: int) -> bytes:
    """Sector ``sector`` as write ``index`` writes it: no two writes or sectors alike, never all zeros."""
    return (index.to_bytes(4, "little") + b"WRIT" + sector.to_bytes(8, "little")).ljust(SECTOR, bytes([index % 251]))


def test_concurrent_readers_and_a_writer_see_whole_writes(tmp_path) -> None:
    """Three threads read while one writes, zeroes and flushes: every read is exactly the disk after some
    write (reads share the lock, writes hold it alone), and the final disk is every write in order."""
    size = 4 << 20
    sectors = size // SECTOR
    cow, backing, content = make_disk(tmp_path, size, seed=11)
    rng = random.Random(3)
    writes: list[tuple[int, int, bool]] = []  # (first sector, count, zeroes), in the order they are done
    for _ in range(300):
        count = rng.choice([1, 3, 8, 16, 64, 200])
        writes.append((rng.randrange(sectors - count), count, rng.random() < 0.15))

    def state(upto: int, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) of the disk after writes [0, upto)."""
        disk = bytearray(content[offset : offset + length])
        for index in range(upto):
            first, count, zeroes = writes[index]
            for s in range(max(first, offset // SECTOR), min(first + count, (offset + length) // SECTOR)):
                at = s * SECTOR - offset
                disk[at : at + SECTOR] = bytes(SECTOR) if zeroes else _sector_stamp(index, s)
        return bytes(disk)

    progress = {"done": 0, "stop": False}  # writes finished (updated after each write returns)
    failures: list[str] = []
    reads = [0]

    def reader(seed: int) -> None:
        r = random.Random(seed)
        while not progress["stop"] and not failures:
            length = r.choice([SECTOR, 4096, 65536, 262144, 1 << 20])
            offset = r.randrange(0, size - length + 1, SECTOR)
            low = progress["done"]
            if r.random() < 0.5:
                data = img.pread(length, offset)
            else:
                buf = bytearray(length)
                assert img.preadinto(memoryview(buf), offset) == length
                data = bytes(buf)
            high = min(progress["done"] + 1, len(writes))  # + 1: a write may end before "done" counts it
            if not any(state(k, offset, length) == data for k in range(low, high + 1)):
                failures.append(f"read of {length} at {offset} is not the disk after any of writes {low}..{high}")
            reads[0] += 1

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, so that reads and writes interleave
    try:
        with ubdcow.open(cow, "r+", backing=backing) as img:
            threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(3)]
            for t in threads:
                t.start()
            for index, (first, count, zeroes) in enumerate(writes):
                if zeroes:
                    img.write_zeroes(first * SECTOR, count * SECTOR)
                else:
                    img.pwrite(b"".join(_sector_stamp(index, s) for s in range(first, first + count)), first * SECTOR)
                progress["done"] = index + 1
                if index % 50 == 0:
                    img.flush()
            progress["stop"] = True
            for t in threads:
                t.join()
            assert not failures, failures[:3]
            assert reads[0] > 30  # the readers did run alongside the writes
            assert img.read() == state(len(writes), 0, size)
    finally:
        sys.setswitchinterval(old_interval)
    with ubdcow.open(cow, backing=backing) as img:  # the file holds it too, in whole pages
        assert img.read() == state(len(writes), 0, size)
    report = ubdcow.check(cow, backing=backing)
    assert report.mixed_pages == 0


def _coalesced(pieces) -> list[tuple[int, int, int]]:
    out: list[tuple[int, int, int]] = []
    for a, b, kind in pieces:
        if out and out[-1][2] == kind and out[-1][1] == a:
            out[-1] = (out[-1][0], b, kind)
        else:
            out.append((a, b, kind))
    return out


def _model_sources(cow: Path, backing: Path, data_offset: int, size: int):  # type: ignore[no-untyped-def]
    """source_runs' codes byte by byte, by the spec model: the sector's bit, then the holes (SEEK_DATA, past
    the end of a file included) of the file the byte comes from."""
    import numpy as np
    import test_oracle_model as spec

    is_set = np.repeat(np.array(spec.decode(cow.read_bytes(), b"")[1], dtype=bool), 512)[:size]
    holes = {}
    for name, path, base in (("cow", cow, data_offset), ("backing", backing, 0)):
        holes[name] = np.zeros(size, dtype=bool)
        for a, b in spec.hole_ranges(path, base, base + size):
            holes[name][a - base : b - base] = True
    return np.where(is_set, np.where(holes["cow"], 2, 1), np.where(holes["backing"], 2, 0))


def _runs_of(codes, start: int, end: int) -> list[tuple[int, int, int]]:  # type: ignore[no-untyped-def]
    """Maximal runs ``(a, b, code)`` of ``codes[start:end]``, in disk offsets."""
    import numpy as np

    part = codes[start:end]
    edges = np.flatnonzero(part[1:] != part[:-1]) + 1
    firsts = np.concatenate(([0], edges))
    ends = np.concatenate((edges, [part.size]))
    return list(zip((firsts + start).tolist(), (ends + start).tolist(), part[firsts].tolist(), strict=True))


@pytest.mark.parametrize("fiemap", [True, False])
@pytest.mark.parametrize("short_backing", [False, True])
def test_source_runs_match_mapping_and_the_backings_holes(tmp_path, monkeypatch, fiemap, short_backing) -> None:
    """source_runs (FIEMAP confirms data, SEEK_DATA answers the rest) says what mapping and SEEK_DATA say,
    and what the spec model says: zeros for set bits over holes in the data area or past its end, and for
    clear bits over holes in the backing file or past its end."""
    from ubdcow import _io
    from ubdcow._io import Segments

    if not fiemap:  # the filesystem cannot tell: everything from SEEK_DATA/SEEK_HOLE
        monkeypatch.setattr(_io, "written_extents", lambda fd, start, end: None)
    size = (6 << 20) + 3000
    cow, backing, _ = make_disk(tmp_path, size, seed=5)
    rng = random.Random(9)
    fd = os.open(backing, os.O_RDWR)
    try:
        for _ in range(12):  # holes in the backing file
            start = rng.randrange(size // 65536) * 65536
            assert punch_hole(fd, start, 65536 * rng.randrange(1, 4))
        if short_backing:
            os.ftruncate(fd, size - 700_000)
    finally:
        os.close(fd)
    with ubdcow.open(cow, "r+", backing=backing, check_backing=False) as img:
        for _ in range(60):
            length = rng.choice([512, 4096, 20000, 300_000])
            offset = rng.randrange(size - length)
            if rng.random() < 0.3:
                img.write_zeroes(offset, length)  # set bits over holes punched in the data area
            else:
                img.pwrite(rng.randbytes(length), offset)
    header = read_header(cow)
    os.truncate(cow, header.data_offset + size - 400_000)  # set bits past the end of the COW file
    model = _model_sources(cow, backing, header.data_offset, size)  # the spec's answer, byte by byte
    with ubdcow.open(cow, backing=backing, check_backing=False) as img:
        for offset, length in [(0, size), (0, 4096), (size - 5000, 5000)] + [
            (rng.randrange(size), rng.randrange(1, 2 << 20)) for _ in range(40)
        ]:
            starts, ends, sources = img.source_runs(offset, length)
            got = _coalesced(zip(starts.tolist(), ends.tolist(), sources.tolist(), strict=True))
            backing_segments = Segments(img.fds[1])
            want = []
            for e in img.mapping(offset, length):
                if e.source == "backing":
                    want += [(a, b, 0 if data else 2) for a, b, data in backing_segments(e.start, e.start + e.length)]
                else:
                    want.append((e.start, e.start + e.length, 1 if e.source == "cow" else 2))
            assert got == _coalesced(want)
            assert got == _runs_of(model, offset, min(size, offset + length))
        whole = _coalesced(zip(*[a.tolist() for a in img.source_runs()], strict=True))
        assert {k for _, _, k in whole} == {0, 1, 2}  # all three sources occur


# -- v1 rounding bug, sector size, modes -------------------------------------------


def test_v1_rounding_tail_refuses_unrecordable_writes(unpack) -> None:
    case = unpack("v1-rounding-tail")
    expected = case.expected_bytes
    backing = case.backing.read_bytes()
    before = case.cow.read_bytes()
    assert case.meta["bitmap_len"] * 8 == 1952
    with ubdcow.open(case.cow, "r+", backing=case.backing) as img:
        for offset, length in [
            (1952 * SECTOR, SECTOR),
            (1953 * SECTOR, 64),
            (1951 * SECTOR, 1024),
            (1952 * SECTOR + 100, 1),
            (1953 * SECTOR + 63, 1),
        ]:
            with pytest.raises(ubdcow.UnrecordableWriteError):
                img.pwrite(b"q" * length, offset)
            with pytest.raises(ubdcow.UnrecordableWriteError):
                img.write_zeroes(offset, length)
        tail = img.pread(2 * SECTOR, 1952 * SECTOR)
        assert tail == backing[1952 * SECTOR :] == expected[1952 * SECTOR :]
    assert case.cow.read_bytes() == before


def test_v1_rounding_tail_last_honoured_sector_is_writable(unpack) -> None:
    case = unpack("v1-rounding-tail")
    model = bytearray(case.expected_bytes)
    with ubdcow.open(case.cow, "r+", backing=case.backing) as img:
        img.pwrite(b"w" * SECTOR, 1951 * SECTOR)
        model[1951 * SECTOR : 1952 * SECTOR] = b"w" * SECTOR
        assert img.read() == model
    with ubdcow.open(case.cow, backing=case.backing) as img:
        assert img.read() == model


@pytest.mark.parametrize("mode", ["r", "r+"])
def test_sectorsize_4096_is_refused(tmp_path, mode) -> None:
    _, backing, _ = make_disk(tmp_path, 65536)
    st = os.stat(backing)
    header = make_header("v3", str(backing), int(st.st_mtime), st.st_size, sectorsize=4096)
    cow = tmp_path / "big-sectors.cow"
    write_cow_file(cow, header)
    with pytest.raises(ubdcow.UnsupportedSectorSizeError, match="4096"):
        ubdcow.open(cow, mode)


def test_read_only_mode_refuses_writes(tmp_path) -> None:
    cow, _, content = make_disk(tmp_path, 65536)
    before = cow.read_bytes()
    with ubdcow.open(cow) as img:
        assert img.readable() and not img.writable()
        for call in (
            lambda: img.write(b"x"),
            lambda: img.pwrite(b"x", 0),
            lambda: img.write_zeroes(0, 512),
            lambda: img.discard(0, 4096),
        ):
            with pytest.raises(io.UnsupportedOperation):
                call()
        assert img.read() == content
    assert cow.read_bytes() == before


# -- the backing file: finding it, checking it -------------------------------------


def _relative_cow(tmp_path: Path) -> tuple[Path, Path, Path, int]:
    """COW file in ``cowdir`` recording the relative path "backing.img"; two candidate backings, different data."""
    cowdir, cwd = tmp_path / "cowdir", tmp_path / "cwd"
    cowdir.mkdir()
    cwd.mkdir()
    size, mtime = 8192, 1_600_000_000
    for folder, byte in ((cowdir, b"B"), (cwd, b"C")):
        (folder / "backing.img").write_bytes(byte * size)
        os.utime(folder / "backing.img", (mtime, mtime))
    cow = cowdir / "rel.cow"
    write_cow_file(cow, make_header("v3", "backing.img", mtime, size))
    return cow, cowdir, cwd, size


def test_relative_backing_found_from_cwd_first(tmp_path, monkeypatch) -> None:
    cow, _, cwd, size = _relative_cow(tmp_path)
    monkeypatch.chdir(cwd)
    with ubdcow.open(cow) as img:
        assert os.path.realpath(img.backing_name) == os.path.realpath(cwd / "backing.img")
        assert img.read() == b"C" * size


def test_relative_backing_then_beside_the_cow(tmp_path, monkeypatch) -> None:
    cow, cowdir, cwd, size = _relative_cow(tmp_path)
    (cwd / "backing.img").unlink()
    monkeypatch.chdir(cwd)
    with ubdcow.open(cow) as img:
        assert os.path.realpath(img.backing_name) == os.path.realpath(cowdir / "backing.img")
        assert img.read() == b"B" * size


def test_relative_backing_missing_names_recorded_path_and_tries(tmp_path, monkeypatch) -> None:
    cow, cowdir, cwd, _ = _relative_cow(tmp_path)
    (cwd / "backing.img").unlink()
    (cowdir / "backing.img").unlink()
    monkeypatch.chdir(cwd)
    with pytest.raises(ubdcow.BackingFileError) as info:
        ubdcow.open(cow)
    message = str(info.value)
    assert "backing.img" in message
    assert str(cwd / "backing.img") in message
    assert str(cowdir / "backing.img") in message
    assert not isinstance(info.value, ubdcow.BackingMismatchError)


def test_absolute_backing_missing_names_recorded_path(case) -> None:
    with pytest.raises(ubdcow.BackingFileError) as info:
        ubdcow.open(case.cow)  # the recorded /srv/... path does not exist here
    assert case.meta["backing_file_in_header"] in str(info.value)
    assert str(case.cow) in str(info.value)


def test_mtime_mismatch(unpack) -> None:
    case = unpack("v3-kernel-written")
    recorded = case.meta["mtime"]
    actual = recorded + 12345
    os.utime(case.backing, (actual, actual))
    with pytest.raises(ubdcow.BackingMismatchError) as info:
        ubdcow.open(case.cow, backing=case.backing)
    assert f"mtime mismatch ({recorded} vs {actual}) of COW header vs backing file" in str(info.value)
    with pytest.raises(ubdcow.BackingMismatchError):
        ubdcow.open(case.cow, "r+", backing=case.backing)
    with ubdcow.open(case.cow, backing=case.backing, check_backing=False) as img:
        assert img.read() == case.expected_bytes
    # only whole seconds count, as in the kernel
    ns = recorded * 1_000_000_000 + 500_000_000
    os.utime(case.backing, ns=(ns, ns))
    with ubdcow.open(case.cow, backing=case.backing) as img:
        assert img.read() == case.expected_bytes


def test_mtime_check_truncates_to_whole_seconds(unpack) -> None:
    case = unpack("v3-kernel-written")
    ns = case.meta["mtime"] * 1_000_000_000 + 999_999_999
    os.utime(case.backing, ns=(ns, ns))
    assert os.stat(case.backing).st_mtime_ns // 1_000_000_000 == case.meta["mtime"]  # what the kernel sees
    with ubdcow.open(case.cow, backing=case.backing) as img:
        assert img.read() == case.expected_bytes


def test_size_mismatch(unpack) -> None:
    case = unpack("v3-odd-size")
    recorded = case.meta["size"]
    with open(case.backing, "ab") as f:
        f.write(b"extra")
    os.utime(case.backing, (case.meta["mtime"], case.meta["mtime"]))
    with pytest.raises(ubdcow.BackingMismatchError) as info:
        ubdcow.open(case.cow, backing=case.backing)
    assert f"Size mismatch ({recorded} vs {recorded + 5}) of COW header vs backing file" in str(info.value)
    with ubdcow.open(case.cow, backing=case.backing, check_backing=False) as img:
        assert img.size == recorded
        assert img.read() == case.expected_bytes


def test_mismatch_error_leaves_no_lock_behind(unpack) -> None:
    case = unpack("v3-kernel-written")
    os.utime(case.backing, (1, 1))
    with pytest.raises(ubdcow.BackingMismatchError):
        ubdcow.open(case.cow, "r+", backing=case.backing)
    os.utime(case.backing, (case.meta["mtime"], case.meta["mtime"]))
    with ubdcow.open(case.cow, "r+", backing=case.backing) as img:
        img.pwrite(b"after", 4096)
    with ubdcow.open(case.cow, backing=case.backing) as img:
        assert img.pread(5, 4096) == b"after"


# -- locking across processes ------------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import sys
    import ubdcow
    img = ubdcow.open(sys.argv[1], sys.argv[2])
    print("ready", flush=True)
    sys.stdin.read()
    img.close()
    """
)

POSIX_HOLDER = textwrap.dedent(
    """
    import fcntl, os, sys
    fd = os.open(sys.argv[1], os.O_RDWR)
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a POSIX record lock, like the ubd driver's
    print("ready", flush=True)
    sys.stdin.read()
    """
)


class Holder:
    """A child process holding a COW file open until the test ends."""

    def __init__(self, script: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.proc.kill()
            raise AssertionError(f"holder failed: {line!r} {self.proc.stderr.read()}")
        self.pid = self.proc.pid

    def release(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


@pytest.fixture
def holder():
    started = []

    def _start(script: str, *args: str) -> Holder:
        h = Holder(script, *map(str, args))
        started.append(h)
        return h

    yield _start
    for h in started:
        h.release()


def test_second_writer_is_refused(tmp_path, holder) -> None:
    cow, _, _ = make_disk(tmp_path, 65536)
    holder(HOLDER, cow, "r+")
    with pytest.raises(ubdcow.ImageLockedError) as info:
        ubdcow.open(cow, "r+")
    assert str(cow) in str(info.value)


def test_second_writer_error_names_holder_pid(tmp_path, holder) -> None:
    cow, _, _ = make_disk(tmp_path, 65536)
    h = holder(HOLDER, cow, "r+")
    with pytest.raises(ubdcow.ImageLockedError) as info:
        ubdcow.open(cow, "r+")
    assert info.value.pid == h.pid
    assert str(h.pid) in str(info.value)


def test_posix_lock_holder_is_named(tmp_path, holder) -> None:
    """A running guest holds a POSIX write lock: the error names its pid."""
    cow, _, _ = make_disk(tmp_path, 65536)
    h = holder(POSIX_HOLDER, cow)
    for mode in ("r+", "r"):
        with pytest.raises(ubdcow.ImageLockedError) as info:
            ubdcow.open(cow, mode)
        assert info.value.pid == h.pid
        assert f"process {h.pid}" in str(info.value)


def test_reader_refused_while_writer_holds(tmp_path, holder) -> None:
    cow, _, _ = make_disk(tmp_path, 65536)
    holder(HOLDER, cow, "r+")
    with pytest.raises(ubdcow.ImageLockedError):
        ubdcow.open(cow, "r")


def test_writer_refused_while_reader_holds(tmp_path, holder) -> None:
    cow, _, _ = make_disk(tmp_path, 65536)
    holder(HOLDER, cow, "r")
    with pytest.raises(ubdcow.ImageLockedError):
        ubdcow.open(cow, "r+")


def test_two_readers_share(tmp_path, holder) -> None:
    cow, _, content = make_disk(tmp_path, 65536)
    holder(HOLDER, cow, "r")
    with ubdcow.open(cow, "r") as img:
        assert img.read() == content


def test_lock_false_bypasses(tmp_path, holder) -> None:
    cow, _, content = make_disk(tmp_path, 65536)
    holder(HOLDER, cow, "r+")
    with ubdcow.open(cow, "r", lock=False) as img:
        assert img.read() == content
    with ubdcow.open(cow, "r+", lock=False) as img:
        img.pwrite(b"ok", 0)
    content[0:2] = b"ok"
    with ubdcow.open(cow, "r", lock=False) as img:
        assert img.read() == content


def test_lock_released_when_holder_exits(tmp_path, holder) -> None:
    cow, _, _ = make_disk(tmp_path, 65536)
    h = holder(HOLDER, cow, "r+")
    with pytest.raises(ubdcow.ImageLockedError):
        ubdcow.open(cow, "r+")
    h.release()
    with ubdcow.open(cow, "r+") as img:
        img.pwrite(b"after", 4096)
    with ubdcow.open(cow) as img:
        assert img.pread(5, 4096) == b"after"


def test_writer_takes_read_lock_on_backing(tmp_path) -> None:
    """Like the kernel: a writer read-locks the backing file, so nobody can write-lock it."""
    cow, backing, _ = make_disk(tmp_path, 65536)
    with ubdcow.open(cow, "r+"):
        probe = subprocess.run(
            [
                sys.executable,
                "-c",
                textwrap.dedent(
                    """
                import fcntl, os, sys
                fd = os.open(sys.argv[1], os.O_RDWR)
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    print("locked")
                else:
                    print("free")
                """
                ),
                str(backing),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert probe.stdout.strip() == "locked", probe.stderr


# -- the backing file is never written ------------------------------------------------


def _write_session(cow: Path, size: int) -> bytearray:
    rng = random.Random(7)
    with ubdcow.open(cow, "r+") as img:
        for _ in range(200):
            offset = rng.randrange(size)
            length = rng.randrange(1, min(20000, size - offset) + 1)
            op = rng.random()
            if op < 0.7:
                img.pwrite(rng.randbytes(length), offset)
            elif op < 0.85:
                img.write_zeroes(offset, length)
            else:
                img.discard(offset, length)
        img.flush()
        return bytearray(img.read())


def _assert_backing_untouched(backing: Path, content: bytes, st: os.stat_result) -> None:
    after = os.stat(backing)
    assert backing.read_bytes() == content
    assert (after.st_mtime_ns, after.st_ctime_ns, after.st_size, after.st_ino) == (
        st.st_mtime_ns,
        st.st_ctime_ns,
        st.st_size,
        st.st_ino,
    )


def test_backing_never_written(tmp_path) -> None:
    size = 300_001
    cow, backing, content = make_disk(tmp_path, size)
    st = os.stat(backing)
    disk = _write_session(cow, size)
    assert disk != content  # the session did change the virtual disk
    _assert_backing_untouched(backing, bytes(content), st)


def test_write_session_with_read_only_backing(tmp_path) -> None:
    size = 300_001
    cow, backing, content = make_disk(tmp_path, size)
    os.chmod(backing, 0o444)
    st = os.stat(backing)
    disk = _write_session(cow, size)
    assert disk != content
    _assert_backing_untouched(backing, bytes(content), st)
    assert os.stat(backing).st_mode & 0o777 == 0o444


def test_write_session_with_immutable_backing(tmp_path) -> None:
    """Even root cannot open an immutable file for writing: this proves O_RDONLY."""
    chattr = require_tool("chattr", "e2fsprogs")
    size = 300_001
    cow, backing, content = make_disk(tmp_path, size)
    proc = subprocess.run([chattr, "+i", str(backing)], capture_output=True, text=True)
    require(proc.returncode == 0, f"chattr +i does not work here (needs root): {proc.stderr.strip()}")
    try:
        with pytest.raises(PermissionError):  # the immutable flag is really in force
            os.open(backing, os.O_WRONLY)
        st = os.stat(backing)
        disk = _write_session(cow, size)
        assert disk != content
        _assert_backing_untouched(backing, bytes(content), st)
    finally:
        subprocess.run([chattr, "-i", str(backing)], check=False)
