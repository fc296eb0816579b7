"""``diff``: thin a full copy back into an overlay on its original.

Creates a v3 COW file on BASE holding exactly the sectors where MODIFIED
differs from BASE (like ``qemu-img convert -B``). Differing sectors that are
all zeros are stored as holes with their bit set.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._atomic import AtomicFile, check_output_path
from ._io import file_size, open_file, pwrite_all, read_at
from ._result import Result
from .compare import Disk, open_disk
from .create import backing_record
from .errors import BackingFileError, ImageIOError
from .format import SECTOR_SIZE, has_cow_magic, make_header

__all__ = ["DiffResult", "diff"]

WINDOW = 4 << 20  # a multiple of 8 sectors, so each window's bits are whole bitmap bytes


@dataclass(frozen=True)
class DiffResult(Result):
    """The new overlay and what it holds."""

    output: str
    size: int
    sectors: int
    zero_sectors: int
    seconds: float


def diff(
    base_path: str | os.PathLike[str],
    modified_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    progress: Callable[[int], Any] | None = None,
    lock: bool = True,
) -> DiffResult:
    """Write a v3 COW file on ``base_path`` whose virtual disk equals ``modified_path``.

    ``modified_path`` may itself be a COW file (its virtual disk is read).
    """
    import time

    t0 = time.monotonic()
    base_path, output = os.fspath(base_path), os.fspath(output_path)
    bfd, bst = open_file(base_path, os.O_RDONLY, what="base image", error=BackingFileError)
    try:
        if has_cow_magic(os.pread(bfd, 4, 0)):
            raise BackingFileError(
                base_path, "BASE is a COW file; it must be a raw image (it becomes the backing file)"
            )
        size = file_size(bfd, bst)
        with open_disk(modified_path, lock=lock) as modified:
            if modified.size != size:
                raise ImageIOError(modified.path, f"size {modified.size} differs from BASE's {size}: sizes must match")
            inputs = {"base image": bst, **{f"modified image's {k}": v for k, v in modified.files.items()}}
            check_output_path(output, overwrite=overwrite, inputs=inputs)
            try:
                header = make_header("v3", *backing_record(base_path, bst), size)
            except ValueError as exc:
                raise BackingFileError(base_path, f"cannot record it as a backing file: {exc}") from None
            with AtomicFile(output, overwrite=overwrite) as out:
                try:
                    pwrite_all(out.fd, [header.to_bytes()], 0)
                    os.ftruncate(out.fd, header.file_size)
                    sectors, zeros = _write_differences(
                        bfd,
                        base_path,
                        modified,
                        out.fd,
                        header.bitmap_offset,
                        header.data_offset,
                        size,
                        progress,
                    )
                except OSError as exc:
                    raise ImageIOError(output, f"cannot write: {exc.strerror}", errno=exc.errno) from None
                out.commit()
    finally:
        os.close(bfd)
    return DiffResult(out.path, size, sectors, zeros, time.monotonic() - t0)


def _write_differences(
    base_fd: int,
    base_path: str,
    modified: Disk,
    out_fd: int,
    bitmap_offset: int,
    data_offset: int,
    size: int,
    progress: Callable[[int], Any] | None,
) -> tuple[int, int]:
    base_buf, mod_buf = bytearray(WINDOW), bytearray(WINDOW)
    sectors = zeros = 0
    pos = 0
    while pos < size:
        n = min(WINDOW, size - pos)
        padded = -(-n // SECTOR_SIZE) * SECTOR_SIZE
        base_view, mod_view = memoryview(base_buf)[:padded], memoryview(mod_buf)[:padded]
        got = read_at(base_fd, base_view[:n], pos, base_path)
        if got < n:
            raise ImageIOError(base_path, f"file ended at offset {pos + got} while reading it")
        got = modified.preadinto(mod_view[:n], pos)
        if got < n:
            raise ImageIOError(modified.path, f"file ended at offset {pos + got} while reading it")
        base_view[n:] = bytes(padded - n)  # the bytes of a partial last sector past the disk's end
        mod_view[n:] = bytes(padded - n)
        if base_view != mod_view:
            a = np.frombuffer(base_view, dtype=np.uint8).reshape(-1, SECTOR_SIZE)
            b = np.frombuffer(mod_view, dtype=np.uint8).reshape(-1, SECTOR_SIZE)
            differs = (a != b).any(axis=1)
            nonzero = b.any(axis=1)
            data = differs & nonzero
            first_sector = pos // SECTOR_SIZE
            edges = np.flatnonzero(np.diff(np.concatenate(([0], data.view(np.int8), [0]))))
            for s, e in zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True):
                start, stop = s * SECTOR_SIZE, min(n, e * SECTOR_SIZE)
                pwrite_all(out_fd, [mod_view[start:stop]], data_offset + pos + start)
            bits = np.packbits(differs, bitorder="little").tobytes()
            pwrite_all(out_fd, [bits], bitmap_offset + first_sector // 8)  # after the data
            sectors += int(differs.sum())
            zeros += int((differs & ~nonzero).sum())
        pos += n
        if progress is not None:
            progress(n)
    return sectors, zeros
