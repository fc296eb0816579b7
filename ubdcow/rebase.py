"""``rebase``: point a COW file at a new backing file.

Safe mode keeps the virtual disk's content: sectors still read from the old
backing file that differ in the new one are first copied into the COW file
(data, then bits), in whole pages, and mixed pages are made whole from the old
backing file; then the header records the new backing file. Unsafe mode
rewrites only the header -- the repair for "mtime mismatch" after a backing
image was copied or touched.

The header is rewritten in the file's own layout and only its own bytes are
written: the bitmap right after a v1/v2 header is never touched.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._io import file_size, open_file, pwrite_all, read_at, same_file
from ._result import Result
from .create import backing_record
from .errors import BackingFileError, BackingMismatchError, Fix, UnrecordableWriteError, io_error
from .format import SECTOR_SIZE, CowHeader
from .image import CowFile, CowImage

__all__ = ["RebaseResult", "rebase"]

WINDOW = 4 << 20


@dataclass(frozen=True)
class RebaseResult(Result):
    """What a rebase did: the new header's backing fields; ``copied_sectors``, the sectors it wrote into the
    COW file (whole 4 KiB pages around the ``differing_sectors`` where the disk read the old backing file and
    the new one differs); the mixed pages made whole (all 0 for an unsafe rebase)."""

    file: str
    backing_file: str
    mtime: int
    size: int
    copied_sectors: int
    unsafe: bool
    filled_pages: int = 0
    differing_sectors: int = 0


def _new_header(h: CowHeader, cow_path: str, new_path: str, new_stat: os.stat_result, new_size: int) -> CowHeader:
    if new_size != h.size:
        raise BackingFileError(
            new_path, f"new backing file is {new_size} bytes but the COW file's disk is {h.size}: sizes must match"
        )
    recorded, mtime = backing_record(new_path, new_stat)
    updated = h.replace(backing_file_raw=os.fsencode(recorded), mtime=mtime)
    try:
        updated.to_bytes()
    except ValueError as exc:
        raise BackingFileError(new_path, f"cannot record this path in a {h.layout} header: {exc}") from None
    return updated


def _write_header(fd: int, cow_path: str, header: CowHeader) -> None:
    data = header.to_bytes()
    assert len(data) == header.header_size <= header.bitmap_offset
    try:
        pwrite_all(fd, [data], 0)
        os.fsync(fd)
    except OSError as exc:
        raise io_error(cow_path, exc, "cannot write the header") from None


def _differing_runs(img: CowImage, new_fd: int, new_name: str, start: int, length: int) -> list[tuple[int, int]]:
    """Sector-aligned byte runs of [start, start+length) where the old and new backing files differ."""
    runs: list[tuple[int, int]] = []
    old_buf, new_buf = bytearray(WINDOW), bytearray(WINDOW)
    pos, end = start, start + length
    while pos < end:
        n = min(WINDOW, end - pos)
        old, new = memoryview(old_buf)[:n], memoryview(new_buf)[:n]
        img.backing_preadinto(old, pos)
        got = read_at(new_fd, new, pos, new_name)
        new[got:] = bytes(n - got)
        if old != new:
            padded = -(-n // SECTOR_SIZE) * SECTOR_SIZE
            a = np.zeros(padded, dtype=np.uint8)
            b = np.zeros(padded, dtype=np.uint8)
            a[:n] = np.frombuffer(old, dtype=np.uint8)
            b[:n] = np.frombuffer(new, dtype=np.uint8)
            differs = (a.reshape(-1, SECTOR_SIZE) != b.reshape(-1, SECTOR_SIZE)).any(axis=1)
            edges = np.flatnonzero(np.diff(np.concatenate(([0], differs.view(np.int8), [0]))))
            for s, e in zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True):
                runs.append((pos + s * SECTOR_SIZE, min(n, e * SECTOR_SIZE) - s * SECTOR_SIZE))
        pos += n
    return runs


def rebase(
    cow_path: str | os.PathLike[str],
    new_backing: str | os.PathLike[str],
    *,
    unsafe: bool = False,
    old_backing: str | os.PathLike[str] | None = None,
    lock: bool = True,
    progress: Callable[[int], Any] | None = None,
) -> RebaseResult:
    """Make ``cow_path`` use ``new_backing`` (see the module docstring for safe vs unsafe)."""
    cow_path = os.fspath(cow_path)
    new_path = os.fspath(new_backing)
    nfd, nst = open_file(new_path, os.O_RDONLY, what="new backing file", error=BackingFileError)
    try:
        new_size = file_size(nfd, nst)
        if unsafe:
            with CowFile(cow_path, writable=True, lock=lock, require_io=False) as cow:
                if same_file(nst, cow.stat):
                    raise BackingFileError(new_path, "the new backing file is the COW file itself")
                header = _new_header(cow.header, cow_path, new_path, nst, new_size)
                _write_header(cow.fd, cow_path, header)
            return RebaseResult(cow_path, header.backing_file, header.mtime, header.size, 0, True)
        return _safe_rebase(cow_path, new_path, nfd, nst, new_size, old_backing, lock, progress)
    finally:
        os.close(nfd)


def _safe_rebase(
    cow_path: str,
    new_path: str,
    nfd: int,
    nst: os.stat_result,
    new_size: int,
    old_backing: str | os.PathLike[str] | None,
    lock: bool,
    progress: Callable[[int], Any] | None,
) -> RebaseResult:
    differing = 0
    try:
        img = CowImage(cow_path, "r+", backing=old_backing, lock=lock)
    except BackingFileError as exc:
        if isinstance(exc, BackingMismatchError):
            raise
        raise type(exc)(
            exc.filename,
            exc.message,
            hint="a safe rebase reads the current backing file to keep the content",
            fixes=(
                Fix("name it", (("old_backing", "PATH"),)),
                Fix("or, if the new backing file holds the same content, only rewrite the header", (("unsafe", None),)),
            ),
        ) from None
    with img:
        cow_fd = img.fds[0]
        cow_stat = os.fstat(cow_fd)
        if same_file(nst, cow_stat):
            raise BackingFileError(new_path, "the new backing file is the COW file itself")
        header = _new_header(img.header, cow_path, new_path, nst, new_size)
        h = img.header
        if h.mapped_sectors < h.sectors:
            tail = h.mapped_sectors * SECTOR_SIZE
            if _differing_runs(img, nfd, new_path, tail, h.size - tail):
                raise UnrecordableWriteError(
                    cow_path,
                    f"the old and new backing files differ in sectors {h.mapped_sectors}-{h.sectors - 1}, which this "
                    f"{h.layout} bitmap cannot record (the v1/v2 rounding bug)",
                    hint=f"convert the file to v3 first: ubdcow convert {cow_path} -o NEW.cow",
                )
        filled = img.fill_mixed_pages()
        before = img.count_cow_sectors()
        for start, length, source in img.extents():  # lazily: bits change only behind it
            if source == "backing":
                for a, n in _differing_runs(img, nfd, new_path, start, length):
                    buf = bytearray(n)
                    img.backing_preadinto(memoryview(buf), a)
                    img.pwrite(buf, a)  # data first, then the bits
                    differing += -(-n // SECTOR_SIZE)
            if progress is not None:
                progress(length)
        img.flush()
        copied = img.count_cow_sectors() - before  # whole pages: what was written, not only what differed
        _write_header(cow_fd, cow_path, header)
    return RebaseResult(cow_path, header.backing_file, header.mtime, header.size, copied, False, filled, differing)
