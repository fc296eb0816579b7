"""The COW bitmap: runs, counts, tests and sets over windows, never the whole map.

Sector *i* is bit ``1 << (i % 8)`` of byte ``i // 8`` (least significant bit
first, numpy's ``bitorder="little"``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

import numpy as np

from ._io import pread_into, pwrite_all
from .format import PAGE_SECTORS, PAGE_SIZE

__all__ = ["Bitmap", "iter_runs", "unpack_bits", "bit_edges", "popcount", "window_stats", "PAGE_SECTORS", "PAGE_SIZE"]

#: Bytes of bitmap looked at per step of a scan (8 Mi sectors, 4 GiB of disk).
WINDOW = 1 << 20
#: Cached chunk size and count for small, random lookups.
CHUNK = 1 << 16
CACHE_CHUNKS = 64
# Below this many bits, runs are found with Python integers (cheaper than numpy).
_SMALL = 4096

Run = tuple[int, int, bool]

if hasattr(np, "bitwise_count"):

    def _popcount_small(arr: np.ndarray) -> int:
        return int(np.bitwise_count(arr).sum(dtype=np.int64))

else:  # numpy < 2.0
    _POP = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)

    def _popcount_small(arr: np.ndarray) -> int:
        return int(_POP[arr.view(np.uint8)].sum(dtype=np.int64))


_ALL = np.uint64(0xFFFF_FFFF_FFFF_FFFF)


def _words(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``arr`` (bytes) as 64-bit words and the bytes left over."""
    n8 = arr.size // 8 * 8
    return arr[:n8].view(np.uint64), arr[n8:]


def _popcount_array(arr: np.ndarray) -> int:
    """Set bits in a byte array; the all-zero and all-one words that fill real bitmaps cost one compare."""
    words, rest = _words(arr)
    partial = words[(words + np.uint64(1)) > 1]  # neither 0 nor all ones (wraps)
    full = int(np.count_nonzero(words)) - partial.size
    return int(64 * full + _popcount_small(partial) + _popcount_small(rest))


def window_stats(arr: np.ndarray, tail: int = 0) -> tuple[int, np.ndarray]:
    """Set bits and mixed pages (bytes neither 0x00 nor 0xFF) of a window of bitmap bytes.

    ``tail`` is the number of honoured bits in the last byte (0: all 8).
    Returns ``(set bits, indexes of the mixed bytes)``.
    """
    last = None
    if tail:
        mask = (1 << tail) - 1
        last = int(arr[-1]) & mask
        arr = arr[:-1]
    words, rest = _words(arr)
    odd = np.flatnonzero((words + np.uint64(1)) > 1)
    full = int(np.count_nonzero(words)) - odd.size
    odd_bytes = words[odd].view(np.uint8).reshape(-1, 8)
    count = 64 * full + _popcount_small(odd_bytes) + _popcount_small(rest)
    col = np.flatnonzero((odd_bytes + np.uint8(1)).ravel() > 1)
    mixed = odd[col // 8] * 8 + col % 8
    more = [words.size * 8 + i for i, b in enumerate(rest.tolist()) if b not in (0, 0xFF)]
    if last is not None:
        count += bin(last).count("1")
        if last not in (0, mask):
            more.append(arr.size)
    if more:
        mixed = np.concatenate((mixed, np.array(more, dtype=mixed.dtype)))
    return count, mixed


def _masked(buf: bytes | bytearray | memoryview, first_bit: int, lo: int, hi: int) -> np.ndarray:
    """The bytes holding bits [lo, hi) of ``buf`` (whose bit 0 is ``first_bit``), outside bits cleared."""
    a = (lo - first_bit) // 8
    b = (hi - first_bit + 7) // 8
    arr: np.ndarray = np.frombuffer(buf, dtype=np.uint8, count=b - a, offset=a).copy()
    head = (lo - first_bit) % 8
    if head:
        arr[0] &= (0xFF << head) & 0xFF
    tail = (hi - first_bit) % 8
    if tail:
        arr[-1] &= (1 << tail) - 1
    return arr


def popcount(buf: bytes | bytearray | memoryview, first_bit: int, lo: int, hi: int) -> int:
    """Number of set bits in [lo, hi) of ``buf``, whose bit 0 is bit ``first_bit``."""
    if hi <= lo:
        return 0
    a = (lo - first_bit) // 8
    b = (hi - first_bit + 7) // 8
    if b - a <= 2:
        return _popcount_small(_masked(buf, first_bit, lo, hi))
    # a view, not a copy: the partial first and last bytes are counted apart, masked
    inner = np.frombuffer(buf, dtype=np.uint8, count=b - a - 2, offset=a + 1)
    edges = _masked(buf, first_bit, lo, lo - (lo - first_bit) % 8 + 8)
    last = _masked(buf, first_bit, first_bit + 8 * (b - 1), hi)
    return _popcount_array(inner) + _popcount_small(edges) + _popcount_small(last)


def iter_runs(buf: bytes | bytearray | memoryview, first_bit: int, lo: int, hi: int) -> Iterator[Run]:
    """Yield maximal runs ``(start, count, is_set)`` covering bits [lo, hi) of ``buf``.

    ``buf``'s bit 0 is bit ``first_bit``; ``buf`` must cover [lo, hi).
    """
    n = hi - lo
    if n <= 0:
        return
    if n <= _SMALL:
        a = (lo - first_bit) // 8
        b = (hi - first_bit + 7) // 8
        x = int.from_bytes(buf[a:b], "little") >> ((lo - first_bit) % 8)
        mask = (1 << n) - 1
        x &= mask
        if x == 0:
            yield lo, n, False
            return
        if x == mask:
            yield lo, n, True
            return
        pos = 0
        while pos < n:
            rest = x >> pos
            is_set = rest & 1
            if is_set:
                rest = ~rest & (mask >> pos)
            length = ((rest & -rest).bit_length() - 1) if rest else n - pos
            yield lo + pos, length, bool(is_set)
            pos += length
        return
    arr = _masked(buf, first_bit, lo, hi)
    head = (lo - first_bit) % 8
    bits = np.unpackbits(arr, bitorder="little")[head : head + n]
    edges = np.flatnonzero(bits[1:] != bits[:-1]) + 1
    starts = np.concatenate(([0], edges))
    ends = np.concatenate((edges, [n]))
    values = bits[starts]
    for s, e, v in zip(starts.tolist(), ends.tolist(), values.tolist(), strict=True):
        yield lo + s, e - s, bool(v)


def unpack_bits(buf: bytes | bytearray | memoryview, first_bit: int, lo: int, top: int, hi: int) -> np.ndarray:
    """Bits [lo, hi) of ``buf`` (whose bit 0 is bit ``first_bit``) as a bool array, the bits from ``top`` on
    clear (``buf`` must cover [lo, top))."""
    if lo >= top:
        return np.zeros(hi - lo, dtype=bool)
    a = lo // 8 - first_bit // 8
    arr = np.frombuffer(buf, dtype=np.uint8, count=(top + 7) // 8 - lo // 8, offset=a)
    bits = np.unpackbits(arr, bitorder="little")[lo % 8 : lo % 8 + top - lo].view(bool)
    if top == hi:  # (the usual case: no copy into a zeroed array, a tenth of the time for a whole window)
        return bits
    out = np.zeros(hi - lo, dtype=bool)
    out[: top - lo] = bits
    return out


def bit_edges(
    buf: bytes | bytearray | memoryview, first_bit: int, lo: int, top: int, hi: int
) -> tuple[np.ndarray, bool]:
    """Where bits [lo, hi) of ``buf`` change, as indexes from ``lo`` (each the first bit of a new run,
    ascending), and bit ``lo``'s value; the bits from ``top`` on clear (``buf`` must cover [lo, top)). What
    comparing neighbours of :func:`unpack_bits` gives, looking only at the bytes that are mixed or differ
    from the byte before (no bool per bit: a whole window costs a tenth)."""
    if lo >= top:
        return np.zeros(0, dtype=np.int64), False
    arr = np.append(_masked(buf, first_bit, lo, top), np.uint8(0))  # (the zero byte: an edge where bits end)
    head = (lo - first_bit) % 8
    k = np.union1d(np.flatnonzero(arr[1:] != arr[:-1]) + 1, np.flatnonzero((arr != 0) & (arr != 0xFF)))
    pairs = np.unpackbits(np.stack((arr[k - 1], arr[k]), axis=1), axis=1, bitorder="little")
    rows, cols = np.nonzero(pairs[:, 8:] != pairs[:, 7:15])  # (byte k's bit j against the bit before it)
    at = 8 * k[rows] + cols - head
    return at[(at >= 1) & (at < hi - lo)], bool(arr[0] >> head & 1)


class Bitmap:
    """The bitmap of an open COW file, read and written a window at a time.

    ``nbits`` is the number of bits that count (the kernel's honoured bits);
    bits at or past it read as clear and cannot be set. Small lookups go
    through a bounded cache of :data:`CHUNK`-byte pieces; scans read
    :data:`WINDOW`-byte windows and do not cache them.
    """

    def __init__(self, fd: int, offset: int, nbytes: int, nbits: int) -> None:
        self.fd = fd
        self.offset = offset
        self.nbytes = nbytes
        self.nbits = min(nbits, 8 * nbytes)
        self._cache: OrderedDict[int, bytearray] = OrderedDict()

    # -- reading -----------------------------------------------------------
    def _read(self, start: int, end: int) -> bytearray:
        """Bitmap bytes [start, end); bytes past the file's end read as zero."""
        buf = bytearray(end - start)
        pread_into(self.fd, memoryview(buf), self.offset + start)
        return buf

    def _chunk(self, index: int) -> bytearray:
        # Readers of one CowImage run this concurrently (writers run alone). Each OrderedDict call is
        # atomic, but another reader may evict an entry between two of them: both cases are harmless.
        cache = self._cache
        chunk = cache.get(index)
        if chunk is None:
            start = index * CHUNK
            chunk = self._read(start, min(start + CHUNK, self.nbytes))
            cache[index] = chunk
            while len(cache) > CACHE_CHUNKS:
                try:
                    cache.popitem(last=False)
                except KeyError:
                    break
        else:
            try:
                cache.move_to_end(index)
            except KeyError:
                pass
        return chunk

    def page_bytes(self, start: int, end: int) -> tuple[bytearray, int]:
        """Bitmap bytes [start, end) and the byte index they begin at (maybe earlier): byte *p* holds the
        8 bits of 4 KiB page *p* of the disk, 0x00 all clear, 0xFF all set. Cached, so not to be changed;
        bits past :attr:`nbits` are not masked (callers check ``end * 8 <= nbits``)."""
        index = start // CHUNK
        if (end - 1) // CHUNK == index:
            return self._chunk(index), index * CHUNK
        return self._read(start, end), start

    def windows(self, lo: int, hi: int) -> Iterator[tuple[bytes | bytearray | memoryview, int, int, int]]:
        """Yield ``(buf, first_bit, lo, hi)`` windows covering honoured bits [lo, hi)."""
        hi = min(hi, self.nbits)
        while lo < hi:
            byte_lo = lo // 8
            byte_hi = min(byte_lo + WINDOW, (hi + 7) // 8)
            buf, base = self.page_bytes(byte_lo, byte_hi)
            w_hi = min(hi, byte_hi * 8)
            yield buf, base * 8, lo, w_hi
            lo = w_hi

    def runs(self, lo: int, hi: int) -> Iterator[Run]:
        """Maximal runs ``(start, count, is_set)`` covering sectors [lo, hi), in order."""
        pending: Run | None = None
        for buf, first_bit, w_lo, w_hi in self.windows(lo, hi):
            for run in iter_runs(buf, first_bit, w_lo, w_hi):
                if pending is None:
                    pending = run
                elif pending[2] == run[2]:
                    pending = (pending[0], pending[1] + run[1], pending[2])
                else:
                    yield pending
                    pending = run
        tail = max(lo, min(hi, self.nbits))
        if tail < hi:  # past the honoured bits: always clear
            if pending is not None and not pending[2]:
                pending = (pending[0], pending[1] + hi - tail, False)
            else:
                if pending is not None:
                    yield pending
                pending = (tail, hi - tail, False)
        if pending is not None:
            yield pending

    def runs_list(self, lo: int, hi: int) -> list[Run]:
        """:meth:`runs` as a list, quickly for the small ranges of ordinary I/O requests."""
        if hi - lo <= _SMALL and hi <= self.nbits:
            buf, base = self.page_bytes(lo // 8, (hi + 7) // 8)
            return list(iter_runs(buf, base * 8, lo, hi))
        return list(self.runs(lo, hi))

    def bits(self, lo: int, hi: int) -> np.ndarray:
        """The bits of sectors [lo, hi) as a bool array (at most one window's worth; clear past ``nbits``)."""
        top = min(hi, self.nbits)
        if lo >= top:
            return np.zeros(hi - lo, dtype=bool)
        buf, base = self.page_bytes(lo // 8, (top + 7) // 8)
        return unpack_bits(buf, base * 8, lo, top, hi)

    def edges(self, lo: int, hi: int) -> tuple[np.ndarray, bool]:
        """Where the bits of sectors [lo, hi) change (see :func:`bit_edges`), and bit ``lo``'s value."""
        top = min(hi, self.nbits)
        if lo >= top:
            return np.zeros(0, dtype=np.int64), False
        buf, base = self.page_bytes(lo // 8, (top + 7) // 8)
        return bit_edges(buf, base * 8, lo, top, hi)

    def count(self, lo: int = 0, hi: int | None = None) -> int:
        """Number of set (honoured) bits in [lo, hi)."""
        hi = self.nbits if hi is None else hi
        return sum(popcount(buf, fb, a, b) for buf, fb, a, b in self.windows(lo, hi))

    def test(self, sector: int) -> bool:
        """Whether the bit of ``sector`` is set."""
        if not 0 <= sector < self.nbits:
            return False
        buf, base = self.page_bytes(sector // 8, sector // 8 + 1)
        return bool(buf[sector // 8 - base] >> (sector % 8) & 1)

    def scan(self, lo: int = 0, hi: int | None = None) -> Iterator[tuple[int, np.ndarray, int]]:
        """Pages [lo, hi) a window at a time: ``(set bits, mixed page indexes, end page)`` per window.

        Page *p* (sectors 8p..8p+7) is bitmap byte *p*; it is mixed when its
        honoured bits are neither all set nor all clear. A last, partial page
        (fewer than 8 honoured sectors) is mixed when its bits disagree.
        """
        top = -(-self.nbits // PAGE_SECTORS)
        hi = top if hi is None else min(hi, top)
        for buf, first_bit, w_lo, w_hi in self.windows(lo * PAGE_SECTORS, hi * PAGE_SECTORS):
            a = (w_lo - first_bit) // 8
            arr = np.frombuffer(buf, dtype=np.uint8, count=(w_hi - w_lo + 7) // 8, offset=a)
            count, pages = window_stats(arr, w_hi % PAGE_SECTORS)
            yield count, pages + w_lo // PAGE_SECTORS, -(-w_hi // PAGE_SECTORS)

    def mixed(self, lo: int = 0, hi: int | None = None) -> Iterator[tuple[np.ndarray, int]]:
        """Mixed pages of pages [lo, hi) (see :meth:`scan`): ``(indexes, end page)`` per window."""
        for _, pages, end in self.scan(lo, hi):
            yield pages, end

    def summary(self, limit: int = 16) -> tuple[int, int, list[int]]:
        """One pass over the bitmap: set bits, mixed pages, and the indexes of the first ``limit`` of those."""
        count = mixed = 0
        first: list[int] = []
        for n, pages, _ in self.scan():
            count += n
            mixed += int(pages.size)
            if len(first) < limit:
                first += pages[: limit - len(first)].tolist()
        return count, mixed, first

    def count_mixed(self, limit: int = 16) -> tuple[int, list[int]]:
        """Number of mixed pages (see :meth:`scan`) and the indexes of the first ``limit``."""
        _, mixed, first = self.summary(limit)
        return mixed, first

    # -- writing -----------------------------------------------------------
    def set_range(self, lo: int, hi: int) -> None:
        """Set bits [lo, hi) in the file, writing back only bytes that change.

        Callers write the sectors' data first: a set bit must never point at
        data that is not there yet.
        """
        if lo < 0 or hi > self.nbits:
            raise ValueError(f"bits [{lo}, {hi}) outside the bitmap's {self.nbits}")
        if 0 < hi - lo <= _SMALL and (lo // 8) // CHUNK == ((hi + 7) // 8 - 1) // CHUNK:
            self._set_small(lo, hi)
            return
        while lo < hi:
            byte_lo = lo // 8
            byte_hi = min(byte_lo + WINDOW, (hi + 7) // 8)
            w_hi = min(hi, byte_hi * 8)
            self._set_window(byte_lo, byte_hi, lo, w_hi)
            lo = w_hi

    def clear_range(self, lo: int, hi: int) -> None:
        """Clear bits [lo, hi) in the file, writing back only bytes that change.

        Callers must not free the sectors' data before the cleared bits are
        durable (fsync): until then a crash may leave the bits set.
        """
        if lo < 0 or hi > self.nbits:
            raise ValueError(f"bits [{lo}, {hi}) outside the bitmap's {self.nbits}")
        while lo < hi:
            byte_lo = lo // 8
            byte_hi = min(byte_lo + WINDOW, (hi + 7) // 8)
            w_hi = min(hi, byte_hi * 8)
            self._set_window(byte_lo, byte_hi, lo, w_hi, clear=True)
            lo = w_hi

    def _set_small(self, lo: int, hi: int) -> None:
        """set_range for a few bits in one cached chunk, with Python integers."""
        byte_lo, byte_hi = lo // 8, (hi + 7) // 8
        buf, base = self.page_bytes(byte_lo, byte_hi)
        old = int.from_bytes(buf[byte_lo - base : byte_hi - base], "little")
        new = old | (((1 << (hi - lo)) - 1) << (lo - 8 * byte_lo))
        if new != old:
            data = new.to_bytes(byte_hi - byte_lo, "little")
            pwrite_all(self.fd, [data], self.offset + byte_lo)
            self._patch(byte_lo, data)

    def _set_window(self, byte_lo: int, byte_hi: int, lo: int, hi: int, *, clear: bool = False) -> None:
        buf, base = self.page_bytes(byte_lo, byte_hi)
        old = np.frombuffer(buf, dtype=np.uint8, count=byte_hi - byte_lo, offset=byte_lo - base)
        mask = np.full(byte_hi - byte_lo, 0xFF, dtype=np.uint8)
        mask[0] &= (0xFF << (lo % 8)) & 0xFF
        if hi % 8:
            mask[-1] &= (1 << (hi % 8)) - 1
        new = old & ~mask if clear else old | mask
        changed = np.flatnonzero(new != old)
        if changed.size == 0:
            return
        first, last = int(changed[0]), int(changed[-1]) + 1
        data = new[first:last].tobytes()
        pwrite_all(self.fd, [data], self.offset + byte_lo + first)
        self._patch(byte_lo + first, data)

    def _patch(self, start: int, data: bytes) -> None:
        """Update cached chunks overlapping bytes [start, start + len(data))."""
        end = start + len(data)
        for index in range(start // CHUNK, (end - 1) // CHUNK + 1):
            chunk = self._cache.get(index)
            if chunk is None:
                continue
            c0 = index * CHUNK
            a, b = max(start, c0), min(end, c0 + len(chunk))
            chunk[a - c0 : b - c0] = data[a - start : b - start]
