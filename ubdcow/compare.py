"""``compare``: are two disks (COW files or raw images) the same, byte for byte?"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._result import Result
from .disk import open_disk
from .errors import ImageIOError

__all__ = ["CompareResult", "compare"]

WINDOW = 4 << 20


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
