"""The bitmap layer against a plain Python model of bits (LSB first), across window and chunk edges."""

from __future__ import annotations

import os
import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st

from ubdcow import bitmap as bm
from ubdcow.bitmap import Bitmap, bit_edges, iter_runs, popcount


def model_runs(bits: list[int], lo: int, hi: int) -> list[tuple[int, int, bool]]:
    runs: list[tuple[int, int, bool]] = []
    for i in range(lo, hi):
        value = bool(bits[i])
        if runs and runs[-1][2] == value:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1, value)
        else:
            runs.append((i, 1, value))
    return runs


def bits_of(data: bytes) -> list[int]:
    return [(data[i // 8] >> (i % 8)) & 1 for i in range(8 * len(data))]


@settings(max_examples=300)
@given(st.binary(min_size=1, max_size=700), st.data())
def test_iter_runs_and_popcount_match_the_model(data, draw):
    bits = bits_of(data)
    lo = draw.draw(st.integers(0, len(bits) - 1))
    hi = draw.draw(st.integers(lo, len(bits)))
    assert list(iter_runs(data, 0, lo, hi)) == model_runs(bits, lo, hi)
    assert popcount(data, 0, lo, hi) == sum(bits[lo:hi])


@settings(max_examples=300)
@given(st.lists(st.sampled_from([0, 0xFF, 0x0F, 0x80, 0x01, 0x5A]) | st.integers(0, 255), min_size=1, max_size=80),
       st.data())  # fmt: skip
def test_bit_edges_are_where_the_models_runs_start(raw, draw):
    data = bytes(raw)
    bits = bits_of(data)
    lo = draw.draw(st.integers(0, len(bits) - 1))
    top = draw.draw(st.integers(lo, len(bits)))
    hi = draw.draw(st.integers(max(top, lo + 1), len(bits) + 20))
    clear_from_top = bits[:top] + [0] * (hi - top)
    runs = model_runs(clear_from_top, lo, hi)
    edges, first = bit_edges(data, 0, lo, top, hi)
    assert edges.tolist() == [start - lo for start, _, _ in runs[1:]]
    assert first == runs[0][2]


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_file_bitmap_runs_count_and_set_range(data):
    # tiny windows and chunks so that a small bitmap crosses many of them
    old = (bm.WINDOW, bm.CHUNK, bm.CACHE_CHUNKS)
    bm.WINDOW, bm.CHUNK, bm.CACHE_CHUNKS = 7, 5, 2
    try:
        nbytes = data.draw(st.integers(1, 80))
        content = bytearray(data.draw(st.binary(min_size=nbytes, max_size=nbytes)))
        nbits = data.draw(st.integers(1, 8 * nbytes))
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "bits")
            offset = 13
            with open(path, "wb") as f:
                f.write(b"H" * offset + bytes(content) + b"T" * 9)
            fd = os.open(path, os.O_RDWR)
            try:
                bitmap = Bitmap(fd, offset, nbytes, nbits)
                for _ in range(data.draw(st.integers(1, 6))):
                    model = bits_of(bytes(content))[:nbits]
                    lo = data.draw(st.integers(0, nbits - 1))
                    hi = data.draw(st.integers(lo, nbits))
                    assert list(bitmap.runs(lo, hi)) == model_runs(model, lo, hi)
                    assert bitmap.runs_list(lo, hi) == model_runs(model, lo, hi)
                    assert bitmap.count(lo, hi) == sum(model[lo:hi])
                    assert bitmap.test(lo) == bool(model[lo])
                    a = data.draw(st.integers(0, nbits - 1))
                    b = data.draw(st.integers(a, nbits))
                    bitmap.set_range(a, b)
                    for i in range(a, b):
                        content[i // 8] |= 1 << (i % 8)
                    with open(path, "rb") as f:
                        on_disk = f.read()
                    assert on_disk == b"H" * offset + bytes(content) + b"T" * 9  # nothing outside the bitmap
                # bits past nbits read as clear, and runs past the bitmap's end are clear
                assert list(bitmap.runs(0, nbits + 5))[-1][2] is False
            finally:
                os.close(fd)
    finally:
        bm.WINDOW, bm.CHUNK, bm.CACHE_CHUNKS = old


def model_mixed_pages(bits: list[int]) -> list[int]:
    """Pages (8 bits each, the last one possibly shorter) whose bits are neither all set nor all clear."""
    return [p for p in range(-(-len(bits) // 8)) if 0 < sum(bits[8 * p : 8 * p + 8]) < len(bits[8 * p : 8 * p + 8])]


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_scan_and_summary_count_bits_and_mixed_pages_like_the_model(data):
    old = (bm.WINDOW, bm.CHUNK, bm.CACHE_CHUNKS)
    window = data.draw(st.sampled_from([1, 3, 8, 9, 64]))
    bm.WINDOW, bm.CHUNK, bm.CACHE_CHUNKS = window, 5, 2
    try:
        nbytes = data.draw(st.integers(1, 120))
        # bytes of real bitmaps: mostly 0x00 and 0xFF (whole pages, 64-bit words skipped), some mixed
        byte = st.one_of(st.sampled_from([0, 0xFF]), st.integers(0, 255))
        content = bytes(data.draw(st.lists(byte, min_size=nbytes, max_size=nbytes)))
        nbits = data.draw(st.integers(1, 8 * nbytes))
        model = bits_of(content)[:nbits]
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "bits")
            with open(path, "wb") as f:
                f.write(b"H" * 5 + content + b"\xff" * 9)
            fd = os.open(path, os.O_RDWR)
            try:
                bitmap = Bitmap(fd, 5, nbytes, nbits)
                limit = data.draw(st.integers(0, 20))
                expected = model_mixed_pages(model)
                assert bitmap.summary(limit) == (sum(model), len(expected), expected[:limit])
                assert bitmap.count_mixed(limit) == (len(expected), expected[:limit])
                assert [int(p) for pages, _ in bitmap.mixed() for p in pages] == expected
                lo = data.draw(st.integers(0, len(content)))
                hi = data.draw(st.integers(lo, len(content)))
                got = [int(p) for pages, _ in bitmap.mixed(lo, hi) for p in pages]
                assert got == [p for p in expected if lo <= p < hi]
            finally:
                os.close(fd)
    finally:
        bm.WINDOW, bm.CHUNK, bm.CACHE_CHUNKS = old


def test_page_bytes_and_lookups_from_many_threads_share_the_cache(tmp_path):
    """Readers of one image look bits up from several threads at once: with a cache of two tiny chunks,
    evictions race with lookups, and every answer still matches the file."""
    import random
    import sys
    import threading

    old = (bm.CHUNK, bm.CACHE_CHUNKS)
    bm.CHUNK, bm.CACHE_CHUNKS = 5, 2
    rng = random.Random(4)
    content = bytes(rng.choice([0, 0xFF, rng.randrange(256)]) for _ in range(400))
    model = bits_of(content)
    path = tmp_path / "bits"
    path.write_bytes(b"H" * 7 + content)
    fd = os.open(path, os.O_RDONLY)
    failures: list[str] = []
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        bitmap = Bitmap(fd, 7, len(content), 8 * len(content))

        def lookups(seed: int) -> None:
            r = random.Random(seed)
            try:
                for _ in range(3000):
                    start = r.randrange(len(content))
                    end = r.randrange(start + 1, min(len(content), start + 12) + 1)
                    buf, base = bitmap.page_bytes(start, end)
                    if bytes(buf[start - base : end - base]) != content[start:end]:
                        failures.append(f"page_bytes({start}, {end})")
                    lo = r.randrange(8 * len(content))
                    hi = min(8 * len(content), lo + r.randrange(1, 60))
                    if bitmap.runs_list(lo, hi) != model_runs(model, lo, hi):
                        failures.append(f"runs_list({lo}, {hi})")
            except Exception as exc:  # a thread cannot fail the test itself: reported below
                failures.append(repr(exc))

        threads = [threading.Thread(target=lookups, args=(seed,)) for seed in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
        bm.CHUNK, bm.CACHE_CHUNKS = old
        os.close(fd)
    assert not failures, failures[:5]


def test_a_chunk_evicted_by_another_reader_between_lookup_and_touch_is_still_served(tmp_path):
    """The race the threaded test above hits only now and then, made certain: another reader evicts the chunk
    just after this one found it in the cache."""
    from collections import OrderedDict

    class EvictedRightAfterLookup(OrderedDict):
        def get(self, key, default=None):
            value = super().get(key, default)
            if value is not None:
                del self[key]
            return value

    content = bytes(range(256)) * 2
    path = tmp_path / "bits"
    path.write_bytes(content)
    fd = os.open(path, os.O_RDONLY)
    try:
        bitmap = Bitmap(fd, 0, len(content), 8 * len(content))
        bitmap._cache = EvictedRightAfterLookup()
        for start in (3, 3, 300, 3):
            buf, base = bitmap.page_bytes(start, start + 4)
            assert bytes(buf[start - base : start - base + 4]) == content[start : start + 4]
    finally:
        os.close(fd)
