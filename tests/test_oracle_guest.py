"""What ubdcow writes, read back by the real kernel, and judged by the model.

One guest boot attaches seven COW files as /dev/ubdb../dev/ubdh and dumps each
with ``dd bs=4096 iflag=direct``; each dump must equal the model (the backing
bytes with the same writes replayed, tests/test_oracle_model.py), and so must
the model's own reading of the file. The files are made by the model's header
builder (not ubdcow's), written through ubdcow's API, and cover:

* v1 in host byte order, size 953,856: its bitmap ends on a sector boundary, so
  the bits the rounding bug leaves out would alias sector 0's data;
* v2, size 1,000,000: the rounding bug (sectors 1952-1953 have no bit) and a
  partial last sector;
* the broken 64-bit v3 layout, with a partial last sector;
* v3 with alignment 512;
* the output of a safe ``rebase`` onto a modified copy of the backing file;
* the outputs of ``convert``: v2 -> v3 and v3 (alignment 512) -> v1.

Only the COW file is named on the kernel command line (the recorded backing
path is right), so the kernel never rewrites a v1/v2 header.

The sectors the v1/v2 rounding bug leaves without a bit are compared loosely:
the kernel tests their bit in memory past the bitmap it loaded, so a guest
reads each from the backing file (what ubdcow and the model read) or,
now and then, from the data area (observed here: about one boot in ten read
sector 1862 of the v1 file from its data area). ubdcow refuses writes there.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import sys
from pathlib import Path

import pytest
from test_oracle_model import (
    PAGE,
    SECTOR,
    Model,
    api_writes,
    bits,
    disk,
    make_cow,
    mixed_pages,
    read_header,
    where_differs,
)
from support.uml import dump_devices

import ubdcow

pytestmark = pytest.mark.uml
MTIME = 1_650_000_000


def backing_file(path: Path, size: int, rng: random.Random) -> bytes:
    """Random bytes, every sector stamped with its number (a sector read from the wrong place shows)."""
    data = bytearray(rng.randbytes(size))
    for s in range(0, size, SECTOR):
        stamp = f"{path.name}:{s // SECTOR}:".encode()
        data[s : s + len(stamp)] = stamp[: size - s]
    path.write_bytes(data)
    os.utime(path, (MTIME, MTIME))
    return bytes(data)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Files:
    """The COW files under test, each with the content it must read as."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.items: list[tuple[str, Path, Path, bytes]] = []  # (what, cow, backing, expected)

    def add(self, what: str, cow: Path, backing: Path, expected: bytes) -> None:
        got = disk(cow, backing)
        assert got == expected, f"{what}: the model reads {where_differs(got, expected)} in the file"
        with ubdcow.open(cow) as img:  # ubdcow's reader agrees (it is judged by the model here too)
            ours = img.read()
        assert ours == expected, f"{what}: ubdcow reads {where_differs(ours, expected)}"
        assert not mixed_pages(cow), f"{what}: pages mixing COW and backing sectors: {mixed_pages(cow)[:8]}"
        self.items.append((what, cow, backing, expected))


def written(folder: Path, name: str, layout: str, size: int, rng: random.Random, *, alignment: int = PAGE,
            end: int | None = None, count: int = 120) -> tuple[Path, Path, Model]:
    """A COW file of ``layout`` made by the model, written at random through ubdcow inside [0, end)."""
    backing = folder / f"{name}.img"
    cow = folder / f"{name}.cow"
    model = Model(backing_file(backing, size, rng))
    h = make_cow(cow, layout, backing, alignment=alignment)
    assert h.layout == layout
    with ubdcow.open(cow, "r+") as img:
        api_writes(img, model, rng, count, end)
        img.pwrite(rng.randbytes(PAGE), 0)  # page 0 written whole, and the last recordable sector
        model.write(0, img.pread(PAGE, 0))
        last = min(h.honoured * SECTOR, size) - 1
        img.pwrite(b"\xee", last)
        model.write(last, b"\xee")
    return cow, backing, model


def test_a_real_guest_reads_what_ubdcow_wrote_in_every_layout(tmp_path):
    rng = random.Random(0x0AC1E)
    files = Files(tmp_path)

    # v1, host order, 953,856 bytes: bitmap 280 + 232 = 512, data_offset 512; sectors 1856-1862 have no bit,
    # and the bits past the bitmap would be the first bytes of sector 0's data.
    cow, backing, model = written(tmp_path, "v1", "v1", 953_856, rng, end=1856 * SECTOR)
    h = read_header(cow)
    assert (h.bitmap_offset + h.bitmap_len, h.data_offset, h.honoured, h.sectors) == (512, 512, 1856, 1863)
    with ubdcow.open(cow, "r+") as img:
        img.pwrite(b"\xff" * PAGE, 0)  # sector 0's data all ones: read as bits, they would claim 1856-1862
        model.write(0, b"\xff" * PAGE)
        before = cow.read_bytes()
        with pytest.raises(ubdcow.UnrecordableWriteError):
            img.pwrite(b"x", 1860 * SECTOR)
    assert cow.read_bytes() == before, "a refused write changed the file"
    files.add("v1 953,856 (aliasing)", cow, backing, bytes(model))

    # v2, 1,000,000 bytes: the rounding bug leaves sectors 1952-1953 (page 244) without a bit
    cow, backing, model = written(tmp_path, "v2", "v2", 1_000_000, rng, end=1952 * SECTOR)
    assert read_header(cow).honoured == 1952
    with ubdcow.open(cow, "r+") as img, pytest.raises(ubdcow.UnrecordableWriteError):
        img.pwrite(b"y" * 10, 999_990)
    v2_cow, v2_backing, v2_model = cow, backing, model
    files.add("v2 1,000,000 (rounding bug)", cow, backing, bytes(model))

    # the broken 64-bit v3 layout, with a partial last sector
    cow, backing, model = written(tmp_path, "broken", "v3-broken", (1 << 20) + 1000, rng)
    assert read_header(cow).layout == "v3-broken" and cow.read_bytes()[32:36] == bytes(4)
    files.add("v3-broken", cow, backing, bytes(model))

    # v3 with alignment 512: bitmap at 4608
    cow, backing, model = written(tmp_path, "a512", "v3", 3 << 20, rng, alignment=512)
    assert (read_header(cow).bitmap_offset, read_header(cow).alignment) == (4608, 512)
    a512_cow, a512_backing, a512_model = cow, backing, model
    files.add("v3 alignment 512", cow, backing, bytes(model))

    # safe rebase onto a modified copy: the content must not change
    cow, old, model = written(tmp_path, "rebase", "v3", (2 << 20) + 3 * SECTOR, rng, count=40)
    new = tmp_path / "rebase-new.img"
    shutil.copyfile(old, new)
    changed = bytearray(new.read_bytes())
    set_before = set(bits(cow))
    for _ in range(60):  # under written and unwritten sectors alike
        a = rng.randrange(len(changed))
        n = min(rng.randrange(1, 3 * SECTOR), len(changed) - a)
        changed[a : a + n] = rng.randbytes(n)
    new.write_bytes(changed)
    os.utime(new, (MTIME + 1, MTIME + 1))
    ubdcow.rebase(cow, new)
    h = read_header(cow)
    assert (h.backing, h.mtime) == (os.fsencode(os.path.realpath(new)), MTIME + 1)
    assert set_before <= set(bits(cow))
    files.add("safe rebase", cow, new, bytes(model))

    # convert: v2 (with its bitless sectors) -> v3, and v3 alignment 512 -> v1
    out = tmp_path / "v2-to-v3.cow"
    ubdcow.convert(v2_cow, out, layout="v3")
    assert read_header(out).layout == "v3"
    files.add("convert v2 -> v3", out, v2_backing, bytes(v2_model))
    out = tmp_path / "a512-to-v1.cow"
    ubdcow.convert(a512_cow, out, layout="v1")
    h = read_header(out)
    assert (h.layout, h.byteorder, h.honoured) == ("v1", sys.byteorder, h.sectors)
    files.add("convert v3 -> v1", out, a512_backing, bytes(a512_model))

    hashes = [sha(cow) for _, cow, _, _ in files.items]
    dumps = dump_devices([cow for _, cow, _, _ in files.items], tmp_path)
    for (what, cow, _, expected), dump in zip(files.items, dumps, strict=True):
        assert len(dump) == -(-len(expected) // SECTOR) * SECTOR, what
        h = read_header(cow)
        end = min(h.honoured * SECTOR, len(expected))
        assert dump[:end] == expected[:end], f"{what}: the guest read {where_differs(dump[:end], expected[:end])}"
        raw = cow.read_bytes()
        for s in range(h.honoured, h.sectors):  # no bit: the kernel tests a bit past what it loaded
            a, b = s * SECTOR, min(s * SECTOR + SECTOR, len(expected))
            area = raw[h.data_offset + a : h.data_offset + b].ljust(b - a, b"\0")
            assert dump[a:b] in (expected[a:b], area), f"{what}: sector {s} is neither backing nor data area"
    assert [sha(cow) for _, cow, _, _ in files.items] == hashes, "the kernel changed a file it only read"
