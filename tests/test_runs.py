"""The one map of the disk (issue 24, item 1): ``CowFile.runs`` and ``run_arrays`` against the spec model.

Files are made with the spec model's own header code (tests/test_oracle_model.py), bits and data written
as raw bytes, holes punched in the data area and in the backing file, the COW file cut short inside its
data area (set bits past its end), the backing file cut short (clear bits past its end). Each byte's
source is then judged by the model: by the bit of its sector (set and honoured: the COW file); with holes,
a hole of the file it comes from, as SEEK_DATA/SEEK_HOLE report it (the model's ``hole_ranges``, where the
part past a file's end is a hole), reads as zeros. The runs must say so byte for byte, come coalesced,
name the right file and offset, and their bytes must be the disk the model decodes.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import test_oracle_model as spec
from hypothesis import given, settings
from hypothesis import strategies as st

from ubdcow import _io, cowfile
from ubdcow._io import punch_hole
from ubdcow.cowfile import CowFile, Run

SECTOR, BLOCK = 512, 4096
KIND = {"backing": 0, "cow": 1, "zero": 2}


@contextmanager
def patched(module: object, name: str, value: object) -> Iterator[None]:
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def holes_of(path: Path, start: int, end: int) -> np.ndarray:
    """Bytes [start, end) of ``path`` that lie in a hole (past its end included), by the model."""
    out = np.zeros(end - start, dtype=bool)
    for a, b in spec.hole_ranges(path, start, end):
        out[a - start : b - start] = True
    return out


def write_bits(path: Path, h: spec.SpecHeader, sectors: list[int]) -> None:
    raw = bytearray(h.bitmap_len)
    for s in sectors:
        raw[s >> 3] |= 1 << (s & 7)
    with open(path, "r+b") as f:
        f.seek(h.bitmap_offset)
        f.write(raw)


@st.composite
def layouts(draw: st.DrawFn) -> dict[str, object]:
    rng = random.Random(draw(st.integers(0, 2**32)))
    size = draw(st.sampled_from([BLOCK * rng.randrange(1, 80), rng.randrange(1, 300_000)]))
    sectors = -(-size // SECTOR)
    bits: list[int] = []
    s = 0
    while s < sectors:  # runs of set and clear sectors, some page-sized, some not
        n = rng.choice([1, 3, 8, 16, 64, 200])
        if rng.random() < 0.45:
            bits += range(s, min(sectors, s + n))
        s += n
    return {
        "size": size,
        "layout": draw(st.sampled_from(["v3", "v3", "v2", "v1"])),
        "bits": bits,
        "data_holes": [rng.randrange(-(-size // BLOCK)) for _ in range(rng.randrange(0, 6))],
        "backing_holes": [rng.randrange(-(-size // BLOCK)) for _ in range(rng.randrange(0, 6))],
        "cut_cow": rng.choice([None, rng.randrange(size + 1)]),
        "cut_backing": rng.choice([None, None, rng.randrange(size + 1)]),
        "seed": rng.randrange(2**32),
    }


def make(folder: Path, lay: dict[str, object]) -> tuple[Path, Path, spec.SpecHeader]:
    rng = random.Random(lay["seed"])
    size = int(lay["size"])  # type: ignore[arg-type]
    backing = folder / "backing.img"
    backing.write_bytes(rng.randbytes(size))
    cow = folder / "overlay.cow"
    h = spec.make_cow(cow, str(lay["layout"]), backing)
    bits = [s for s in lay["bits"] if s < h.honoured]  # type: ignore[attr-defined]
    write_bits(cow, h, bits)
    with open(cow, "r+b") as f:
        for first, count in spec.runs(bits):
            f.seek(h.data_offset + first * SECTOR)
            f.write(rng.randbytes(count * SECTOR))
        if lay["cut_cow"] is not None:
            f.truncate(h.data_offset + int(lay["cut_cow"]))  # type: ignore[arg-type]
    for path, blocks, base in ((cow, lay["data_holes"], h.data_offset), (backing, lay["backing_holes"], 0)):
        fd = os.open(path, os.O_RDWR)
        try:
            for b in blocks:  # type: ignore[attr-defined]
                assert punch_hole(fd, base + b * BLOCK, BLOCK)
        finally:
            os.close(fd)
    if lay["cut_backing"] is not None:
        os.truncate(backing, int(lay["cut_backing"]))  # type: ignore[arg-type]
    return cow, backing, h


def expected_sources(cow: Path, backing: Path, h: spec.SpecHeader, holes: bool) -> np.ndarray:
    """The source of every byte of the disk, by the model."""
    flags = spec.decode(cow.read_bytes(), b"")[1]
    by_sector = np.array(flags, dtype=bool)
    is_set = np.repeat(by_sector, SECTOR)[: h.size]
    out = np.where(is_set, KIND["cow"], KIND["backing"])
    if holes:
        out[is_set & holes_of(cow, h.data_offset, h.data_offset + h.size)] = KIND["zero"]
        out[~is_set & holes_of(backing, 0, h.size)] = KIND["zero"]
    return out


def check_runs(
    runs: list[Run], want: np.ndarray, is_set: np.ndarray, span: tuple[int, int], fds: tuple[int, int], base: int
) -> None:
    """The runs cover ``span`` in order, coalesced, with the model's source for every byte and the right file
    and offset (zeros: where they would lie in the file whose hole they are)."""
    cow_fd, backing_fd = fds
    offset, end = span
    pos = offset
    for i, run in enumerate(runs):
        assert run.start == pos and run.length > 0, (i, run, pos)
        assert (want[run.start : run.start + run.length] == KIND[run.source]).all(), run
        where = base + run.start if is_set[run.start] else run.start
        assert (run.fd, run.offset) == ({"cow": cow_fd, "backing": backing_fd, "zero": -1}[run.source], where), run
        if i:
            prev = runs[i - 1]
            assert not (prev.source == run.source and prev.fd == run.fd and prev.offset + prev.length == run.offset)
        pos += run.length
    assert pos == end


def content(runs: list[Run]) -> bytes:
    out = bytearray()
    for run in runs:
        out += os.pread(run.fd, run.length, run.offset).ljust(run.length, b"\0") if run.fd >= 0 else bytes(run.length)
    return bytes(out)


@settings(max_examples=60, deadline=None)
@given(layouts(), st.booleans(), st.sampled_from([cowfile.RUNS_MAX, 8192, 4096 + 1536]), st.data())
def test_runs_and_run_arrays_say_what_the_spec_says(lay, fiemap, window, data) -> None:
    with tempfile.TemporaryDirectory() as folder:
        cow, backing, h = make(Path(folder), lay)
        disk = spec.decode(cow.read_bytes(), backing.read_bytes().ljust(h.size, b"\0"))[0]
        # without FIEMAP, every answer comes from SEEK_DATA/SEEK_HOLE
        no_fiemap = patched(_io, "written_extents", lambda fd, start, end: None) if not fiemap else nullcontext()
        with patched(cowfile, "RUNS_MAX", window), no_fiemap:
            with CowFile(cow, lock=False) as c:
                bfd = os.open(backing, os.O_RDONLY)
                try:
                    offset = data.draw(st.integers(0, h.size - 1))
                    end = data.draw(st.integers(offset + 1, h.size))
                    is_set = expected_sources(cow, backing, h, False) == KIND["cow"]
                    for holes in (False, True):
                        want = expected_sources(cow, backing, h, holes)
                        for a, b in ((0, h.size), (offset, end)):
                            runs = list(c.runs(a, b - a, backing_fd=bfd, holes=holes))
                            check_runs(runs, want, is_set, (a, b), (c.fd, bfd), h.data_offset)
                            assert content(runs) == disk[a:b]
                        starts, ends, sources = c.run_arrays(offset, end - offset, backing_fd=bfd, holes=holes)
                        assert starts[0] == offset and (starts[1:] == ends[:-1]).all()
                        assert ends[-1] == min(end, offset + window)
                        for s, e, k in zip(starts.tolist(), ends.tolist(), sources.tolist(), strict=True):
                            assert (want[s:e] == k).all()
                    # the views: extents by the bits, mapping with the data area's holes, as they always did
                    bits_only = expected_sources(cow, backing, h, False)
                    assert all((bits_only[a : a + n] == KIND[k]).all() for a, n, k in c.extents())
                    both = expected_sources(cow, backing, h, True)
                    for e in c.mapping():
                        got = both[e.start : e.start + e.length]
                        if e.source == "backing":  # mapping leaves the backing file's holes alone
                            assert (bits_only[e.start : e.start + e.length] == KIND["backing"]).all()
                        else:
                            assert (got == KIND[e.source]).all() and e.offset == h.data_offset + e.start
                finally:
                    os.close(bfd)


def test_set_bits_past_the_end_of_the_cow_file_read_zeros(tmp_path: Path) -> None:
    """The rule, once: a set bit whose data lies past the end of the COW file reads as zeros, in the map
    (a "zero" run) and through CowFile.read_data."""
    backing = tmp_path / "b.img"
    backing.write_bytes(os.urandom(64 << 10))
    cow = tmp_path / "o.cow"
    h = spec.make_cow(cow, "v3", backing)
    write_bits(cow, h, list(range(0, 128)))  # the whole disk is COW
    with open(cow, "r+b") as f:
        f.seek(h.data_offset)
        f.write(b"\xab" * (20 << 10))
        f.truncate(h.data_offset + (20 << 10))  # its data ends after 20 KiB
    with CowFile(cow, lock=False) as c:
        assert list(c.extents()) == [(0, 64 << 10, "cow")]
        assert [(r.start, r.length, r.source) for r in c.runs(holes=True)] == [
            (0, 20 << 10, "cow"),
            (20 << 10, 44 << 10, "zero"),
        ]
        view = memoryview(bytearray(b"\xff" * 8192))
        c.read_data(view, (20 << 10) - 4096)
        assert bytes(view) == b"\xab" * 4096 + bytes(4096)
