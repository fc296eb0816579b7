"""Create a COW file on a backing file, as uml_mkcow and the kernel do."""

from __future__ import annotations

import os
import shlex

from ._atomic import AtomicFile, check_output_path
from ._io import file_size, mtime_seconds, open_file, pwrite_all
from .errors import BackingFileError, UbdCowError, io_error
from .format import SECTOR_SIZE, CowHeader, Layout, make_header

__all__ = ["create", "absolute_backing_path", "backing_record"]


def absolute_backing_path(path: str | os.PathLike[str]) -> str:
    """The path uml_mkcow records: the folder resolved physically, the file name kept (a link stays a link)."""
    path = os.fspath(path)
    folder, name = os.path.split(path)
    return os.path.join(os.path.realpath(folder or "."), name)


def backing_record(path: str | os.PathLike[str], st: os.stat_result) -> tuple[str, int]:
    """The path and whole-second mtime a header records for a backing file.

    Raises :class:`BackingFileError` for an mtime the header's unsigned 32-bit
    field cannot hold (before 1970 or after 2106): the kernel compares the full
    value, so such a COW file could never be opened.
    """
    mtime = mtime_seconds(st)
    if not 0 <= mtime < 2**32:
        raise BackingFileError(
            path,
            f"its mtime ({mtime}) does not fit the COW header's 32-bit field (1970 to 2106)",
            hint=f"give it a current mtime first: touch {shlex.quote(os.fspath(path))}",
        )
    return absolute_backing_path(path), mtime


def create(
    cow_path: str | os.PathLike[str],
    backing_path: str | os.PathLike[str],
    *,
    sectorsize: int = SECTOR_SIZE,
    alignment: int = 4096,
    overwrite: bool = False,
    layout: Layout = "v3",
) -> CowHeader:
    """Create ``cow_path`` on ``backing_path`` and return its header.

    Like uml_mkcow: a v3 header with the backing file's absolute path, size
    and whole-second mtime, an all-zero bitmap and a sparse data area. The
    backing file is only opened read-only. An existing ``cow_path`` is an
    error unless ``overwrite``, which replaces it with a new file (never the
    backing file, and never a file a running guest holds).
    """
    cow_path = os.fspath(cow_path)
    if not (512 <= sectorsize <= 65536 and sectorsize & (sectorsize - 1) == 0):
        raise ValueError(f"sectorsize must be a power of two from 512 to 65536, not {sectorsize}")
    if not (0 < alignment < 2**32 and alignment & (alignment - 1) == 0):
        raise ValueError(f"alignment must be a power of two, not {alignment}")
    bfd, bst = open_file(backing_path, os.O_RDONLY, what="backing file", error=BackingFileError)
    try:
        size = file_size(bfd, bst)
    finally:
        os.close(bfd)
    if size == 0:
        raise BackingFileError(backing_path, "backing file is empty: a COW file needs a disk of at least one byte")
    recorded, mtime = backing_record(backing_path, bst)
    try:
        header = make_header(layout, recorded, mtime, size, sectorsize=sectorsize, alignment=alignment)
    except (ValueError, UbdCowError) as exc:
        raise BackingFileError(backing_path, f"cannot record this backing file: {exc}") from None
    check_output_path(
        cow_path,
        overwrite=overwrite,
        inputs={"backing file": bst},
        replace="to replace it with a new, empty COW file",
    )
    with AtomicFile(cow_path, overwrite=overwrite) as out:
        try:
            pwrite_all(out.fd, [header.to_bytes()], 0)
            os.ftruncate(out.fd, header.file_size)
        except OSError as exc:
            raise io_error(cow_path, exc, "cannot write") from None
        out.commit()
    return header
