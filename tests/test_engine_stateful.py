"""A random walk over a COW disk checked against a bytearray model.

Reads, unaligned writes (crossing sectors, runs and the partial last sector of
an odd-size disk), write_zeroes/discard, writes past the end, and close/reopen,
on small disks made with ``ubdcow.create`` on random backing files.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import tempfile

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import ubdcow

SECTOR = 512
SIZES = [65536, 50001]  # a whole number of sectors, and 97 sectors + 337 bytes
# tmpfs when there is one: the engine fsyncs on close, and a failing run replays thousands of examples
FAST_TMP = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


class CowDiskMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="ubdcow-stateful-", dir=FAST_TMP)
        self.img: ubdcow.CowImage | None = None

    @initialize(size=st.sampled_from(SIZES), seed=st.integers(0, 2**32 - 1))
    def make_disk(self, size: int, seed: int) -> None:
        rng = random.Random(seed)
        self.size = size
        self.backing = os.path.join(self.dir, "backing.img")
        self.cow = os.path.join(self.dir, "disk.cow")
        self.backing_bytes = rng.randbytes(size).replace(b"\0", b"\1")  # never zero: zeros are not backing data
        with open(self.backing, "wb") as f:
            f.write(self.backing_bytes)
        ubdcow.create(self.cow, self.backing)
        self.model = bytearray(self.backing_bytes)
        self.cow_sectors: set[int] = set()  # sectors whose bit must be set
        self.img = ubdcow.open(self.cow, "r+")

    # -- strategies over the current disk ------------------------------------------
    def _range(self, data: st.DataObject, max_len: int = 6000) -> tuple[int, int]:
        """An in-range (offset, length), biased towards sector edges and the end of the disk."""
        near = st.sampled_from(
            [
                0,
                SECTOR - 1,
                SECTOR,
                SECTOR + 1,
                4095,
                4096,
                self.size - SECTOR - 1,
                self.size // SECTOR * SECTOR,
                self.size - 1,
                self.size,
            ]
        )
        offset = data.draw(st.one_of(st.integers(0, self.size), near), label="offset")
        offset = min(offset, self.size)
        length = data.draw(
            st.one_of(st.integers(0, min(max_len, self.size - offset)), st.just(self.size - offset)), label="length"
        )
        return offset, length

    def _touch(self, offset: int, length: int) -> None:
        """Every write covers the whole 4 KiB pages it touches (the last page of the disk may be short)."""
        if length:
            sectors = -(-self.size // SECTOR)
            self.cow_sectors.update(range(offset // 4096 * 8, min(-(-(offset + length) // 4096) * 8, sectors)))

    # -- rules -----------------------------------------------------------------------
    @precondition(lambda self: self.img is not None)
    @rule(data=st.data())
    def pread(self, data: st.DataObject) -> None:
        offset = data.draw(st.integers(0, self.size + 1000), label="offset")
        length = data.draw(st.integers(0, 9000), label="length")
        assert self.img.pread(length, offset) == self.model[offset : offset + length]

    @precondition(lambda self: self.img is not None)
    @rule(data=st.data(), chunk=st.sampled_from([1, 333, 511, 512, 513, 4097]))
    def seek_and_readinto(self, data: st.DataObject, chunk: int) -> None:
        offset, length = self._range(data)
        length = min(length, 40 * chunk)  # keep byte-at-a-time reads short
        self.img.seek(offset)
        got = bytearray()
        buf = bytearray(chunk)
        while len(got) < length:
            n = self.img.readinto(memoryview(buf)[: min(chunk, length - len(got))])
            if n == 0:
                break
            got += buf[:n]
        assert got == self.model[offset : offset + length]
        assert self.img.tell() == offset + len(got)

    @precondition(lambda self: self.img is not None and self.img.mode == "r+")
    @rule(data=st.data(), byte=st.integers(0, 255))
    def pwrite(self, data: st.DataObject, byte: int) -> None:
        offset, length = self._range(data)
        payload = ((bytes(range(byte, 256)) + bytes(range(byte))) * (length // 256 + 1))[:length]
        assert self.img.pwrite(payload, offset) == length
        self.model[offset : offset + length] = payload
        self._touch(offset, length)

    @precondition(lambda self: self.img is not None and self.img.mode == "r+")
    @rule(data=st.data(), seed=st.integers(0, 2**32 - 1))
    def sequential_write(self, data: st.DataObject, seed: int) -> None:
        offset, length = self._range(data)
        payload = random.Random(seed).randbytes(length)
        self.img.seek(offset)
        assert self.img.write(payload) == length
        assert self.img.tell() == offset + length
        self.model[offset : offset + length] = payload
        self._touch(offset, length)

    @precondition(lambda self: self.img is not None and self.img.mode == "r+")
    @rule(data=st.data(), method=st.sampled_from(["write_zeroes", "discard"]))
    def zero(self, data: st.DataObject, method: str) -> None:
        offset, length = self._range(data, max_len=30000)
        getattr(self.img, method)(offset, length)
        self.model[offset : offset + length] = bytes(length)
        self._touch(offset, length)

    @precondition(lambda self: self.img is not None and self.img.mode == "r+")
    @rule(data=st.data())
    def write_past_end(self, data: st.DataObject) -> None:
        offset = data.draw(st.integers(max(0, self.size - 3000), self.size + 10), label="offset")
        length = data.draw(st.integers(self.size - offset + 1, self.size - offset + 3000), label="length")
        before = self.img.pread(self.size, 0)
        try:
            self.img.pwrite(b"\xee" * length, offset)
        except ubdcow.ImageRangeError:
            pass
        else:
            raise AssertionError(f"write of {length} at {offset} past the end of {self.size} was accepted")
        assert self.img.pread(self.size, 0) == before

    @precondition(lambda self: self.img is not None)
    @rule(mode=st.sampled_from(["r", "r+"]))
    def reopen(self, mode: str) -> None:
        self.img.close()
        self.img = ubdcow.open(self.cow, mode)

    @precondition(lambda self: self.img is not None and self.img.mode == "r")
    @rule()
    def read_only_refuses(self) -> None:
        try:
            self.img.pwrite(b"x", 0)
        except io.UnsupportedOperation:
            pass
        else:
            raise AssertionError("a read-only image accepted a write")
        self.img.close()
        self.img = ubdcow.open(self.cow, "r+")

    # -- invariants ------------------------------------------------------------------
    @invariant()
    def extents_match_written_sectors(self) -> None:
        if self.img is None:
            return
        got: set[int] = set()
        pos = 0
        for start, length, source in self.img.extents():
            assert start == pos and length > 0
            pos += length
            if source == "cow":
                got.update(range(start // SECTOR, -(-(start + length) // SECTOR)))
        assert pos == self.size
        assert got == self.cow_sectors

    @invariant()
    def no_mixed_pages(self) -> None:
        """Read from the file's own bitmap bytes: every page is all set or all clear (the disk starts empty)."""
        if self.img is None:
            return
        header = self.img.header
        with open(self.cow, "rb") as f:
            f.seek(header.bitmap_offset)
            raw = f.read(header.bitmap_len)
        sectors = header.sectors
        for page, byte in enumerate(raw):
            n = min(8, sectors - 8 * page)
            if n <= 0:
                break
            mask = (1 << n) - 1
            assert byte & mask in (0, mask), f"page {page} is mixed: bits {byte & mask:08b}"

    @invariant()
    def mapping_agrees_with_content(self) -> None:
        """A "zero" extent (set bits over a hole) reads as zeros; a "backing" one as the backing file."""
        if self.img is None:
            return
        for start, length, source, _ in self.img.mapping():
            want = self.model[start : start + length]
            if source == "zero":
                assert not any(want), (start, length)
            elif source == "backing":
                assert want == self.backing_bytes[start : start + length], (start, length)

    def teardown(self) -> None:
        try:
            if self.img is not None:
                self.img.close()
                with ubdcow.open(self.cow) as img:  # the whole disk, once more, after a clean close
                    assert img.read() == self.model
                with open(self.backing, "rb") as f:
                    assert f.read() == self.backing_bytes
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


CowDiskMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=50,
    deadline=None,
    report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TestCowDisk = CowDiskMachine.TestCase
