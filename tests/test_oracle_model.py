"""An independent model of the UML COW format, and its own check against the real kernel.

The model is written from the spec (/work/shared/spec/uml-cow-format.md: byte
offsets, formulas, bit order) with ``struct`` and plain byte and bit logic. It
imports nothing from ubdcow, so a bug in ubdcow's header code, bitmap or reader
cannot hide in a test that judges ubdcow by it. Other test files use it as their
oracle (``from test_oracle_model import ...``); the tests in this file check the
model itself against the bytes a real Linux guest read (tests/data,
``expected.img``) and against files made by the real ``uml_mkcow``.

What it models:

* the four header layouts at the spec's offsets: v1 (fields in the byte order of
  its magic, as ubdcow reads them: host order, as the kernel writes and reads
  them, for every file a kernel on this host made), v2, v3 and the "broken" v3
  (told apart by four zero bytes at offset 32);
* the kernel's geometry, the v1/v2 rounding bug included: a sector whose bit index
  is >= 8 * bitmap_len has no bit and reads from the backing file (so does ubdcow;
  the kernel now and then reads it from the data area instead, as it tests a bit
  in memory past the bitmap it loaded: see tests/test_oracle_guest.py);
* bit *i* is ``1 << (i % 8)`` of bitmap byte ``i // 8``; a set bit means bytes
  [512 i, 512 i + 512) are at ``data_offset + 512 i`` (a hole there reads zeros);
* the virtual disk is exactly ``size`` bytes (a partial last sector is cut).
"""

from __future__ import annotations

import gzip
import os
import random
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import DATA, MANIFEST, require_tool

SECTOR = 512
PAGE = 4096
MAGIC = 0x4F4F4F4D
HOST = sys.byteorder
#: (header size, path field offset, path field width) per layout
LAYOUT = {"v1": (280, 8, 256), "v2": (4120, 8, 4096), "v3": (4128, 32, 4096), "v3-broken": (4136, 36, 4096)}


class SpecError(ValueError):
    """The bytes are not a COW header the spec allows (the reason is the message)."""


def round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True)
class SpecHeader:
    """A header as the spec describes it, with the geometry the kernel derives."""

    layout: str
    byteorder: str
    backing: bytes
    mtime: int
    size: int
    sectorsize: int
    alignment: int
    cow_format: int

    @property
    def backing_file(self) -> str:
        return os.fsdecode(self.backing)

    @property
    def version(self) -> int:
        return {"v1": 1, "v2": 2}.get(self.layout, 3)

    @property
    def header_size(self) -> int:
        return LAYOUT[self.layout][0]

    @property
    def bitmap_offset(self) -> int:
        if self.layout in ("v1", "v2"):
            return self.header_size
        return round_up(self.header_size, self.alignment)

    @property
    def bitmap_len(self) -> int:
        if self.layout in ("v1", "v2"):
            return (self.size + self.sectorsize - 1) // (8 * self.sectorsize)  # the historical rounding bug
        sectors = -(-self.size // self.sectorsize)
        return -(-sectors // 8)

    @property
    def data_offset(self) -> int:
        align = self.sectorsize if self.layout in ("v1", "v2") else self.alignment
        return round_up(self.bitmap_offset + self.bitmap_len, align)

    @property
    def sectors(self) -> int:
        """512-byte sectors of the device the kernel exposes: ceil(size / 512)."""
        return -(-self.size // SECTOR)

    @property
    def honoured(self) -> int:
        """Sectors that have a bit in the bitmap: the rest read from the backing file."""
        return min(self.sectors, 8 * self.bitmap_len)


def parse(data: bytes) -> SpecHeader:
    """Parse a header from a file's first bytes, at the spec's offsets; raise :class:`SpecError` if invalid."""
    if data[:4] == MAGIC.to_bytes(4, "big"):
        order = "big"
    elif data[:4] == MAGIC.to_bytes(4, "little"):
        order = "little"
    else:
        raise SpecError("bad magic")
    if len(data) < 8:
        raise SpecError("truncated")
    version = int.from_bytes(data[4:8], order)
    if version == 1:
        layout = "v1"
    elif version == 2:
        layout = "v2"
    elif version == 3:
        if len(data) < 36:
            raise SpecError("truncated")
        layout = "v3-broken" if data[32:36] == bytes(4) else "v3"
    else:
        raise SpecError(f"version {version}")
    hsize, path_at, width = LAYOUT[layout]
    if len(data) < hsize:
        raise SpecError("truncated")
    alignment = cow_format = 0
    if layout == "v1":
        e = "<" if order == "little" else ">"
        mtime, size, sectorsize = struct.unpack_from(e + "IQi", data, 264)
    elif layout == "v2":
        mtime, size, sectorsize = struct.unpack_from(">IQi", data, 4104)
    elif layout == "v3":
        mtime, size, sectorsize, alignment, cow_format = struct.unpack_from(">IQIII", data, 8)
    else:
        (mtime,) = struct.unpack_from(">I", data, 8)
        size, sectorsize, alignment, cow_format = struct.unpack_from(">QIII", data, 16)
    field = data[path_at : path_at + width]
    if b"\0" not in field:
        raise SpecError("no NUL in the path field")
    if layout in ("v1", "v2"):
        alignment = sectorsize
    if not (is_pow2(sectorsize) and 512 <= sectorsize <= 65536):
        raise SpecError(f"sector size {sectorsize}")
    if not is_pow2(alignment):
        raise SpecError(f"alignment {alignment}")
    if cow_format != 0:
        raise SpecError(f"cow_format {cow_format}")
    if size == 0:
        raise SpecError("size 0")
    return SpecHeader(layout, order if layout == "v1" else "big", field[: field.index(b"\0")], mtime, size,
                      sectorsize, alignment, cow_format)


def build_header(layout: str, backing: bytes | str | os.PathLike[str], mtime: int, size: int, *,
                 sectorsize: int = SECTOR, alignment: int = PAGE, byteorder: str = HOST,
                 cow_format: int = 0, tail: bytes = b"") -> bytes:
    """The header bytes of ``layout``, each field packed at its spec offset (``tail`` fills the path
    field after the NUL, like the garbage real files carry there)."""
    path = os.fsencode(backing)
    hsize, path_at, width = LAYOUT[layout]
    field = (path + b"\0" + tail)[:width].ljust(width, b"\0")
    out = bytearray(hsize)
    if layout == "v1":
        e = "<" if byteorder == "little" else ">"
        struct.pack_into(e + "Ii", out, 0, MAGIC, 1)
        struct.pack_into(e + "IQi", out, 264, mtime, size, sectorsize)
    elif layout == "v2":
        struct.pack_into(">Ii", out, 0, MAGIC, 2)
        struct.pack_into(">IQi", out, 4104, mtime, size, sectorsize)
    elif layout == "v3":
        struct.pack_into(">IiIQIII", out, 0, MAGIC, 3, mtime, size, sectorsize, alignment, cow_format)
    else:
        struct.pack_into(">IiI4xQIII", out, 0, MAGIC, 3, mtime, size, sectorsize, alignment, cow_format)
    out[path_at : path_at + width] = field
    return bytes(out)


def make_cow(path: Path, layout: str, backing: Path, *, alignment: int = PAGE, byteorder: str = HOST) -> SpecHeader:
    """A fresh COW file on ``backing`` (absolute path, its size and mtime), like uml_mkcow: the header, a
    zero bitmap, a sparse data area; the file is ``data_offset + size`` bytes."""
    st = os.stat(backing)
    raw = build_header(layout, os.path.abspath(backing), int(st.st_mtime), st.st_size, alignment=alignment,
                       byteorder=byteorder)
    h = parse(raw)
    with open(path, "wb") as f:
        f.write(raw)
        f.truncate(h.data_offset + h.size)
    return h


def read_header(path: Path) -> SpecHeader:
    with open(path, "rb") as f:
        return parse(f.read(4136))


def bits(path: Path) -> list[int]:
    """The sectors whose bit is set and honoured, read from the bitmap bytes (ascending)."""
    h = read_header(path)
    with open(path, "rb") as f:
        f.seek(h.bitmap_offset)
        raw = f.read(h.bitmap_len)
    assert len(raw) == h.bitmap_len, f"{path}: the bitmap is cut short"
    return [i for i in range(h.honoured) if raw[i >> 3] >> (i & 7) & 1]


def runs(sectors: list[int]) -> list[tuple[int, int]]:
    """``(first, count)`` runs of an ascending list of sectors."""
    out: list[list[int]] = []
    for s in sectors:
        if out and out[-1][0] + out[-1][1] == s:
            out[-1][1] += 1
        else:
            out.append([s, 1])
    return [(a, n) for a, n in out]


def decode(data: bytes, backing: bytes) -> tuple[bytes, list[int], set[int]]:
    """What a COW file's bytes define: the disk (the backing bytes where a bit is clear, the data area
    where a bit is set and honoured, zeros past the end of the file), each sector's bit (0 or 1; 0 where
    the bitmap has no bit or the file is cut short) and the mixed pages."""
    h = parse(data[:4136])
    raw = data[h.bitmap_offset : h.bitmap_offset + h.bitmap_len]
    flags = [raw[s >> 3] >> (s & 7) & 1 if s >> 3 < len(raw) else 0 for s in range(h.honoured)]
    flags += [0] * (h.sectors - h.honoured)
    out = bytearray(backing[: h.size])
    for first, count in runs([s for s, on in enumerate(flags) if on]):
        a, b = SECTOR * first, min(SECTOR * (first + count), h.size)
        out[a:b] = data[h.data_offset + a : h.data_offset + b].ljust(b - a, b"\0")  # past the end: a hole
    mixed = {p for p in range(-(-h.honoured // 8))
             if 0 < sum(flags[8 * p : min(8 * p + 8, h.honoured)]) < min(8, h.honoured - 8 * p)}
    return bytes(out), flags, mixed


def disk(path: Path, backing: Path) -> bytes:
    """The virtual disk as the kernel reads it: exactly ``size`` bytes."""
    h = read_header(path)
    assert h.sectorsize == SECTOR, "the model reads 512-byte-sector files only, like the kernel"
    content = backing.read_bytes()
    assert len(content) == h.size, f"{backing} is {len(content)} bytes; the header records {h.size}"
    data = path.read_bytes()
    assert len(data) >= h.bitmap_offset + h.bitmap_len, f"{path}: the bitmap is cut short"
    return decode(data, content)[0]


def cow_bytes(path: Path) -> int:
    """Bytes of the virtual disk read from the COW file (set, honoured bits; a partial last sector counts
    its part below ``size``)."""
    h = read_header(path)
    return sum(min(SECTOR * (s + 1), h.size) - SECTOR * s for s in bits(path))


def mixed_pages(path: Path) -> list[int]:
    """4 KiB pages of the disk whose honoured bits are neither all set nor all clear."""
    h = read_header(path)
    set_bits = set(bits(path))
    out = []
    for p in range(-(-h.honoured // 8)):
        page = range(8 * p, min(8 * p + 8, h.honoured))
        n = sum(s in set_bits for s in page)
        if 0 < n < len(page):
            out.append(p)
    return out


def hole_ranges(path: Path, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """``(start, end)`` ranges of ``path`` inside [start, end) that are holes, by SEEK_DATA/SEEK_HOLE
    (the filesystem's answer; a range past the end of the file is a hole)."""
    size = os.path.getsize(path)
    end = size if end is None else end
    holes, pos = [], start
    fd = os.open(path, os.O_RDONLY)
    try:
        while pos < end:
            try:
                data = min(os.lseek(fd, pos, os.SEEK_DATA), end) if pos < size else end
            except OSError:  # ENXIO: a hole to the end of the file
                data = end
            if data > pos:
                holes.append((pos, data))
            pos = min(os.lseek(fd, data, os.SEEK_HOLE), end) if data < end else end
    finally:
        os.close(fd)
    return holes


def hole_sectors(path: Path) -> list[int]:
    """Set, honoured sectors whose 512 bytes in the data area lie wholly in a hole: they read as zeros."""
    h = read_header(path)
    holes = hole_ranges(path, h.data_offset, h.data_offset + SECTOR * h.sectors)
    out = []
    for s in bits(path):
        a = h.data_offset + SECTOR * s
        if any(lo <= a and a + SECTOR <= hi for lo, hi in holes):
            out.append(s)
    return out


class Model:
    """The expected content of a disk: the backing bytes with the writes replayed, in order."""

    def __init__(self, backing: bytes) -> None:
        self.data = bytearray(backing)

    def write(self, offset: int, data: bytes) -> None:
        assert 0 <= offset and offset + len(data) <= len(self.data)
        self.data[offset : offset + len(data)] = data

    def zero(self, offset: int, length: int) -> None:
        self.write(offset, bytes(length))

    def __bytes__(self) -> bytes:
        return bytes(self.data)


def api_writes(img: object, model: Model, rng: random.Random, count: int, end: int | None = None) -> list[tuple]:
    """``count`` random writes through an open ubdcow image (mode "r+") inside [0, ``end``), replayed on
    ``model``: pwrite (unaligned, aligned pages, zeros), file-style seek + write, write_zeroes, discard.
    Returns the operations, for failure messages."""
    end = len(model.data) if end is None else end
    ops: list[tuple] = []
    for _ in range(count):
        kind = rng.random()
        off = rng.randrange(end)
        length = min(end - off, rng.choice((1, 511, SECTOR, PAGE, rng.randrange(1, 3 * PAGE),
                                            rng.randrange(1, 64 * 1024))))
        if kind < 0.1:  # whole pages, the kernel's usual request
            off = off // PAGE * PAGE
            length = min(end - off, PAGE * rng.randrange(1, 5))
        if kind < 0.65:
            data = rng.randbytes(length) if rng.random() < 0.85 else bytes(length)
            if rng.random() < 0.2:
                img.seek(off)  # type: ignore[attr-defined]
                assert img.write(data) == length  # type: ignore[attr-defined]
            else:
                assert img.pwrite(data, off) == length  # type: ignore[attr-defined]
            model.write(off, data)
            ops.append(("pwrite", off, length))
        elif kind < 0.85:
            img.write_zeroes(off, length)  # type: ignore[attr-defined]
            model.zero(off, length)
            ops.append(("write_zeroes", off, length))
        else:
            img.discard(off, length)  # type: ignore[attr-defined]
            model.zero(off, length)
            ops.append(("discard", off, length))
    return ops


def where_differs(a: bytes, b: bytes) -> str:
    """A short description of how two byte strings differ (never a megabyte diff)."""
    n = min(len(a), len(b))
    bad = [i // SECTOR for i in range(0, n, SECTOR) if a[i : i + SECTOR] != b[i : i + SECTOR]]
    if not bad and len(a) == len(b):
        return "equal"
    return f"lengths {len(a)} vs {len(b)}; " + (f"{len(bad)} sectors differ, first {bad[:8]}" if bad else "")


# -- the model against the real kernel -------------------------------------------------------------


def corpus_file(name: str, stem: str) -> bytes:
    return gzip.decompress((DATA / name / f"{stem}.gz").read_bytes())


@pytest.mark.parametrize("meta", MANIFEST, ids=[c["name"] for c in MANIFEST])
def test_the_model_reads_what_a_real_guest_read(tmp_path, meta):
    """Header fields, geometry, honoured bits and content, against every conformance case."""
    cow, backing = tmp_path / "o.cow", tmp_path / "b.img"
    cow.write_bytes(corpus_file(meta["name"], "overlay.cow"))
    backing.write_bytes(corpus_file(meta["name"], "backing.img"))
    h = read_header(cow)
    assert (h.layout, h.version, h.mtime, h.size, h.sectorsize) == (
        meta["layout"], meta["version"], meta["mtime"], meta["size"], meta["sectorsize"])
    assert h.backing == meta["backing_file_in_header"].encode()
    assert (h.bitmap_offset, h.bitmap_len, h.data_offset, h.sectors) == (
        meta["bitmap_offset"], meta["bitmap_len"], meta["data_offset"], meta["sectors"])
    if h.layout not in ("v1", "v2"):
        assert h.alignment == meta["alignment"]
    assert runs(bits(cow)) == [tuple(r) for r in meta["effective_extents"]]
    expected = corpus_file(meta["name"], "expected.img")
    got = disk(cow, backing)
    assert got == expected, where_differs(got, expected)


def test_v1_rounding_sectors_have_no_bit_in_the_model(tmp_path):
    """v1-rounding-tail: the kernel wrote six bits (1948-1953), it honours four, and reads 1952-1953 from
    the backing file; the model agrees with the manifest on both counts."""
    cow = tmp_path / "o.cow"
    cow.write_bytes(corpus_file("v1-rounding-tail", "overlay.cow"))
    h = read_header(cow)
    assert (h.sectors, h.honoured) == (1954, 1952)
    assert bits(cow) == [1948, 1949, 1950, 1951]
    raw = cow.read_bytes()
    stray = [i for i in range(1952, 1954) if raw[h.bitmap_offset + (i >> 3)] >> (i & 7) & 1]
    assert stray == [1952, 1953]  # in the file, past the bitmap: ignored


@pytest.mark.uml
def test_build_header_matches_uml_mkcow(tmp_path):
    """The model's v3 builder writes the bytes the real uml_mkcow writes (its path tail is zero here)."""
    mkcow = require_tool("uml_mkcow")
    backing = tmp_path / "backing.img"
    backing.write_bytes(os.urandom(3 * 1024 * 1024 + 1024))
    os.utime(backing, (1_650_000_000, 1_650_000_000))
    cow = tmp_path / "mkcow.cow"
    subprocess.run([mkcow, str(cow), str(backing)], check=True, capture_output=True, timeout=30)
    raw = cow.read_bytes()
    h = parse(raw)
    assert (h.layout, h.backing, h.mtime, h.size, h.sectorsize, h.alignment) == (
        "v3", str(backing).encode(), 1_650_000_000, backing.stat().st_size, 512, 4096)
    assert (h.bitmap_offset, h.data_offset, len(raw)) == (8192, 8192 + round_up(h.bitmap_len, 4096),
                                                          h.data_offset + h.size)
    ours = build_header("v3", backing, 1_650_000_000, backing.stat().st_size)
    assert raw[: 33 + len(h.backing)] == ours[: 33 + len(h.backing)]  # up to the NUL: the tail is garbage
    mine = tmp_path / "model.cow"
    make_cow(mine, "v3", backing)
    assert mine.stat().st_size == len(raw)
    assert disk(mine, backing) == disk(cow, backing) == backing.read_bytes()


@pytest.mark.parametrize("layout", sorted(LAYOUT))
def test_build_then_parse_in_the_model(layout):
    raw = build_header(layout, "/b.img", 1_700_000_001, 1_000_000, alignment=512, tail=b"\x01garbage")
    assert len(raw) == LAYOUT[layout][0]
    h = parse(raw)
    assert (h.layout, h.backing, h.mtime, h.size, h.sectorsize) == (layout, b"/b.img", 1_700_000_001, 1_000_000,
                                                                    512)
    assert h.bitmap_len == (244 if layout in ("v1", "v2") else 245)  # the spec's worked example
    assert raw[:4] == (b"MOOO" if layout == "v1" and HOST == "little" else b"OOOM")
