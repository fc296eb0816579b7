"""Read-only facts about a COW file: ``info`` (header, backing status, sizes) and ``iter_map`` (the map)."""

from __future__ import annotations

import os
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any

from . import lock as _lock
from ._result import Result
from .backing import attach_backing, backing_candidates, mismatch_hint
from .cowfile import CowFile, cow_bytes
from .errors import BackingFileError
from .format import CowHeader

__all__ = ["Info", "info", "iter_map", "map_image", "backing_status", "cow_bytes"]


def _opened_path(fd: int, path: str) -> str:
    """The path of the file open as ``fd`` (the kernel's answer, so no link can change in between), else
    ``path`` with its links resolved."""
    try:
        name = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return os.path.realpath(path)
    return name if name.startswith("/") else os.path.realpath(path)


def backing_status(
    header: CowHeader, cow_path: str, cow_stat: os.stat_result, backing: str | os.PathLike[str] | None = None
) -> dict[str, Any]:
    """Where the backing file is and whether UML would accept it (never raises for a bad backing).

    ``resolved`` is the file the path leads to through symbolic links (what
    ubdcow reads: an untrusted COW file can name any file).
    """
    path = os.fspath(backing) if backing is not None else header.backing_file
    # not found: where the first place it is looked for leads (a dangling link's target)
    first = path if backing is not None or not path else backing_candidates(header, cow_path)[0]
    status: dict[str, Any] = {
        "path": path,
        "resolved": os.path.realpath(first) if first else None,
        "exists": False,
        "size": None,
        "mtime": None,
        "size_matches": False,
        "mtime_matches": False,
        "problem": None,
        "hint": None,
    }
    try:
        found = attach_backing(header, cow_path, cow_stat, backing, check=False)
    except BackingFileError as exc:
        status["problem"] = exc.message if exc.filename == cow_path else str(exc)
        # as a command line of info, which has --backing
        fixes = [f.command(f"ubdcow info {shlex.quote(cow_path)}") for f in exc.fixes]
        status["hint"] = "; ".join([*([exc.lead] if exc.lead else []), *fixes]) or None
        return status
    with found:
        resolved = _opened_path(found.fd, found.path)
    status.update(
        path=found.path,
        resolved=resolved,
        exists=True,
        size=found.size,
        mtime=found.mtime,
        size_matches=found.size == header.size,
        mtime_matches=found.mtime == header.mtime,
    )
    message = found.mismatch(header)
    if message is not None:
        status["problem"] = f"{message}: UML will refuse to open this COW file"
        status["hint"] = mismatch_hint(cow_path, found.path, header, found.size, found.mtime)
    return status


@dataclass(frozen=True, eq=False)
class Info(Result, Mapping[str, Any]):
    """What :func:`info` finds: header, geometry, backing status and sizes of a COW file.

    A :class:`~ubdcow._result.Result` whose :meth:`to_dict` is what ``info --json`` prints, and a read-only
    mapping of the same keys (``facts["cow_sectors"]``, ``dict(facts)``), as ``info`` returned before.
    """

    file: str
    version: int
    layout: str
    byteorder: str
    backing_file: str
    #: where the backing file is and whether UML would accept it (:func:`backing_status`)
    backing: dict[str, Any]
    mtime: int
    size: int
    sectorsize: int
    alignment: int
    cow_format: int
    bitmap_offset: int
    bitmap_len: int
    data_offset: int
    sectors: int
    cow_sectors: int
    cow_bytes: int
    mixed_pages: int
    apparent_size: int
    allocated_size: int
    in_use: bool
    #: "write", "read" or None: the lock another process holds
    lock: str | None
    locked_by: int | None

    def __getitem__(self, key: str) -> Any:
        if key not in _INFO_KEYS:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(_INFO_KEYS)

    def __len__(self) -> int:
        return len(_INFO_KEYS)

    __eq__ = Mapping.__eq__  # equal to the dict it reads as (Result's would compare records only)


_INFO_KEYS = tuple(f.name for f in fields(Info))


def info(cow_path: str | os.PathLike[str], *, backing: str | os.PathLike[str] | None = None) -> Info:
    """Header, geometry, backing status and sizes of a COW file (an :class:`Info`, readable as a dict).

    Raises for a file that is not a valid COW file; a missing or mismatched
    backing file is reported in ``backing``, not raised.
    """
    cow_path = os.fspath(cow_path)
    with CowFile(cow_path, lock=False, require_io=False) as cow:
        header, st = cow.header, cow.stat
        # one pass counts the set bits and the mixed pages (see check)
        cow_sectors, mixed_pages, _ = cow.bitmap.summary(limit=0)
        last_set = cow.bitmap.test(header.sectors - 1)
        lock_kind, pid = _lock.held(cow.fd)
        apparent = cow.length
    return Info(
        file=cow_path,
        version=header.version,
        layout=header.layout,
        byteorder=header.byteorder,
        backing_file=header.backing_file,
        backing=backing_status(header, cow_path, st, backing),
        mtime=header.mtime,
        size=header.size,
        sectorsize=header.sectorsize,
        alignment=header.alignment,
        cow_format=header.cow_format,
        bitmap_offset=header.bitmap_offset,
        bitmap_len=header.bitmap_len,
        data_offset=header.data_offset,
        sectors=header.sectors,
        cow_sectors=cow_sectors,
        cow_bytes=cow_bytes(header, cow_sectors, last_set),
        mixed_pages=mixed_pages,
        apparent_size=apparent,
        allocated_size=st.st_blocks * 512,
        in_use=lock_kind is not None,
        lock=lock_kind,
        locked_by=pid,
    )


def iter_map(cow_path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The virtual disk as coalesced extents covering [0, size), in order (streamed).

    Each is ``{"start", "length", "source", "offset"}``; source "cow" (data in
    the COW file at ``offset``), "zero" (a set bit over a hole in the data
    area, read as zeros) or "backing" (read from the backing file at
    ``offset``). Only the COW file is read.
    """
    with CowFile(cow_path, lock=False) as cow:
        for extent in cow.mapping():
            yield extent._asdict()


def map_image(cow_path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """``list(iter_map(cow_path))``: kept for callers of earlier versions (use :func:`iter_map`)."""
    return list(iter_map(cow_path))
