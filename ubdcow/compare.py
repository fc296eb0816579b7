"""``compare``: are two disks (COW files or raw images) the same, byte for byte?"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._io import file_size, open_file, pread_into
from ._result import Result
from .errors import ImageIOError
from .format import has_cow_magic
from .image import CowImage

__all__ = ["CompareResult", "compare", "open_disk", "Disk"]

WINDOW = 4 << 20


class Disk:
    """A readable virtual disk: a COW image or a raw file, with ``size``, ``preadinto`` and ``close``."""

    def __init__(
        self,
        path: str,
        size: int,
        reader: Callable[[memoryview, int], int],
        closer: Callable[[], None],
        kind: str,
        files: dict[str, os.stat_result],
    ) -> None:
        self.path = path
        self.size = size
        self.preadinto = reader
        self.close = closer
        self.kind = kind
        #: the files its content depends on (the COW file and its backing file), for output checks
        self.files = files

    def __enter__(self) -> Disk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_disk(
    path: str | os.PathLike[str],
    *,
    backing: str | os.PathLike[str] | None = None,
    check_backing: bool = True,
    lock: bool = True,
) -> Disk:
    """Open ``path`` as a COW image if it has the COW magic, else as a raw image (read-only)."""
    path = os.fspath(path)
    fd, st = open_file(path, os.O_RDONLY, what="image")
    try:
        head = os.pread(fd, 4, 0)
    except OSError as exc:
        os.close(fd)
        raise ImageIOError(path, f"cannot read: {exc.strerror}") from None
    if has_cow_magic(head):
        os.close(fd)
        img = CowImage(path, "r", backing=backing, check_backing=check_backing, lock=lock)
        files = {"COW file": os.fstat(img.fds[0]), "backing file": os.fstat(img.fds[1])}
        return Disk(path, img.size, img.preadinto, img.close, "cow", files)
    size = file_size(fd, st)

    def read(view: memoryview, offset: int) -> int:
        try:
            return pread_into(fd, view[: max(0, min(len(view), size - offset))], offset)
        except OSError as exc:
            raise ImageIOError(path, f"read error at offset {offset}: {exc.strerror}") from None

    return Disk(path, size, read, lambda: os.close(fd), "raw", {"image": st})


@dataclass(frozen=True)
class CompareResult(Result):
    """``identical`` and, if not, the first differing byte offset (or the shorter size)."""

    identical: bool
    first_difference: int | None
    size_a: int
    size_b: int


def first_difference(a: memoryview, b: memoryview) -> int | None:
    """Index of the first differing byte of two equal-length buffers, or None."""
    if a == b:
        return None
    diff = np.flatnonzero(np.frombuffer(a, dtype=np.uint8) != np.frombuffer(b, dtype=np.uint8))
    return int(diff[0])


def compare(
    a_path: str | os.PathLike[str],
    b_path: str | os.PathLike[str],
    *,
    backing_a: str | os.PathLike[str] | None = None,
    backing_b: str | os.PathLike[str] | None = None,
    progress: Callable[[int], Any] | None = None,
    lock: bool = True,
) -> CompareResult:
    """Compare the content of two disks, streaming windows of both."""
    with open_disk(a_path, backing=backing_a, lock=lock) as a, open_disk(b_path, backing=backing_b, lock=lock) as b:
        common = min(a.size, b.size)
        buf_a, buf_b = bytearray(WINDOW), bytearray(WINDOW)
        pos = 0
        while pos < common:
            n = min(WINDOW, common - pos)
            va, vb = memoryview(buf_a)[:n], memoryview(buf_b)[:n]
            got_a, got_b = a.preadinto(va, pos), b.preadinto(vb, pos)
            if got_a < n or got_b < n:
                short = a if got_a < n else b
                raise ImageIOError(short.path, f"file ended at offset {pos + min(got_a, got_b)} while comparing")
            where = first_difference(va, vb)
            if where is not None:
                return CompareResult(False, pos + where, a.size, b.size)
            pos += n
            if progress is not None:
                progress(n)
        if a.size != b.size:
            return CompareResult(False, common, a.size, b.size)
        return CompareResult(True, None, a.size, b.size)
