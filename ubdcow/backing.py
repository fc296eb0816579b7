"""The backing file of a COW file: where its recorded path is looked for, opening it read-only, and the
kernel's size and mtime checks of it.

The backing file is only ever opened ``O_RDONLY``.
"""

from __future__ import annotations

import errno
import os
import shlex
from dataclasses import dataclass

from . import lock as _lock
from ._io import file_size, mtime_seconds, open_file, same_file
from .errors import BackingFileError, BackingMismatchError, Fix
from .format import CowHeader

__all__ = [
    "Backing",
    "attach_backing",
    "backing_candidates",
    "backing_stats",
    "check_backing_file",
    "mismatch_message",
    "mismatch_hint",
]


def mismatch_message(header: CowHeader, size: int, mtime: int) -> str | None:
    """The kernel's complaint about a backing file of this size and mtime, or None if it fits."""
    if size != header.size:
        return f"Size mismatch ({header.size} vs {size}) of COW header vs backing file"
    if mtime != header.mtime:
        return f"mtime mismatch ({header.mtime} vs {mtime}) of COW header vs backing file"
    return None


def mismatch_hint(cow: str, backing: str, header: CowHeader, size: int, mtime: int) -> str:
    """What to do about a backing file the kernel would refuse (see :func:`mismatch_message`)."""
    if size != header.size:
        return (
            f"the backing file is {size} bytes but the COW file was made on one of {header.size}: "
            "this is not the file the COW file was made on"
        )
    fix = f"ubdcow rebase --unsafe {shlex.quote(cow)} --backing {shlex.quote(backing)}"
    if not 0 <= mtime < 2**32:  # a header cannot record this mtime: give the file one it can
        fix = f"touch {shlex.quote(backing)}, then {fix}"
    return (
        "the backing file was modified, copied or touched after the COW file was made, and UML will refuse "
        f"to boot it; if its content is unchanged, record its new mtime with: {fix}"
    )


def check_backing_file(header: CowHeader, cow_path: str, backing_path: str, st: os.stat_result, size: int) -> None:
    """Raise :class:`BackingMismatchError` unless size and whole-second mtime match the header."""
    mtime = mtime_seconds(st)
    message = mismatch_message(header, size, mtime)
    if message is not None:
        raise BackingMismatchError(
            cow_path, f"{message} {backing_path}", hint=mismatch_hint(cow_path, backing_path, header, size, mtime)
        )


def backing_candidates(header: CowHeader, cow_path: str | os.PathLike[str]) -> list[str]:
    """Where the recorded backing path is looked for: as is, or (if relative) from the cwd then the COW's folder."""
    recorded = header.backing_file
    if not recorded or os.path.isabs(recorded):
        return [recorded]
    here = os.path.abspath(recorded)
    beside = os.path.join(os.path.dirname(os.path.abspath(cow_path)), recorded)
    return [here] if here == beside else [here, beside]


def backing_stats(
    header: CowHeader, cow_path: str | os.PathLike[str], backing: str | os.PathLike[str] | None = None
) -> list[os.stat_result]:
    """The stat of each existing file the backing path could resolve to (never raises).

    For tools that do not open the backing file but must never replace it.
    """
    candidates = [os.fspath(backing)] if backing is not None else backing_candidates(header, cow_path)
    found = []
    for path in candidates:
        try:
            found.append(os.stat(path))
        except (OSError, ValueError):
            continue
    return found


def _open_backing(
    header: CowHeader, cow_path: str, cow_stat: os.stat_result, backing: str | os.PathLike[str] | None
) -> Backing:
    """Open the backing file read-only (see :func:`attach_backing`)."""
    if backing is not None:
        candidates = [os.fspath(backing)]
    elif not header.backing_file:
        raise BackingFileError(
            cow_path, "no backing file is recorded in the header", fixes=(Fix("name one", (("backing", "PATH"),)),)
        )
    else:
        candidates = backing_candidates(header, cow_path)
    # a recorded path that is unusable is a problem of the COW file: name it, and the path
    report_as = None if backing is not None else cow_path
    for path in candidates:
        what = "backing file" if backing is not None else f"backing file {path}"
        try:
            os.stat(path)
        except FileNotFoundError:
            continue  # missing, or a dangling link: try the next place
        except OSError as exc:
            reason = "too many levels of symbolic links" if exc.errno == errno.ELOOP else exc.strerror
            raise BackingFileError(report_as or path, f"cannot open {what}: {reason}") from None
        fd, st = open_file(path, os.O_RDONLY, what=what, error=BackingFileError, report_as=report_as)
        if same_file(st, cow_stat):
            os.close(fd)
            raise BackingFileError(cow_path, f"the backing file {path} is the COW file itself")
        try:
            size = file_size(fd, st)
        except OSError as exc:
            os.close(fd)
            raise BackingFileError(report_as or path, f"cannot read the size of {what}: {exc.strerror}") from None
        return Backing(fd, path, st, size)
    if backing is not None:
        raise BackingFileError(candidates[0], "backing file not found")
    tried = ", ".join(candidates)
    message = f"backing file {header.backing_file} not found"
    if candidates != [header.backing_file]:
        message += f" (tried {tried})"
    raise BackingFileError(cow_path, message, fixes=(Fix("if it moved, name it", (("backing", "PATH"),)),))


@dataclass
class Backing:
    """An open backing file (read-only): its descriptor, the path it was found at, its stat and size."""

    fd: int
    path: str
    stat: os.stat_result
    size: int

    @property
    def mtime(self) -> int:
        """Whole-second mtime, as the kernel compares it with the header's."""
        return mtime_seconds(self.stat)

    def mismatch(self, header: CowHeader) -> str | None:
        """The kernel's complaint about this file as the backing file of ``header``, or None if it fits."""
        return mismatch_message(header, self.size, self.mtime)

    def close(self) -> None:
        """Close the file (dropping its lock); idempotent."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Backing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def attach_backing(
    header: CowHeader,
    cow_path: str,
    cow_stat: os.stat_result,
    backing: str | os.PathLike[str] | None = None,
    *,
    check: bool = True,
    lock: bool = False,
) -> Backing:
    """Open the backing file of a COW file read-only, check it and lock it, as the kernel would.

    ``backing`` overrides the recorded path (looked for as :func:`backing_candidates` says). Raises
    :class:`BackingFileError` when it is missing, unusable or the COW file itself; with ``check``,
    :class:`BackingMismatchError` unless its size and whole-second mtime match the header; with
    ``lock``, :class:`~ubdcow.ImageLockedError` unless it takes a read lock (what a guest's write lock
    on the same file would refuse). Nothing stays open when it raises.
    """
    found = _open_backing(header, cow_path, cow_stat, backing)
    try:
        if check:
            check_backing_file(header, cow_path, found.path, found.stat, found.size)
        if lock:
            _lock.lock(found.fd, found.path, exclusive=False, what="backing file")
    except BaseException:
        found.close()
        raise
    return found
