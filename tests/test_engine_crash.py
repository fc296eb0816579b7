"""Crash consistency: SIGKILL a writer at random moments, then check every sector.

The child writes an endless, seeded schedule of whole-sector ranges; write
number ``k`` fills sector ``s`` with a pattern naming ``(k, s)``, and some
operations are write_zeroes. It logs nothing. Because the schedule is
deterministic, the parent can replay it: after the kill, the disk must equal
"writes 0..k-1 complete" for some ``k``, except that sectors of write ``k``
(the one in flight) may hold either their old content or write ``k``'s. A set
bit over missing data (zeros where a pattern belongs), a torn sector, or a
sector from the wrong place fails.
"""

from __future__ import annotations

import inspect
import os
import random
import signal
import struct
import subprocess
import sys
import time

import ubdcow
from ubdcow.format import read_header

SECTOR = 512
SIZE = (1 << 20) + 300  # 2049 sectors, the last one partial
SECTORS = -(-SIZE // SECTOR)
TRIALS = int(os.environ.get("UBDCOW_CRASH_TRIALS", "60"))  # raise it for a longer campaign
BACKING = -1  # observed/model value: the sector reads from the backing file
ZERO = -2  # the sector reads as zeros (a write_zeroes)
MAGIC = b"UBDCOWWR"


# -- shared with the child (sent as source) ---------------------------------------------


def schedule(seed, sectors):
    """Endless ``(first_sector, count, kind)`` operations; kind is "write" or "zero"."""
    rng = random.Random(seed)
    while True:
        count = rng.choice([1, 1, 2, 3, 8, 16, rng.randint(1, 64), rng.randint(64, 512)])
        count = min(count, sectors)
        first = rng.choice([rng.randrange(sectors - count + 1), sectors - count])
        yield first, count, "zero" if rng.random() < 0.1 else "write"


def sector_pattern(wid, sector):
    """The 512 bytes write ``wid`` puts in ``sector``."""
    return struct.pack("<8sQQ", b"UBDCOWWR", wid, sector) * 21 + struct.pack("<Q", wid * 2654435761 + sector)


CHILD = "\n".join(
    [
        "import os, random, struct, sys",
        "import ubdcow",
        inspect.getsource(schedule),
        inspect.getsource(sector_pattern),
        """
cow, backing, seed, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
sectors = -(-size // 512)
img = ubdcow.open(cow, "r+", backing=backing)
os.write(1, b"R")
for wid, (first, count, kind) in enumerate(schedule(seed, sectors)):
    offset = first * 512
    length = min(count * 512, size - offset)
    if kind == "zero":
        img.write_zeroes(offset, length)
    else:
        img.pwrite(b"".join(sector_pattern(wid, s) for s in range(first, first + count))[:length], offset)
""",
    ]
)


# -- the parent's view -------------------------------------------------------------------


def sector_len(s: int) -> int:
    return min(SECTOR, SIZE - s * SECTOR)


def decode(disk: bytes, backing: bytes) -> list[int]:
    """What each sector holds: BACKING, ZERO or the id of the write whose whole pattern it is."""
    obs = []
    for s in range(SECTORS):
        a, n = s * SECTOR, sector_len(s)
        got = disk[a : a + n]
        if got == backing[a : a + n]:
            obs.append(BACKING)
        elif got == bytes(n):
            obs.append(ZERO)
        elif got[:8] == MAGIC:
            wid = struct.unpack_from("<Q", got, 8)[0]
            assert got == sector_pattern(wid, s)[:n], f"sector {s} is torn or mixed (starts like write {wid})"
            obs.append(wid)
        else:
            raise AssertionError(f"sector {s} holds neither backing data, zeros nor a write's pattern")
    return obs


def replay(seed: int, obs: list[int], limit: int = 200_000) -> int:
    """The ``k`` such that obs == "writes 0..k-1 done, write k maybe partly"; fails if there is none."""
    model = [BACKING] * SECTORS
    mismatched = {s for s in range(SECTORS) if obs[s] != model[s]}
    for k, (first, count, kind) in enumerate(schedule(seed, SECTORS)):
        value = ZERO if kind == "zero" else k
        inflight = range(first, first + count)
        if len(mismatched) <= count and all(s in inflight for s in mismatched):
            if all(obs[s] in (model[s], value) for s in inflight):
                return k
        for s in inflight:
            model[s] = value
            if obs[s] == value:
                mismatched.discard(s)
            else:
                mismatched.add(s)
        assert k < limit, "no prefix of the schedule explains the disk"
    raise AssertionError("unreachable")


def check_raw_file(cow: str, backing: bytes) -> int:
    """Every set bit's data sector, read from the COW file itself, is one whole pattern, all zeros, or the
    backing file's sector (the rest of a page a write made whole)."""
    header = read_header(cow)
    with open(cow, "rb") as f:
        f.seek(header.bitmap_offset)
        bitmap = f.read(header.bitmap_len)
        f.seek(header.data_offset)
        data = f.read()
    set_bits = 0
    for s in range(SECTORS):
        if not bitmap[s // 8] >> (s % 8) & 1:
            continue
        set_bits += 1
        n = sector_len(s)
        got = data[s * SECTOR : s * SECTOR + n]
        assert len(got) == n, f"sector {s}: bit set past the end of the file"
        if got != bytes(n) and got != backing[s * SECTOR : s * SECTOR + n]:
            wid = struct.unpack_from("<Q", got, 8)[0] if got[:8] == MAGIC else None
            assert wid is not None and got == sector_pattern(wid, s)[:n], f"bit {s} set over a torn sector"
    return set_bits


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
        obs = decode(disk, backing)
        k = replay(seed, obs)
        set_bits = check_raw_file(cow, backing)
        assert set_bits >= sum(1 for v in obs if v != BACKING)
        progress.append(k)
        os.unlink(cow)
    assert os.stat(backing_path).st_mtime_ns == mtime_ns and backing_path.read_bytes() == backing
    # the kills must have landed inside the write loop, not only before it
    assert sum(1 for k in progress if k > 0) >= TRIALS // 5, progress
