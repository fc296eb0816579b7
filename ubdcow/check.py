"""``check``: a full consistency check of a COW file and its backing file.

Exit codes of the command: 0 clean, 1 the check could not run, 2 corruption
found, 3 only a backing-file problem (the image is fine but UML would refuse it).

Mixed pages (4 KiB pages of the disk with some bits set and some clear) are a
warning: the content is what the file defines, but the Linux ubd driver
misreads it; ``repair=True`` makes them whole first (see
:meth:`~ubdcow.CowImage.fill_mixed_pages`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from . import lock as _lock
from ._io import Segments, pread_into
from .backing import attach_backing
from .bitmap import Bitmap, iter_runs
from .cowfile import CowFile
from .errors import BackingFileError, CorruptHeaderError, UnsupportedVersionError, io_error
from .format import HOST_ORDER, PAGE_SIZE, SECTOR_SIZE, CowHeader
from .image import CowImage

__all__ = ["Finding", "CheckReport", "check", "EXIT_CLEAN", "EXIT_FAILED", "EXIT_CORRUPT", "EXIT_BACKING"]

EXIT_CLEAN, EXIT_FAILED, EXIT_CORRUPT, EXIT_BACKING = 0, 1, 2, 3
Severity = Literal["error", "warning", "info"]
BACKING_CODES = frozenset({"backing-missing", "backing-unreadable", "backing-size", "backing-mtime"})
#: how many mixed-page offsets a report lists
MIXED_OFFSETS = 16


@dataclass(frozen=True)
class Finding:
    """One problem (or note) found by :func:`check`."""

    code: str
    severity: Severity
    message: str


@dataclass
class CheckReport:
    """The findings of a check and the verdict they add up to."""

    file: str
    findings: list[Finding] = field(default_factory=list)
    #: what the scan counted: ``sectors``, ``written_sectors``, ``hole_sectors`` (set bits over holes)
    stats: dict[str, int] = field(default_factory=dict)
    #: pages with some bits set and some clear, and the byte offsets of the first few
    mixed_pages: int = 0
    mixed_page_offsets: list[int] = field(default_factory=list)
    #: mixed pages made whole before the check (``repair=True``)
    repaired_pages: int = 0

    def add(self, code: str, severity: Severity, message: str) -> None:
        self.findings.append(Finding(code, severity, message))

    @property
    def exit_code(self) -> int:
        """0 clean (warnings are harmless), 2 corruption, 3 only a backing-file problem."""
        errors = [f for f in self.findings if f.severity == "error"]
        if any(f.code not in BACKING_CODES for f in errors):
            return EXIT_CORRUPT
        return EXIT_BACKING if errors else EXIT_CLEAN

    @property
    def status(self) -> str:
        return {EXIT_CLEAN: "clean", EXIT_CORRUPT: "corrupt", EXIT_BACKING: "backing-mismatch"}[self.exit_code]

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "status": self.status,
            "exit_code": self.exit_code,
            "findings": [asdict(f) for f in self.findings],
            "stats": dict(self.stats),
            "mixed_pages": self.mixed_pages,
            "mixed_page_offsets": list(self.mixed_page_offsets),
            "repaired_pages": self.repaired_pages,
        }


def _span(first: int, count: int) -> str:
    return f"sector {first}" if count == 1 else f"sectors {first}-{first + count - 1}"


def _check_length(report: CheckReport, h: CowHeader, bitmap: Bitmap, length: int) -> None:
    bitmap_end = h.bitmap_offset + h.bitmap_len
    if length < h.data_offset:
        if length < h.bitmap_offset:
            where = f"before its bitmap at offset {h.bitmap_offset}"
        elif length < bitmap_end:
            where = f"inside the bitmap, which runs to offset {bitmap_end}"
        else:
            where = "before its data"
        report.add(
            "truncated",
            "error",
            f"file is {length} bytes, shorter than its data offset {h.data_offset}: truncated (it ends {where})",
        )
    available = max(0, length - h.data_offset)
    if available < h.size:
        first_missing = available // SECTOR_SIZE
        lost = bitmap.count(first_missing, bitmap.nbits)
        if lost:
            report.add(
                "data-past-eof",
                "error",
                f"{lost} written sectors (from sector {first_missing} on) have their data past the end of "
                f"the file ({length} bytes): truncated; they read as zeros",
            )
    # the kernel puts sector i at data_offset + 512 i whatever the header's sector size
    data_end = h.data_offset + -(-h.size // SECTOR_SIZE) * SECTOR_SIZE
    if length > data_end:
        report.add(
            "trailing-data",
            "warning",
            f"{length - data_end} bytes past the end of the last sector's data (offset {data_end})",
        )


def _check_bits_past_end(report: CheckReport, fd: int, h: CowHeader) -> None:
    """Bits in the bitmap's last byte for sectors the disk does not have (v3)."""
    bits = 8 * h.bitmap_len
    if bits <= h.sectors:
        return
    last = bytearray(1)
    pread_into(fd, memoryview(last), h.bitmap_offset + h.bitmap_len - 1)
    first_bit = 8 * (h.bitmap_len - 1)
    stray = [(a, n) for a, n, on in iter_runs(last, first_bit, h.sectors, bits) if on]
    if stray:
        where = ", ".join(_span(a, n) for a, n in stray)
        report.add(
            "bits-past-end", "warning", f"bits set for {where}, past the disk's last sector {h.sectors - 1} (ignored)"
        )


def _check_rounding(report: CheckReport, fd: int, h: CowHeader, bitmap: Bitmap) -> None:
    """v1/v2 files whose bitmap is short of the sectors (the historical rounding formula)."""
    mapped = h.mapped_sectors
    if mapped >= h.sectors:
        return
    start = h.bitmap_offset + h.bitmap_len
    need = (h.sectors + 7) // 8 - h.bitmap_len
    stray_bytes = bytearray(need)
    pread_into(fd, memoryview(stray_bytes), start)
    stray = [(a, n) for a, n, on in iter_runs(stray_bytes, mapped, mapped, h.sectors) if on]
    report.add(
        "rounding-short",
        "info",
        f"{_span(mapped, h.sectors - mapped)} have no bit in this {h.layout} bitmap (the v1/v2 rounding bug): "
        "the kernel reads them from the backing file whatever is written; convert to v3 to use them",
    )
    aliased = max(0, start + need - h.data_offset)  # stray-bit bytes that are also sector 0's data
    if aliased and bitmap.test(0):
        # sector 0 is written: those bytes are its data, and bits there cannot be told from data
        stray_bytes[need - aliased :] = bytes(aliased)
        stray = [(a, n) for a, n, on in iter_runs(stray_bytes, mapped, mapped, h.sectors) if on]
        first = mapped + 8 * (need - aliased)
        report.add(
            "rounding-alias",
            "warning",
            f"the bits of {_span(first, h.sectors - first)} would lie in the first {aliased} bytes of sector 0's "
            f"data (offset {h.data_offset}), which is written: they cannot be told apart from its data (if a "
            "guest wrote those sectors, the kernel overwrote the start of sector 0)",
        )
    elif aliased and stray:
        report.add(
            "rounding-alias",
            "warning",
            f"the stray bits lie over the first {aliased} bytes of the data area (sector 0, unused)",
        )
    if not stray:
        return
    where = ", ".join(_span(a, n) for a, n in stray)
    report.add(
        "rounding-lost",
        "error",
        f"bits for {where} were written past the bitmap (offset {start}): the kernel ignores them, so the "
        f"data a guest wrote there (at offset {h.data_offset + stray[0][0] * SECTOR_SIZE}) is lost to it",
    )


def _check_pages(report: CheckReport, bitmap: Bitmap) -> None:
    count, first = bitmap.count_mixed(MIXED_OFFSETS)
    report.mixed_pages = count
    report.mixed_page_offsets = [p * PAGE_SIZE for p in first]
    if not count:
        return
    where = ", ".join(str(p * PAGE_SIZE) for p in first[:4]) + (", ..." if count > 4 else "")
    report.add(
        "mixed-pages",
        "warning",
        f"{count} mixed page{'s' if count > 1 else ''} (4 KiB pages of the disk with some sectors in the COW file "
        f"and some in the backing file), at byte offset{'s' if count > 1 else ''} {where}: the Linux ubd driver "
        "returns wrong data for the pages after a mixed page in a multi-page read, so a guest's filesystem can "
        "see corrupt data",
    )


def _check_backing(
    report: CheckReport, h: CowHeader, cow_path: str, cow_stat: os.stat_result, backing: str | os.PathLike[str] | None
) -> None:
    try:
        found = attach_backing(h, cow_path, cow_stat, backing, check=False)
    except BackingFileError as exc:
        report.add("backing-missing", "error", exc.message if exc.filename == cow_path else str(exc))
        return
    with found:
        try:
            pread_into(found.fd, memoryview(bytearray(1)), 0)
        except OSError as exc:
            report.add("backing-unreadable", "error", f"backing file {found.path} cannot be read: {exc.strerror}")
            return
    message = found.mismatch(h)
    if message is not None:
        code = "backing-size" if found.size != h.size else "backing-mtime"
        report.add(code, "error", f"{message} {found.path}: UML will refuse to open this COW file")


def _scan(
    report: CheckReport, fd: int, h: CowHeader, bitmap: Bitmap, length: int, progress: Callable[[int], Any] | None
) -> None:
    """Walk every run of the bitmap: count written sectors and those that are holes (discarded)."""
    written = holes = 0
    segments = Segments(fd)
    end_of_data = h.data_offset + min(length - h.data_offset, h.sectors * SECTOR_SIZE)
    for first, count, is_set in bitmap.runs(0, h.sectors):
        if is_set:
            written += count
            a = h.data_offset + first * SECTOR_SIZE
            b = min(a + count * SECTOR_SIZE, end_of_data)
            for x, y, is_data in segments(a, b):
                if not is_data:
                    holes += (y - x) // SECTOR_SIZE
        if progress is not None:
            progress(count * SECTOR_SIZE)
    report.stats.update(sectors=h.sectors, written_sectors=written, hole_sectors=holes)


def check(
    cow_path: str | os.PathLike[str],
    *,
    backing: str | os.PathLike[str] | None = None,
    progress: Callable[[int], Any] | None = None,
    repair: bool = False,
    lock: bool = True,
) -> CheckReport:
    """Check a COW file; raises :class:`~ubdcow.UbdCowError` only when the check cannot run.

    A file that is not a COW file at all (wrong magic) or cannot be opened
    raises; a damaged COW file gives a report with findings. With ``repair``,
    mixed pages are first made whole in place, under the write lock (``lock``),
    from the backing file, which must match the header (else it raises).
    """
    repaired = _repair(cow_path, backing, lock) if repair else 0
    report = _check(cow_path, backing, progress)
    report.repaired_pages = repaired
    return report


def _repair(cow_path: str | os.PathLike[str], backing: str | os.PathLike[str] | None, lock: bool) -> int:
    with CowFile(cow_path, lock=False) as cow:
        if not cow.bitmap.count_mixed(0)[0]:
            return 0  # nothing to do: no need for the write lock or the backing file
    with CowImage(cow_path, "r+", backing=backing, lock=lock) as img:
        return img.fill_mixed_pages()


def _check(
    cow_path: str | os.PathLike[str],
    backing: str | os.PathLike[str] | None,
    progress: Callable[[int], Any] | None,
) -> CheckReport:
    cow_path = os.fspath(cow_path)
    report = CheckReport(cow_path)
    try:
        cow = CowFile(cow_path, lock=False, require_io=False, allow_truncated=True)
    except (CorruptHeaderError, UnsupportedVersionError) as exc:
        report.add("header", "error", exc.message)
        return report
    fd, h, st, length, bitmap = cow.fd, cow.header, cow.stat, cow.length, cow.bitmap
    try:
        lock_kind, pid = _lock.held(fd)
        if lock_kind == "write":
            report.add(
                "in-use",
                "info",
                f"in use by {_lock.describe_holder(pid)} (a running guest?): what it writes "
                "while the check runs may not be seen",
            )
        elif lock_kind == "read":
            report.add(
                "in-use",
                "info",
                f"in use by {_lock.describe_holder(pid)} (a read lock: it only reads; commands that write "
                "the file are refused until it stops)",
            )
        if h.layout == "v1" and h.byteorder != HOST_ORDER:
            report.add(
                "v1-byte-order",
                "error",
                f"this v1 file is {h.byteorder}-endian, but a kernel on this {HOST_ORDER}-endian host reads v1 "
                "fields in host order and would misread it: convert it to v3",
            )
        if h.sectorsize != SECTOR_SIZE:
            report.add(
                "sector-size",
                "error",
                f"sector size {h.sectorsize}: the kernel works in 512-byte sectors and reads such files inconsistently",
            )
        _check_length(report, h, bitmap, length)
        _check_bits_past_end(report, fd, h)
        _check_rounding(report, fd, h, bitmap)
        if length >= h.data_offset:
            _scan(report, fd, h, bitmap, length, progress)
        _check_pages(report, bitmap)
        _check_backing(report, h, cow_path, st, backing)
    except OSError as exc:  # an I/O error reading the COW file: the check could not run
        raise io_error(cow_path, exc, "cannot check") from None
    finally:
        cow.close()
    return report
