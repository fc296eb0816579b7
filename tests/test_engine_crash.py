"""Crash consistency: SIGKILL a writer at random moments, then check every sector.

The child runs an endless, seeded schedule: whole-sector writes, write_zeroes, and writes of any byte
range (part of a sector, across sectors and pages: the write path reads the rest of each page and writes
it whole). Write number ``k`` puts in byte ``b`` of sector ``s`` byte ``b`` of a pattern naming
``(k, s)``. It logs nothing. Because the schedule is deterministic, the parent can replay it on a model
of the disk's bytes: after the kill, the disk must equal "operations 0..k-1 complete" for some ``k``,
except that the sectors of operation ``k`` (the one in flight) may each hold their old or their new
content -- never a mix. The disk is read twice: by ubdcow, and by an independent reader that decodes
the COW file's bitmap and data area from the spec (a set bit over missing data reads zeros there).
"""

from __future__ import annotations

import inspect
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from test_oracle_model import decode

import ubdcow

SECTOR = 512
PAGE = 4096
SIZE = (1 << 20) + 300  # 2049 sectors, the last one partial
SECTORS = -(-SIZE // SECTOR)
TRIALS = int(os.environ.get("UBDCOW_CRASH_TRIALS", "60"))  # raise it for a longer campaign


# -- shared with the child (sent as source) ---------------------------------------------


def schedule(seed, size):
    """Endless ``(offset, length, kind)`` operations; kind is "write", "bytes" (any byte range) or "zero"."""
    rng = random.Random(seed)
    sectors = -(-size // 512)
    while True:
        if rng.random() < 0.35:  # a byte range: part of a sector, or across sectors and pages
            length = rng.choice([1, 7, 100, 511, 513, rng.randint(1, 4096), rng.randint(4096, 3 * 4096)])
            length = min(length, size)
            offset = rng.choice([rng.randrange(size - length + 1), size - length])
            yield offset, length, "bytes"
            continue
        count = rng.choice([1, 1, 2, 3, 8, 16, rng.randint(1, 64), rng.randint(64, 512)])
        count = min(count, sectors)
        first = rng.choice([rng.randrange(sectors - count + 1), sectors - count])
        yield first * 512, min(count * 512, size - first * 512), "zero" if rng.random() < 0.1 else "write"


def sector_pattern(wid, sector):
    """The 512 bytes write ``wid`` puts in ``sector`` (or the part of them it covers)."""
    return struct.pack("<8sQQ", b"UBDCOWWR", wid, sector) * 21 + struct.pack("<Q", wid * 2654435761 + sector)


def write_bytes(wid, offset, length):
    """The bytes write ``wid`` puts at [offset, offset + length)."""
    first, last = offset // 512, (offset + length + 511) // 512
    whole = b"".join(sector_pattern(wid, s) for s in range(first, last))
    return whole[offset - first * 512 : offset - first * 512 + length]


CHILD = "\n".join(
    [
        "import os, random, struct, sys",
        "import ubdcow",
        inspect.getsource(schedule),
        inspect.getsource(sector_pattern),
        inspect.getsource(write_bytes),
        """
cow, backing, seed, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
img = ubdcow.open(cow, "r+", backing=backing)
os.write(1, b"R")
for wid, (offset, length, kind) in enumerate(schedule(seed, size)):
    if kind == "zero":
        img.write_zeroes(offset, length)
    else:
        img.pwrite(write_bytes(wid, offset, length), offset)
""",
    ]
)


# -- the parent's view -------------------------------------------------------------------


def _sectors(a: bytes | np.ndarray) -> np.ndarray:
    """A disk's bytes as rows of sectors (the last one padded with zeros)."""
    arr = np.zeros(SECTORS * SECTOR, dtype=np.uint8)
    arr[:SIZE] = np.frombuffer(a, dtype=np.uint8) if isinstance(a, bytes) else a
    return arr.reshape(SECTORS, SECTOR)


def replay(seed: int, disk: bytes, backing: bytes, limit: int = 200_000) -> int:
    """The ``k`` such that the disk is "operations 0..k-1 done, operation k maybe partly, whole sectors
    each"; fails if there is none."""
    obs = _sectors(disk)
    model = _sectors(backing)
    mismatched = (model != obs).any(axis=1)
    wrong = int(mismatched.sum())
    for k, (offset, length, kind) in enumerate(schedule(seed, SIZE)):
        lo, hi = offset // SECTOR, -(-(offset + length) // SECTOR)
        new = model[lo:hi].copy()
        flat = new.reshape(-1)
        start = offset - lo * SECTOR
        flat[start : start + length] = 0 if kind == "zero" else np.frombuffer(write_bytes(k, offset, length), np.uint8)
        if hi * SECTOR > SIZE:  # bytes past the disk's end stay zero
            flat[SIZE - lo * SECTOR :] = 0
        inside = int(mismatched[lo:hi].sum())
        if wrong == inside:  # every mismatch lies in operation k's sectors
            old_ok = (model[lo:hi] == obs[lo:hi]).all(axis=1)
            new_ok = (new == obs[lo:hi]).all(axis=1)
            if (old_ok | new_ok).all():
                return k
        model[lo:hi] = new
        now = (new != obs[lo:hi]).any(axis=1)
        wrong += int(now.sum()) - inside
        mismatched[lo:hi] = now
        assert k < limit, "no prefix of the schedule explains the disk (a torn or misplaced sector)"
    raise AssertionError("unreachable")


def open_after_kill(cow: str, backing) -> ubdcow.CowImage:
    """Open for reading once the dead child's lock is gone.

    On this kernel the lock of a SIGKILLed process can outlive ``wait()`` by
    some milliseconds (the file is released by deferred work), so retry briefly.
    """
    deadline = time.monotonic() + 5
    while True:
        try:
            return ubdcow.open(cow, backing=backing)
        except ubdcow.ImageLockedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def test_sigkill_leaves_every_sector_consistent(tmp_path) -> None:
    rng = random.Random(20240607)
    backing_path = tmp_path / "backing.img"
    backing = bytes(b | 1 for b in rng.randbytes(SIZE))  # no zero bytes: zeros are never backing data
    backing_path.write_bytes(backing)
    mtime_ns = os.stat(backing_path).st_mtime_ns
    progress = []
    for trial in range(TRIALS):
        seed = rng.randrange(2**32)
        cow = str(tmp_path / f"trial{trial}.cow")
        ubdcow.create(cow, backing_path)
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, cow, str(backing_path), str(seed), str(SIZE)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        ready = child.stdout.read(1)
        time.sleep(rng.choice([0, 0.001, rng.uniform(0, 0.01), rng.uniform(0, 0.08)]))
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        err = child.stderr.read().decode(errors="replace")
        child.stdout.close()
        child.stderr.close()
        assert ready == b"R" and child.returncode == -signal.SIGKILL, (child.returncode, err)

        with open_after_kill(cow, backing_path) as img:
            disk = img.read()
        assert len(disk) == SIZE
        raw = decode(Path(cow).read_bytes(), backing)[0]
        assert disk == raw, f"trial {trial}: ubdcow reads another disk than the file's bytes define"
        k = replay(seed, disk, backing)
        # the pages the schedule touched are all set: no page is left mixed
        assert ubdcow.check(cow).mixed_pages == 0, trial
        progress.append(k)
        os.unlink(cow)
    assert os.stat(backing_path).st_mtime_ns == mtime_ns and backing_path.read_bytes() == backing
    # the kills must have landed inside the write loop, not only before it
    assert sum(1 for k in progress if k > 0) >= TRIALS // 5, progress


def test_two_threads_writing_overlapping_partial_sectors_leave_one_result_per_sector(tmp_path) -> None:
    """Two threads write overlapping byte ranges (parts of sectors, across sectors and pages) into one
    CowImage at once; afterwards each sector holds the content one of the orders of the two writes gives
    it, never a mix of the two. Each round checks both what ubdcow reads and the file's own bytes."""
    rng = random.Random(77)
    size = 64 * PAGE
    backing_path = tmp_path / "backing.img"
    backing = bytes(b | 1 for b in rng.randbytes(size))
    backing_path.write_bytes(backing)
    cow = tmp_path / "o.cow"
    ubdcow.create(cow, backing_path)
    orders = {"a-then-b": 0, "b-then-a": 0, "both": 0}
    with ubdcow.open(cow, "r+") as img:
        for rnd in range(300):
            a_len = rng.choice([1, 50, 300, SECTOR + 1, rng.randint(1, 2 * PAGE)])
            b_len = rng.choice([1, 50, 300, SECTOR + 1, rng.randint(1, 2 * PAGE)])
            a_off = rng.randrange(PAGE, size - 3 * PAGE)
            b_off = rng.randint(a_off - b_len + 1, a_off + a_len - 1)  # B overlaps A
            a, b = rng.randbytes(a_len), rng.randbytes(b_len)
            before = img.pread(size, 0)
            barrier = threading.Barrier(2)
            errors: list[BaseException] = []
            threads = [threading.Thread(target=_writer, args=(img, data, off, barrier, errors))
                       for data, off in ((a, a_off), (b, b_off))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not errors, errors
            ab = bytearray(before)
            ab[a_off : a_off + a_len] = a
            ab[b_off : b_off + b_len] = b
            ba = bytearray(before)
            ba[b_off : b_off + b_len] = b
            ba[a_off : a_off + a_len] = a
            got = img.pread(size, 0)
            img.flush()
            raw = decode(Path(cow).read_bytes(), backing)[0]
            assert raw == got, f"round {rnd}: ubdcow reads another disk than the file's bytes define"
            for s in range(min(a_off, b_off) // SECTOR, -(-max(a_off + a_len, b_off + b_len) // SECTOR)):
                x, y = s * SECTOR, (s + 1) * SECTOR
                assert got[x:y] in (ab[x:y], ba[x:y]), f"round {rnd}: sector {s} mixes the two writes"
            assert got[: min(a_off, b_off)] == before[: min(a_off, b_off)]
            end = max(a_off + a_len, b_off + b_len)
            assert got[end:] == before[end:], f"round {rnd}: bytes past both writes changed"
            orders["a-then-b" if got == bytes(ab) else "b-then-a" if got == bytes(ba) else "both"] += 1
    assert ubdcow.check(cow).mixed_pages == 0
    print(f"OBSERVED: final orders over 300 rounds: {orders}")


def _writer(img: ubdcow.CowImage, data: bytes, offset: int, barrier: threading.Barrier,
            errors: list[BaseException]) -> None:
    """One of the two threads: the same write a few times (more chances to interleave), after the other
    thread is ready."""
    try:
        barrier.wait()
        for _ in range(3):
            img.pwrite(data, offset)
    except BaseException as exc:
        errors.append(exc)
