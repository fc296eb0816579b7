"""The read plan on its own: bitmap bytes in, a plan out, no file (issue 24, item 2).

A request's plan, carried out by this file's own small interpreter on two byte strings standing for the
COW data area and the backing file, must give what the spec says the disk holds there: the COW file's
bytes where a sector's bit is set and honoured, the backing file's everywhere else (tests/
test_oracle_model.py's rule). The bitmap bytes mix whole pages (0x00, 0xFF) and mixed ones, the honoured
bits may end inside them (a v1/v2 bitmap), and the bytes may start before the request (a cached chunk).
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from ubdcow._readpath import OVERLAY_MAX, OVERLAY_MIN, Plan, plan
from ubdcow.cowfile import BACKING, COW

SECTOR, PAGE = 512, 4096


def sources(bitmap: bytes, nbits: int, offset: int, end: int) -> list[int]:
    """The spec's answer, byte by byte: COW where the sector's bit is set and honoured."""
    out = []
    for i in range(offset, end):
        s = i // SECTOR
        out.append(COW if s < nbits and bitmap[s >> 3] >> (s & 7) & 1 else BACKING)
    return out


def carry_out(todo: int | Plan, cow: bytes, backing: bytes, offset: int, end: int) -> bytes:
    """Fill a request by its plan, checking the plan's form on the way."""
    files = {COW: cow, BACKING: backing}
    if isinstance(todo, int):
        return files[todo][offset:end]
    out = bytearray(end - offset)
    if todo.under:
        out[:] = backing[offset:end]
        if todo.sectors is not None:
            assert not todo.steps
            for k in todo.sectors.tolist():
                a = offset + k * SECTOR
                out[a - offset : a - offset + SECTOR] = cow[a : a + SECTOR]
            return bytes(out)
    pos = offset
    for start, stop, source in todo.steps:
        assert offset <= start < stop <= end, (start, stop)
        if todo.under:
            assert source == COW and start >= pos  # only the COW runs, in order
        else:
            assert start == pos  # the steps cover the request, in order
        out[start - offset : stop - offset] = files[source][start:stop]
        pos = stop
    if not todo.under:
        assert pos == end
    return bytes(out)


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, int, int, int, int, int]:
    """Bitmap bytes of runs of whole and mixed pages, the honoured bits, the first byte handed over, a
    request and how far the COW data is mapped."""
    rng = random.Random(draw(st.integers(0, 2**32)))
    pages = draw(st.integers(1, 700))
    bitmap = bytearray()
    mixed = draw(st.sampled_from([0.0, 0.02, 0.3]))
    while len(bitmap) < pages:
        kind = rng.random()
        byte = rng.randrange(1, 255) if kind < mixed else 0xFF if kind < mixed + (1 - mixed) * 0.4 else 0
        bitmap += bytes([byte]) * rng.choice([1, 1, 2, 5, 30, 200])
    bitmap = bytes(bitmap[:pages])
    nbits = draw(st.sampled_from([8 * pages, 8 * pages, draw(st.integers(0, 8 * pages))]))
    size = pages * PAGE
    align = draw(st.sampled_from([1, SECTOR, PAGE]))
    offset = draw(st.integers(0, size - 1)) // align * align
    length = draw(st.sampled_from([1, SECTOR, PAGE, 3 * PAGE, OVERLAY_MIN, 256 << 10, draw(st.integers(1, size))]))
    end = min(size, offset + length)
    base = draw(st.integers(0, offset // PAGE))
    mapped_end = draw(st.sampled_from([0, size, draw(st.integers(0, size))]))
    return bitmap, nbits, base, offset, end, mapped_end


@settings(max_examples=600, deadline=None)
@given(requests(), st.binary(min_size=1, max_size=1))
def test_a_plan_fills_what_the_spec_says(request, seed) -> None:
    bitmap, nbits, base, offset, end, mapped_end = request
    rng = random.Random(seed)
    cow, backing = rng.randbytes(len(bitmap) * PAGE), rng.randbytes(len(bitmap) * PAGE)
    # the bytes a reader has in hand: from byte ``base`` up to the last one holding honoured bits
    top = min(len(bitmap), (nbits + 7) // 8, (end + PAGE - 1) // PAGE)
    todo = plan(bitmap[base:top], base, nbits, offset, end, mapped_end)
    want = sources(bitmap, nbits, offset, end)
    expected = bytes((cow if s == COW else backing)[offset + i] for i, s in enumerate(want))
    assert carry_out(todo, cow, backing, offset, end) == expected
    one_source = len(set(want)) == 1
    if isinstance(todo, int):
        assert one_source and todo == want[0]
    elif todo.sectors is not None:  # the overlay: only where it is allowed, and mostly backing
        n = end - offset
        assert OVERLAY_MIN <= n <= OVERLAY_MAX and offset % SECTOR == 0 == n % SECTOR and end <= mapped_end
        assert 2 * todo.sectors.size <= n // SECTOR
    else:
        assert not one_source  # a request from one file is one read, not a plan


def test_whole_pages_are_planned_from_their_bytes() -> None:
    bitmap = bytes([0xFF, 0xFF, 0, 0, 0, 0xFF, 0, 0])
    assert plan(bitmap, 0, 64, 0, 2 * PAGE) == COW
    assert plan(bitmap, 0, 64, 2 * PAGE, 5 * PAGE) == BACKING
    assert plan(bitmap[1:], 1, 64, PAGE + 100, 3 * PAGE) == Plan(
        True, [(PAGE + 100, 2 * PAGE, COW)]
    )  # mostly backing: the backing file in one read, the COW run over it
    assert plan(bitmap, 0, 64, 0, 3 * PAGE) == Plan(False, [(0, 2 * PAGE, COW), (2 * PAGE, 3 * PAGE, BACKING)])


def test_bits_past_the_honoured_ones_read_the_backing_file() -> None:
    bitmap = bytes([0xFF, 0xFF])  # bits 12-15 are set in the bytes, but only 12 bits are honoured
    assert plan(bitmap, 0, 12, 0, 6 * SECTOR) == COW
    assert plan(bitmap, 0, 12, 12 * SECTOR, 16 * SECTOR) == BACKING
    assert plan(bitmap, 0, 12, 10 * SECTOR, 14 * SECTOR) == Plan(
        False, [(10 * SECTOR, 12 * SECTOR, COW), (12 * SECTOR, 14 * SECTOR, BACKING)]
    )
