"""The engine against a real User-Mode Linux guest (Debian's linux.uml), byte for byte.

Each test boots the real kernel with the COW file as /dev/ubdb and compares
what the guest sees (or wrote) with what :func:`ubdcow.open` reads (or wrote).

The guest always reads the device with ``iflag=direct`` and 4 KiB or 512-byte
blocks: this kernel returns wrong data for any read request larger than
4 KiB over a range that mixes COW and backing sectors, and *buffered* reads
produce such requests through readahead even with ``dd bs=4096`` (observed:
a buffered ``bs=4096`` dump had sector 16 holding backing sector 12).
"""

from __future__ import annotations

import os
import random
import select
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import require_tool
from support.uml import FAIL, Guest, checked, guest, need_guest_tools, run_guest, ubd_arg
from support.uml import kernel as uml_kernel

import ubdcow

pytestmark = pytest.mark.uml


@pytest.fixture(autouse=True)
def _kernel() -> str:
    """Skip (or fail under UBDCOW_REQUIRE_UML=1) before any work when the UML kernel is absent."""
    return uml_kernel()

SECTOR = 512
GiB = 1 << 30


# -- helpers -------------------------------------------------------------------


def q(path: str | os.PathLike[str]) -> str:
    return shlex.quote(os.path.abspath(path))


def run_checked(script: str, *ubd: str, workdir: Path) -> Guest:
    """Run a guest to the end of ``script`` and assert no checked command failed."""
    result = guest(script, *ubd, workdir=workdir)
    failures = [line for line in result.console.splitlines() if FAIL in line]
    assert not failures, "guest commands failed:\n" + "\n".join(failures) + "\nconsole tail:\n" + result.console[-3000:]
    return result


def first_difference(a: bytes | bytearray, b: bytes | bytearray) -> str:
    n = min(len(a), len(b))
    bad = [i for i in range(0, n, SECTOR) if a[i : i + SECTOR] != b[i : i + SECTOR]]
    if not bad and len(a) == len(b):
        return "equal"
    where = f"first differing sector {bad[0] // SECTOR} (byte {bad[0]}), {len(bad)} sectors differ" if bad else ""
    return f"lengths {len(a)} vs {len(b)}; {where}"


def assert_same(actual: bytes | bytearray, expected: bytes | bytearray, what: str) -> None:
    # Never let pytest diff megabytes: say where they differ.
    assert bytes(actual) == bytes(expected), f"{what}: {first_difference(actual, expected)}"


def make_backing(path: Path, size: int, rng: random.Random) -> bytes:
    data = rng.randbytes(size)
    # a few all-zero and constant stretches, so zero-skipping shortcuts get exercised
    for _ in range(4):
        off = rng.randrange(0, size - 8192)
        data = data[:off] + bytes([rng.choice((0, 0xFF))]) * 8192 + data[off + 8192 :]
    path.write_bytes(data)
    return data


def guest_dump_lines(dump: Path, *, bs: int = 4096) -> str:
    """Dump the whole device with direct reads of ``bs`` bytes (never larger than 4 KiB)."""
    assert bs <= 4096
    return checked(f"dd if=/dev/ubdb of={q(dump)} bs={bs} iflag=direct status=none")


def device_length(size: int) -> int:
    """The guest's /dev/ubdb is ceil(size / 512) sectors."""
    return -(-size // SECTOR) * SECTOR


def dd_write_line(payload: Path, first: int, sectors: int, bs_sectors: int) -> str:
    """A guest line writing ``payload`` at sector ``first`` with direct requests of ``bs_sectors`` sectors."""
    assert sectors % bs_sectors == 0 and os.path.getsize(payload) == sectors * SECTOR
    bs = bs_sectors * SECTOR
    if first % bs_sectors == 0:
        seek = f"seek={first // bs_sectors} oflag=direct"
    else:  # dd seeks in units of bs: give an odd start in bytes
        seek = f"seek={first * SECTOR} oflag=direct,seek_bytes"
    return checked(f"dd if={q(payload)} of=/dev/ubdb bs={bs} {seek} count={sectors // bs_sectors} conv=notrunc "
                   "status=none")


def guest_writes(
    tmp_path: Path, model: bytearray, size: int, rng: random.Random, count: int
) -> tuple[str, list[tuple[int, int]]]:
    """Random direct sector writes and multi-sector runs: script lines, and the model updated."""
    lines = []
    nsect = device_length(size) // SECTOR
    payload_dir = tmp_path / "payload"
    payload_dir.mkdir(exist_ok=True)
    done: list[tuple[int, int]] = []
    specs: list[tuple[int, int, int]] = []  # (first sector, sectors, dd block size in sectors)
    for _ in range(count):
        specs.append((rng.randrange(nsect), 1, 1))
    specs += [
        (rng.randrange(nsect - 40), rng.randrange(2, 40), 1),  # a run of 512-byte direct writes
        (rng.randrange(nsect - 40), rng.randrange(2, 40), 1),
        (7, 9, 9),  # one 4.5 KiB request at an odd sector
        (rng.randrange(nsect - 64), 24, 24),  # one 12 KiB request
        (rng.randrange(nsect - 64) | 1, 64, 8),  # 4 KiB requests at an odd sector
        (0, 1, 1),  # the first sector
        (nsect - 1, 1, 1),  # the last (maybe partial) sector
        (nsect - 3, 3, 3),
    ]
    for i, (first, count_sectors, bs_sectors) in enumerate(specs):
        data = rng.randbytes(count_sectors * SECTOR)
        payload = payload_dir / f"w{i}"
        payload.write_bytes(data)
        lines.append(dd_write_line(payload, first, count_sectors, bs_sectors))
        start = first * SECTOR
        end = min(start + len(data), size)
        model[start:end] = data[: end - start]
        done.append((start, len(data)))
    return "".join(lines), done


# -- (a) guest writes and discards, ubdcow reads -----------------------------------


def test_guest_writes_and_discards_read_back_by_ubdcow(tmp_path: Path) -> None:
    rng = random.Random(0xA11CE)
    size = 4 * 1024 * 1024 + 1000  # a partial last sector
    backing = tmp_path / "backing.img"
    cow = tmp_path / "overlay.cow"
    model = bytearray(make_backing(backing, size, rng))
    ubdcow.create(cow, backing)
    nsect = device_length(size) // SECTOR

    script = need_guest_tools("dd", "blkdiscard")
    writes, done = guest_writes(tmp_path, model, size, rng, count=60)
    script += writes
    zeroed: list[tuple[int, int]] = []
    discards = [
        ("", 4096 * 3, 4096 * 5),  # page aligned: holes in the data area
        ("", 512 * 33, 512 * 7),  # sector aligned only
        ("-z ", 512 * 101, 512 * 300),  # write-zeroes over a range that may hold guest writes
        ("", (nsect - 2) * SECTOR, 2 * SECTOR),  # the tail, partial last sector included
        ("-z ", 0, 1024),
    ]
    # discard the middle of the guest's longest write: zeros must beat COW data, not only backing data
    start, length = max(done, key=lambda w: w[1])
    assert length >= 8 * SECTOR
    discards.append(("", start + 2 * SECTOR, length - 4 * SECTOR))
    discards.append(("-z ", 1024 * 1024 + 512, 70 * 1024))  # > discard_max_bytes (32 KiB): split by the kernel
    for flag, off, length in discards:
        script += checked(f"blkdiscard -f {flag}-o {off} -l {length} /dev/ubdb")
        model[off : min(off + length, size)] = bytes(min(off + length, size) - off)
        zeroed.append((off, min(off + length, size) - off))
    # a write after a discard, over part of it: the newest data wins
    late = rng.randbytes(3 * SECTOR)
    (tmp_path / "late").write_bytes(late)
    script += dd_write_line(tmp_path / "late", 4096 * 3 // SECTOR + 5, 3, 1)
    model[4096 * 3 + 5 * SECTOR : 4096 * 3 + 8 * SECTOR] = late
    zeroed[0] = (4096 * 3, 5 * SECTOR)
    dump1 = tmp_path / "dump-same-boot.img"
    script += guest_dump_lines(dump1, bs=4096)
    run_checked(script, ubd_arg(cow), workdir=tmp_path)

    # a second boot reads what the first left in the file
    dump2 = tmp_path / "dump-second-boot.img"
    run_checked(guest_dump_lines(dump2, bs=512), ubd_arg(cow), workdir=tmp_path)

    with ubdcow.open(cow) as disk:
        ours = disk.read()
        assert disk.size == size
        for off, length in zeroed:
            assert disk.pread(length, off) == bytes(length), f"discarded [{off}, +{length}) does not read as zeros"
        mapping = list(disk.mapping(4096 * 3 + 8 * SECTOR, 4096 * 5 - 8 * SECTOR))
    # what the kernel did with the page-aligned discard: bits set over a hole, reported as "zero"
    assert {e.source for e in mapping} == {"zero"}, mapping

    for dump in (dump1, dump2):
        guest_view = dump.read_bytes()
        assert len(guest_view) == device_length(size)
        assert_same(guest_view[:size], model, f"guest dump {dump.name} vs model")
    assert_same(ours, model, "ubdcow read vs model")
    assert_same(ours, dump2.read_bytes()[:size], "ubdcow read vs guest dump")


# -- (b) ubdcow writes unaligned ranges, the guest reads ---------------------------


def test_ubdcow_unaligned_writes_read_by_guest(tmp_path: Path) -> None:
    rng = random.Random(0xB0B)
    size = 3 * 1024 * 1024 + 777
    backing = tmp_path / "backing.img"
    cow = tmp_path / "overlay.cow"
    model = bytearray(make_backing(backing, size, rng))
    ubdcow.create(cow, backing)

    with ubdcow.open(cow, "r+") as disk:
        for _ in range(400):
            kind = rng.random()
            off = rng.randrange(size)
            length = min(rng.choice((1, 2, 511, 513, rng.randrange(1, 700), rng.randrange(1, 20000))), size - off)
            if kind < 0.7:
                data = rng.randbytes(length)
                assert disk.pwrite(data, off) == length
                model[off : off + length] = data
            elif kind < 0.85:
                disk.write_zeroes(off, length)
                model[off : off + length] = bytes(length)
            else:
                disk.discard(off, length)
                model[off : off + length] = bytes(length)
        # edges: the first and last bytes, zeros through the end of the disk, sub-sector and straddling zeroing
        disk.pwrite(b"\x5a", 0)
        model[0:1] = b"\x5a"
        disk.write_zeroes(size - 3000, 3000)  # through the partial last sector
        model[size - 3000 : size] = bytes(3000)
        disk.pwrite(b"\xa5", size - 1)
        model[size - 1 : size] = b"\xa5"
        disk.discard(size - 5000, 1990)  # unaligned both ends, near the end
        model[size - 5000 : size - 3010] = bytes(1990)
        disk.discard(1_000_003, 100)
        model[1_000_003:1_000_103] = bytes(100)
        disk.write_zeroes(2 * 1024 * 1024 - 1, 70_001)
        model[2 * 1024 * 1024 - 1 : 2 * 1024 * 1024 + 70_000] = bytes(70_001)
        # the position-based API too
        disk.seek(123_457)
        disk.write(b"positional write")
        model[123_457 : 123_457 + 16] = b"positional write"
    with ubdcow.open(cow) as disk:
        assert_same(disk.read(), model, "ubdcow read-back vs model")

    dump4k = tmp_path / "dump4k.img"
    dump512 = tmp_path / "dump512.img"
    run_checked(guest_dump_lines(dump4k, bs=4096) + guest_dump_lines(dump512, bs=512), ubd_arg(cow),
                workdir=tmp_path)
    for dump in (dump4k, dump512):
        guest_view = dump.read_bytes()
        assert len(guest_view) == device_length(size)
        assert_same(guest_view[:size], model, f"guest dump {dump.name} vs model")


# -- (c) a backing file larger than 4 GiB ---------------------------------------------


class SparseModel:
    """Expected content of a big disk: the backing file plus writes, replayed in order."""

    def __init__(self, backing: Path) -> None:
        self.backing = backing
        self.ops: list[tuple[int, bytes]] = []

    def write(self, offset: int, data: bytes) -> None:
        self.ops.append((offset, data))

    def read(self, offset: int, length: int) -> bytes:
        with open(self.backing, "rb") as f:
            f.seek(offset)
            buf = bytearray(f.read(length))
        for off, data in self.ops:
            a, b = max(off, offset), min(off + len(data), offset + length)
            if a < b:
                buf[a - offset : b - offset] = data[a - off : b - off]
        return bytes(buf)


def test_backing_larger_than_4gib_both_directions(tmp_path: Path) -> None:
    rng = random.Random(0xC0DE)
    size = 5 * GiB
    backing = tmp_path / "big-backing.img"
    cow = tmp_path / "big.cow"
    with open(backing, "wb") as f:
        f.truncate(size)
        for off in (0, 1024 * 1024, 4 * GiB - 8192, 4 * GiB + 1024 * 1024, 4 * GiB + GiB // 2, size - 16384):
            f.seek(off)
            f.write(rng.randbytes(16384))
    ubdcow.create(cow, backing)
    model = SparseModel(backing)
    four = 4 * GiB // SECTOR  # the first sector above 4 GiB

    # 1. the guest writes above (and across) 4 GiB; ubdcow reads them back
    guest_regions = [
        (four + 3, 5, 1),  # five 512-byte direct writes just above 4 GiB
        (four - 2, 4, 1),  # across the 4 GiB boundary
        (four - 8, 16, 8),  # 4 KiB requests across the boundary, overlapping the previous
        ((4 * GiB + 1024 * 1024) // SECTOR + 5, 9, 9),  # over patterned backing data
        ((4 * GiB + GiB // 2) // SECTOR + 31, 1, 1),
        (size // SECTOR - 1, 1, 1),  # the very last sector
        ((4 * GiB + 3 * GiB // 4) // SECTOR, 64, 8),  # over a hole of the backing file
    ]
    script = need_guest_tools("dd", "blkdiscard")
    for i, (first, count, bs) in enumerate(guest_regions):
        data = rng.randbytes(count * SECTOR)
        payload = tmp_path / f"big-w{i}"
        payload.write_bytes(data)
        script += dd_write_line(payload, first, count, bs)
        model.write(first * SECTOR, data)
    # a discard above 4 GiB over patterned backing data: reads as zeros, not as the backing file
    disc_off, disc_len = 4 * GiB + GiB // 2 + 4096, 8192
    script += checked(f"blkdiscard -f -o {disc_off} -l {disc_len} /dev/ubdb")
    model.write(disc_off, bytes(disc_len))
    run_checked(script, ubd_arg(cow), workdir=tmp_path)

    with ubdcow.open(cow) as disk:
        assert disk.size == size
        for first, count, _ in guest_regions:
            off, n = (first - 2) * SECTOR, (count + 4) * SECTOR  # with a margin of untouched sectors
            n = min(n, size - off)
            assert_same(disk.pread(n, off), model.read(off, n), f"ubdcow read of the guest's write at sector {first}")
        assert disk.pread(disc_len + 1024, disc_off - 512) == model.read(disc_off - 512, disc_len + 1024)
        assert disk.pread(disc_len, disc_off) == bytes(disc_len)
        # the kernel's bits above 4 GiB (bitmap bytes past 1 MiB) are where ubdcow looks for them
        for first, count, _ in guest_regions:
            sources = {src for _, _, src in disk.extents(first * SECTOR, count * SECTOR)}
            assert sources == {"cow"}, (first, count, sources)
        cow_runs = [(s, n) for s, n, src in disk.extents(4 * GiB - 16 * SECTOR) if src == "cow"]
    assert cow_runs[0] == (4 * GiB - 8 * SECTOR, 16 * SECTOR), cow_runs

    # 2. ubdcow writes above (and across) 4 GiB, unaligned; the guest reads those regions
    ours = [
        (4 * GiB + 2 * 1024 * 1024 + 100, rng.randbytes(3000)),
        (4 * GiB - 300, rng.randbytes(1000)),  # across the boundary, over the guest's writes
        ((four + 5) * SECTOR + 17, rng.randbytes(700)),  # partly over a guest-written run
        (4 * GiB + GiB // 2 + 8192 + 5, rng.randbytes(20000)),  # over the guest's discard and backing data
        (size - 1000, rng.randbytes(1000)),  # up to the end of the disk
        (4 * GiB + 3 * GiB // 4 + 12345, rng.randbytes(1)),
    ]
    zeroes = [(4 * GiB + 1024 * 1024 + 9000, 5000)]  # write_zeroes with unaligned edges over backing data
    with ubdcow.open(cow, "r+") as disk:
        for off, data in ours:
            disk.pwrite(data, off)
            model.write(off, data)
        for off, length in zeroes:
            disk.write_zeroes(off, length)
            model.write(off, bytes(length))

    regions = [(off, len(data)) for off, data in ours] + zeroes
    regions += [(first * SECTOR, count * SECTOR) for first, count, _ in guest_regions]
    regions.append((disc_off, disc_len))
    dumps = []
    script = ""
    for i, (off, length) in enumerate(regions):
        # widen to whole 4 KiB blocks (clipped to the disk) and read with direct 512-byte reads
        a = max(0, off // 4096 * 4096 - 4096)
        b = min(size, -(-(off + length) // 4096) * 4096 + 4096)
        dump = tmp_path / f"region{i}.img"
        script += checked(f"dd if=/dev/ubdb of={q(dump)} bs=512 skip={a // SECTOR} count={(b - a) // SECTOR} "
                          "iflag=direct status=none")
        dumps.append((dump, a, b - a))
    run_checked(script, ubd_arg(cow), workdir=tmp_path)
    for dump, off, length in dumps:
        assert_same(dump.read_bytes(), model.read(off, length), f"guest read of [{off}, +{length})")
    with ubdcow.open(cow) as disk:
        for dump, off, length in dumps:
            assert_same(disk.pread(length, off), dump.read_bytes(), f"ubdcow vs guest at [{off}, +{length})")
    assert os.stat(cow).st_blocks * 512 < 64 * 1024 * 1024, "the COW file of a 5 GiB disk should stay sparse"


# -- (d) a running guest holds the lock ------------------------------------------------


def _wait_for(proc: subprocess.Popen[bytes], needle: bytes, timeout: float) -> bytes:
    """Read the guest console until ``needle`` appears (or fail with what was seen)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        left = deadline - time.monotonic()
        ready = select.select([fd], [], [], min(left, 0.5))[0] if left > 0 else []
        chunk = os.read(fd, 65536) if ready else None
        if left <= 0 or chunk == b"":  # timed out, or the guest closed its console (exited)
            raise AssertionError(f"guest never printed {needle!r}; console:\n{seen.decode(errors='replace')[-3000:]}")
        seen += chunk or b""
    return seen


def _posix_locks(path: Path) -> list[tuple[str, int]]:
    """``(READ|WRITE, pid)`` of the POSIX locks /proc/locks shows on ``path``'s inode."""
    st = os.stat(path)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    found = []
    with open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            if "->" in parts or len(parts) < 8 or parts[5] != key:
                continue
            assert parts[1] == "POSIX", line
            assert (parts[6], parts[7]) == ("0", "EOF"), f"not a whole-file lock: {line}"
            found.append((parts[3], int(parts[4])))
    return found


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # UML runs several host processes, all in this group
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
    if proc.stdout is not None:
        proc.stdout.close()


def test_running_guest_locks_out_ubdcow(tmp_path: Path) -> None:
    rng = random.Random(0xD0)
    backing = tmp_path / "backing.img"
    cow = tmp_path / "overlay.cow"
    make_backing(backing, 1024 * 1024, rng)
    ubdcow.create(cow, backing)
    with ubdcow.open(cow, "r+") as disk:
        disk.pwrite(b"before the guest", 4096)

    proc = run_guest("exec 3</dev/ubdb\necho UBDCOW-READY\nsleep 30\n", ubd_arg(cow), workdir=tmp_path,
                     background=True)
    assert isinstance(proc, subprocess.Popen)
    try:
        _wait_for(proc, b"UBDCOW-READY", timeout=60)
        cow_locks = _posix_locks(cow)
        backing_locks = _posix_locks(backing)
        assert [kind for kind, _ in cow_locks] == ["WRITE"], cow_locks
        assert [kind for kind, _ in backing_locks] == ["READ"], backing_locks
        guest_pid = cow_locks[0][1]
        assert backing_locks[0][1] == guest_pid

        errors = []
        for mode in ("r+", "r"):
            with pytest.raises(ubdcow.ImageLockedError) as excinfo:
                ubdcow.open(cow, mode)
            errors.append(excinfo.value)
        # replacing the file under the guest is refused too
        with pytest.raises(ubdcow.ImageLockedError) as excinfo:
            ubdcow.create(cow, backing, overwrite=True)
        errors.append(excinfo.value)
        comm = os.path.basename(uml_kernel())[:15]  # "linux.uml" (the kernel's file name, as the kernel keeps it)
        for err in errors:
            assert err.pid == guest_pid, (err.pid, guest_pid, str(err))
            assert str(guest_pid) in str(err), str(err)
            assert comm in str(err), str(err)
        # the named pid is a process of this guest's kernel (its process group is the one we started)
        assert Path(f"/proc/{guest_pid}/comm").read_text().strip() == comm
        assert os.getpgid(guest_pid) == proc.pid
        # our failed attempts left no lock of ours behind, and the guest's lock is untouched
        assert _posix_locks(cow) == cow_locks
        # lock=False is the documented escape hatch: it reads while the guest holds the device
        with ubdcow.open(cow, "r", lock=False) as disk:
            assert disk.pread(16, 4096) == b"before the guest"
    finally:
        _kill_group(proc)

    deadline = time.monotonic() + 10
    while _posix_locks(cow) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _posix_locks(cow) == [] and _posix_locks(backing) == []
    with ubdcow.open(cow, "r+") as disk:  # free again once the guest is gone
        assert disk.pread(16, 4096) == b"before the guest"
    with ubdcow.open(cow, "r") as disk:
        assert disk.pread(16, 4096) == b"before the guest"


def test_ubdcow_lock_keeps_guest_out(tmp_path: Path) -> None:
    """The other direction: while ubdcow holds "r+" the kernel cannot attach the device.

    The kernel's F_SETLK fails (it sees our OFD lock, with pid -1). How the guest is then refused depends
    on the kernel: 6.1 makes /dev/ubdb and fails to open it, 7.2 makes no /dev/ubdb at all. Either way the
    guest must neither read nor write the disk: both fail, and the COW file's bytes do not change.
    """
    rng = random.Random(0xD1)
    backing = tmp_path / "backing.img"
    cow = tmp_path / "overlay.cow"
    make_backing(backing, 1024 * 1024, rng)
    ubdcow.create(cow, backing)
    page = tmp_path / "page.bin"
    page.write_bytes(b"\xa5" * 4096)
    read = "dd if=/dev/ubdb of=/dev/null bs=4096 count=1 status=none"
    # nocreat: without the node (7.2), dd would make a plain file in the guest's /dev and "succeed"
    write = f"dd if={q(page)} of=/dev/ubdb bs=4096 seek=2 count=1 oflag=direct conv=notrunc,nocreat status=none"
    script = "test -b /dev/ubdb && echo UBDCOW-NODE=yes || echo UBDCOW-NODE=no\n" + checked(read) + checked(write)
    with ubdcow.open(cow, "r+") as disk:
        disk.pwrite(b"x", 0)
        disk.flush()
        before = cow.read_bytes()
        result = run_guest(script, ubd_arg(cow), workdir=tmp_path)
        assert isinstance(result, Guest)
        after = cow.read_bytes()
    assert result.finished, result.console[-3000:]
    assert "Failed to lock" in result.console, result.console[-3000:]
    assert "UBDCOW-NODE=" in result.console, result.console[-3000:]  # either way of refusing is right
    failures = [line for line in result.console.splitlines() if line.startswith(FAIL)]
    assert len(failures) == 2 and "if=/dev/ubdb" in failures[0] and "of=/dev/ubdb" in failures[1], (
        "the guest used /dev/ubdb while ubdcow held the write lock:\n" + result.console[-3000:])
    assert after == before, "the COW file changed while ubdcow held the write lock"
    # and with the lock released it attaches
    run_checked(checked("test -b /dev/ubdb") + checked(read), ubd_arg(cow), workdir=tmp_path)


# -- (e) a COW file made by uml_mkcow ----------------------------------------------------


def test_uml_mkcow_file_written_by_guest(tmp_path: Path) -> None:
    mkcow = require_tool("uml_mkcow")
    rng = random.Random(0xE)
    size = 2 * 1024 * 1024
    backing = tmp_path / "backing.img"
    cow = tmp_path / "mkcow.cow"
    model = bytearray(make_backing(backing, size, rng))
    subprocess.run([mkcow, str(cow), str(backing)], check=True, capture_output=True, timeout=30)
    script = need_guest_tools("dd", "blkdiscard")
    writes, _ = guest_writes(tmp_path, model, size, rng, count=40)
    script += writes
    script += checked(f"blkdiscard -f -o {64 * 1024} -l {16 * 1024} /dev/ubdb")
    model[64 * 1024 : 80 * 1024] = bytes(16 * 1024)
    dump = tmp_path / "dump.img"
    script += guest_dump_lines(dump, bs=4096)
    run_checked(script, ubd_arg(cow), workdir=tmp_path)

    with ubdcow.open(cow) as disk:
        assert disk.header.layout == "v3"
        ours = disk.read()
    assert_same(dump.read_bytes(), model, "guest dump vs model")
    assert_same(ours, dump.read_bytes(), "ubdcow read vs guest dump")
