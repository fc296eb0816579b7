"""A disk to read: a COW file's virtual disk or a raw image, opened read-only behind one interface."""

from __future__ import annotations

import os
from collections.abc import Callable

from ._io import file_size, open_file, pread_into
from .errors import io_error
from .format import has_cow_magic
from .image import CowImage

__all__ = ["Disk", "open_disk"]


class Disk:
    """A readable virtual disk: a COW image or a raw file, with ``size``, ``preadinto`` and ``close``."""

    path: str
    size: int
    kind: str  # "cow" or "raw"
    files: dict[str, os.stat_result]

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
        raise io_error(path, exc, "cannot read") from None
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
            raise io_error(path, exc, f"read error at offset {offset}") from None

    return Disk(path, size, read, lambda: os.close(fd), "raw", {"image": st})
