"""``ubdcow demo``: a guided tour on a small image, each step with its CLI equivalent.

It builds a patterned backing image, creates a COW file, writes through the
API (a partial sector and a discard included), shows ``info``, ``map`` and
``check``, merges, and verifies every byte of the result against a model.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .cli import Output

DEMO_SIZE = 4 << 20  # 4 MiB, 8192 sectors
DEMO_MTIME = 1_700_000_000


def sector_pattern(index: int) -> bytes:
    """512 recognisable bytes naming sector ``index``."""
    text = f"ubdcow demo backing sector {index:08d}\n".encode()
    return (text * (512 // len(text) + 1))[:512]


def make_backing(path: str, size: int = DEMO_SIZE) -> bytes:
    """A backing image whose every sector names itself, the last 1 MiB a hole; returns its bytes."""
    data_end = max(512, size - (1 << 20))
    data = b"".join(sector_pattern(i) for i in range(data_end // 512))
    with open(path, "wb") as f:
        f.write(data)
        f.truncate(size)
    os.utime(path, (DEMO_MTIME, DEMO_MTIME))
    return data + bytes(size - len(data))


def run_demo(out: Output, keep: str | None = None) -> int:
    """Run the tour; returns 0, or 1 if a verification failed."""
    if keep:
        os.makedirs(keep, exist_ok=True)
        return _tour(out, os.path.abspath(keep))
    with tempfile.TemporaryDirectory(prefix="ubdcow-demo-") as folder:
        return _tour(out, folder)


class _Tour:
    def __init__(self, out: Output) -> None:
        self.out = out
        self.failures: list[str] = []
        self.checks: list[dict[str, object]] = []

    def step(self, title: str, command: str | None = None) -> None:
        self.out.line()
        self.out.line(f"== {title}")
        if command:
            self.out.line(f"$ {command}")

    def verify(self, ok: bool, what: str) -> None:
        self.out.line(f"   {'ok' if ok else 'FAILED'}: {what}")
        if not ok:
            self.failures.append(what)
        self.checks.append({"check": what, "ok": ok})


def _tour(out: Output, folder: str) -> int:
    import ubdcow

    from .check import check
    from .cli import print_info
    from .inspect import map_image
    from .merge import merge

    tour = _Tour(out)
    as_json, out.quiet = out.json, out.quiet or out.json  # with --json, only the summary object is printed
    backing = os.path.join(folder, "backing.img")
    cow = os.path.join(folder, "overlay.cow")
    merged = os.path.join(folder, "merged.img")
    for stale in (cow, merged):
        if os.path.exists(stale):
            os.unlink(stale)
    out.line(f"# working in {folder}")

    tour.step(f"a {DEMO_SIZE >> 20} MiB backing image whose sectors name themselves (its last MiB is a hole)")
    model = bytearray(make_backing(backing))
    out.line(f"   {backing}")

    tour.step("create a COW file on it (like uml_mkcow)", f"python -m ubdcow create {cow} {backing}")
    ubdcow.create(cow, backing)

    tour.step("write through the API, as a guest would", "python  # import ubdcow")
    with ubdcow.open(cow, "r+") as disk:
        hello = b"Hello from ubdcow! "
        disk.pwrite(hello, 100)  # a partial sector: the rest of sector 0 is kept from the backing
        model[100 : 100 + len(hello)] = hello
        out.line("   with ubdcow.open(cow, 'r+') as disk:")
        out.line(f"       disk.pwrite({hello!r}, 100)            # inside page 0: it becomes COW, whole")
        block = bytes(range(256)) * 64
        disk.pwrite(block, 1 << 20)
        model[1 << 20 : (1 << 20) + len(block)] = block
        out.line("       disk.pwrite(bytes(range(256)) * 64, 1 MiB)   # 16 KiB, 32 whole sectors")
        disk.discard(2 << 20, 64 << 10)
        model[2 << 20 : (2 << 20) + (64 << 10)] = bytes(64 << 10)
        out.line("       disk.discard(2 MiB, 64 KiB)                  # reads as zeros, a hole in the COW file")
        disk.pwrite(b"tail", DEMO_SIZE - 4)
        model[-4:] = b"tail"
        out.line("       disk.pwrite(b'tail', size - 4)               # inside the backing's hole")
    with ubdcow.open(cow) as disk:
        tour.verify(disk.read() == bytes(model), "reading the virtual disk back gives the expected bytes")

    tour.step("info: header, backing status, apparent vs allocated size", f"python -m ubdcow info {cow}")
    facts = ubdcow.info(cow)
    print_info(facts, out)
    # whole 4 KiB pages: sector 0's page, 32 sectors, 128 discarded, the last page
    tour.verify(facts["cow_sectors"] == 8 + 32 + 128 + 8, "the bitmap records 176 written sectors (whole pages)")
    tour.verify(facts["allocated_size"] < facts["apparent_size"], "the COW file is sparse")

    tour.step("map: where each range of the disk comes from", f"python -m ubdcow map {cow}")
    extents = map_image(cow)
    for e in extents:
        out.line(f"   {e['start']:>10} {e['length']:>10} {e['source']:<8} at {e['offset']}")
    tour.verify(sum(e["length"] for e in extents) == DEMO_SIZE, "the extents cover the whole disk")
    tour.verify(any(e["source"] == "zero" for e in extents), "the discard shows as a 'zero' extent")

    tour.step("check: consistency of the COW file and its backing", f"python -m ubdcow check {cow}")
    report = check(cow)
    out.line(f"   {report.status}" + "".join(f"\n   {f.severity}: {f.message}" for f in report.findings))
    tour.verify(report.exit_code == 0, "check finds nothing wrong")

    tour.step(
        "merge into a new raw image (atomic, sparse; the backing is only read)",
        f"python -m ubdcow merge {cow} -o {merged}",
    )
    result = merge(cow, merged)
    out.line(
        f"   {result.cow_bytes} bytes from the COW file, {result.backing_bytes} from the backing file, "
        f"{result.hole_bytes} left as holes, in {result.seconds:.3f} s"
    )
    with open(merged, "rb") as f:
        merged_bytes = f.read()
    tour.verify(
        merged_bytes == bytes(model),
        f"the merged image equals the expected bytes (sha256 {hashlib.sha256(merged_bytes).hexdigest()[:16]}...)",
    )
    st = os.stat(merged)
    tour.verify(st.st_blocks * 512 < DEMO_SIZE, f"the merged image is sparse ({st.st_blocks * 512} bytes allocated)")
    with open(backing, "rb") as f:
        tour.verify(f.read()[:1024] == b"".join(sector_pattern(i) for i in range(2)), "the backing file is unchanged")

    out.line()
    if as_json:
        out.dump({"folder": folder, "ok": not tour.failures, "checks": tour.checks})
    if tour.failures:
        out.line(f"demo: VERIFICATION FAILED: {'; '.join(tour.failures)}")
        return 1
    out.line("demo: all checks passed" + (f"; the files are in {folder}" if "ubdcow-demo-" not in folder else ""))
    return 0
