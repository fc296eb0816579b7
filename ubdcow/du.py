"""``du``: what a folder of overlays takes on disk, grouped by backing file, and which will not boot.

COW files are found by their magic, whatever their name, in the paths given
(folders searched recursively, symbolic links inside them not followed).
Other files are skipped; a file with the COW magic that cannot be read is
listed as unreadable. Overlays are grouped by their backing file's device
and inode, however the header names it. An overlay whose backing file is
missing or would be refused by the kernel (size or mtime mismatch: the
checks ``info`` reports) goes to a group of its own with the reason.

By default only headers are read and files ``stat``-ed; ``written=True``
also counts the set bits, a bitmap window at a time.
"""

from __future__ import annotations

import os
import shlex
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from ._io import mtime_seconds, open_file
from ._result import Result
from .backing import backing_candidates, mismatch_hint, mismatch_message
from .cowfile import CowFile
from .errors import NotACowFileError, UbdCowError
from .format import CowHeader, read_header_from

__all__ = ["Overlay", "Group", "Unreadable", "DuReport", "du", "find_cow_files"]


@dataclass(frozen=True)
class Overlay(Result):
    """One COW file: its sizes, its backing file, and why the kernel would refuse it (or None)."""

    path: str
    size: int  # the virtual disk
    apparent_size: int
    allocated_size: int
    backing_file: str  # as recorded
    backing_path: str | None  # the file found, or None
    #: short reason it will not boot ("mtime mismatch", "size mismatch", "backing file missing"), or None
    reason: str | None
    #: the kernel's complaint, or what is wrong with the backing file
    problem: str | None
    hint: str | None
    #: bytes of the disk read from the COW file (``written=True`` only, else None)
    written_bytes: int | None = None


@dataclass(frozen=True)
class Group(Result):
    """The overlays on one backing file (or, when ``boots`` is False, the ones refused for one reason)."""

    backing: str | None  # the backing file's path (found, or recorded when missing)
    device: int | None
    inode: int | None
    boots: bool
    reason: str | None
    apparent_size: int  # the backing file's (0 if missing)
    allocated_size: int
    overlays: int
    overlays_apparent: int
    overlays_allocated: int
    #: what flat copies would take: one raw image of the disk's size per overlay
    flat_size: int
    #: flat copies minus what the backing file and the overlays take
    saved: int
    written_bytes: int | None
    files: list[Overlay] = field(default_factory=list)


@dataclass(frozen=True)
class Unreadable(Result):
    """A path that could not be read, and why (one line)."""

    path: str
    error: str


@dataclass(frozen=True)
class DuReport(Result):
    """All groups (bootable ones first), the totals, and what could not be read."""

    groups: list[Group]
    unreadable: list[Unreadable]
    overlays: int
    backing_files: int
    backing_allocated: int
    overlays_allocated: int
    allocated: int  # backing files (each once) + overlays
    flat_size: int
    saved: int
    #: overlays that will not boot, per reason
    will_not_boot: dict[str, int]


def _entries(path: str, unreadable: list[Unreadable]) -> Iterator[tuple[str, os.stat_result]]:
    """Regular files under ``path`` (a file or a folder, recursively), with their stat."""
    try:
        st = os.stat(path)
    except OSError as exc:
        unreadable.append(Unreadable(path, f"{path}: {exc.strerror}"))
        return
    if stat.S_ISREG(st.st_mode):
        yield path, st
        return
    if not stat.S_ISDIR(st.st_mode):
        return
    try:
        with os.scandir(path) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        unreadable.append(Unreadable(path, f"{path}: cannot list the folder: {exc.strerror}"))
        return
    for entry in entries:
        full = os.path.join(path, entry.name)
        try:
            if entry.is_dir(follow_symlinks=False):
                yield from _entries(full, unreadable)
            elif entry.is_file(follow_symlinks=False):
                yield full, entry.stat(follow_symlinks=False)
        except OSError as exc:
            unreadable.append(Unreadable(full, f"{full}: {exc.strerror}"))


def _header(path: str) -> CowHeader | None:
    """The header of a COW file, None for a file without the COW magic; raises for an unreadable one."""
    fd, _ = open_file(path, os.O_RDONLY)
    try:
        return read_header_from(fd, path)
    except NotACowFileError:
        return None
    finally:
        os.close(fd)


def find_cow_files(
    paths: Iterable[str | os.PathLike[str]], unreadable: list[Unreadable]
) -> Iterator[tuple[str, os.stat_result, CowHeader]]:
    """Every COW file under ``paths`` (each inode once), with its stat and header; problems go to ``unreadable``."""
    seen: set[tuple[int, int]] = set()
    for top in paths:
        for path, st in _entries(os.fspath(top), unreadable):
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            try:
                header = _header(path)
            except UbdCowError as exc:
                unreadable.append(Unreadable(path, str(exc)))
                continue
            if header is not None:
                yield path, st, header


class _Backings:
    """The backing files looked up so far: ``stat`` once per path."""

    def __init__(self) -> None:
        self._stats: dict[str, os.stat_result | None] = {}

    def stat(self, path: str) -> os.stat_result | None:
        if path not in self._stats:
            try:
                self._stats[path] = os.stat(path)
            except (OSError, ValueError):
                self._stats[path] = None
        return self._stats[path]

    def find(self, header: CowHeader, cow_path: str) -> tuple[str, os.stat_result] | None:
        """The first existing file the recorded path resolves to (as ``attach_backing`` looks for it)."""
        if not header.backing_file:
            return None
        for candidate in backing_candidates(header, cow_path):
            st = self.stat(candidate)
            if st is not None:
                return candidate, st
        return None


def _overlay(
    path: str, st: os.stat_result, h: CowHeader, found: tuple[str, os.stat_result] | None, written: int | None
) -> Overlay:
    reason = problem = hint = None
    backing_path = None
    if found is None:
        reason = "backing file missing"
        problem = f"backing file {h.backing_file or '(none recorded)'} not found"
        hint = (
            "find it (ubdcow info shows where it was looked for), then check it: "
            f"ubdcow info {shlex.quote(path)} --backing PATH"
        )
    else:
        backing_path, bst = found
        if not stat.S_ISREG(bst.st_mode):
            reason, problem = "backing file unusable", f"backing file {backing_path} is not a regular file"
        else:
            mtime = mtime_seconds(bst)
            message = mismatch_message(h, bst.st_size, mtime)
            if message is not None:
                reason = "size mismatch" if bst.st_size != h.size else "mtime mismatch"
                problem = f"{message} {backing_path}"
                hint = mismatch_hint(path, backing_path, h, bst.st_size, mtime)
    return Overlay(
        path, h.size, st.st_size, st.st_blocks * 512, h.backing_file, backing_path, reason, problem, hint, written
    )


def _written(path: str) -> int:
    with CowFile(path, lock=False, require_io=False) as cow:
        return cow.cow_bytes()


def du(paths: Iterable[str | os.PathLike[str]] = (".",), *, written: bool = False) -> DuReport:
    """Find the COW files under ``paths`` and add up what they and their backing files take (see the module)."""
    unreadable: list[Unreadable] = []
    backings = _Backings()
    keyed: dict[tuple[bool, tuple[object, ...], str], list[tuple[Overlay, os.stat_result | None]]] = {}
    for path, st, header in find_cow_files(paths, unreadable):
        count = None
        if written:
            try:
                count = _written(path)
            except UbdCowError as exc:
                unreadable.append(Unreadable(path, str(exc)))
                continue
        found = backings.find(header, path)
        item = _overlay(path, st, header, found, count)
        bst = found[1] if found is not None else None
        ident: tuple[object, ...] = (
            (bst.st_dev, bst.st_ino) if bst is not None else ("missing", os.path.abspath(header.backing_file))
        )
        keyed.setdefault((item.reason is not None, ident, item.reason or ""), []).append((item, bst))
    groups = [_group(members, reason or None) for (_, _, reason), members in keyed.items()]
    groups.sort(key=lambda g: (not g.boots, g.backing or "", g.reason or ""))
    return _report(groups, unreadable, written)


def _group(members: list[tuple[Overlay, os.stat_result | None]], reason: str | None) -> Group:
    files = sorted((m for m, _ in members), key=lambda o: o.path)
    bst = members[0][1]
    backing = files[0].backing_path or files[0].backing_file or None
    apparent = bst.st_size if bst is not None else 0
    allocated = bst.st_blocks * 512 if bst is not None else 0
    o_apparent = sum(o.apparent_size for o in files)
    o_alloc = sum(o.allocated_size for o in files)
    flat = sum(o.size for o in files)
    w = sum(o.written_bytes or 0 for o in files) if files[0].written_bytes is not None else None
    return Group(
        backing=backing,
        device=bst.st_dev if bst is not None else None,
        inode=bst.st_ino if bst is not None else None,
        boots=reason is None,
        reason=reason,
        apparent_size=apparent,
        allocated_size=allocated,
        overlays=len(files),
        overlays_apparent=o_apparent,
        overlays_allocated=o_alloc,
        flat_size=flat,
        saved=flat - allocated - o_alloc,
        written_bytes=w,
        files=files,
    )


def _report(groups: list[Group], unreadable: list[Unreadable], written: bool) -> DuReport:
    distinct: dict[tuple[int, int], int] = {}
    for g in groups:
        if g.device is not None and g.inode is not None:
            distinct[(g.device, g.inode)] = g.allocated_size
    backing_alloc = sum(distinct.values())
    overlays_alloc = sum(g.overlays_allocated for g in groups)
    flat = sum(g.flat_size for g in groups)
    refused: dict[str, int] = {}
    for g in groups:
        if g.reason is not None:
            refused[g.reason] = refused.get(g.reason, 0) + g.overlays
    return DuReport(
        groups=groups,
        unreadable=unreadable,
        overlays=sum(g.overlays for g in groups),
        backing_files=len(distinct),
        backing_allocated=backing_alloc,
        overlays_allocated=overlays_alloc,
        allocated=backing_alloc + overlays_alloc,
        flat_size=flat,
        saved=flat - backing_alloc - overlays_alloc,
        will_not_boot=dict(sorted(refused.items(), key=lambda kv: (-kv[1], kv[0]))),
    )
