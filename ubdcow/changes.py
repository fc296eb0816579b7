"""``changes``: which files a VM changed: the filesystem of a COW file against its backing file's, or against
another disk's, path by path, exact.

An overlay says which sectors its guest wrote; the files that changed are found from those sectors alone
(``ubdcow.fs.delta``): the inode-table blocks, directory blocks and data blocks they cover, turned into
inodes by the model's index (``ubdcow.fs.index``, built by one walk of the model and cached by
``ubdcow.indexcache``), then the tree is walked only where something changed (``ubdcow.fs.treediff``). The
work grows with what the guest did, not with the model. Two disks that do not share a backing file are
compared in full (every entry of both trees).

A :class:`ChangesSession` opens each model once: a lab's overlays share its reading and its index.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, overload

import numpy as np

from ._io import open_file, pread_into
from ._result import Result
from .disk import open_disk
from .errors import BackingFileError, Fix, NotACowFileError
from .format import has_cow_magic
from .fs import FileSystem, open_volume
from .fs.delta import Plan, Ranges, make_plan, merge_ranges, same_layout
from .fs.index import ModelIndex
from .fs.inodes import Inode
from .fs.records import PathLike, to_bytes
from .fs.treediff import DIRS_KEPT, Diff, compare_entries, diff_trees
from .fs.volume import LRU, Corrupt
from .image import CowImage
from .indexcache import model_index

__all__ = ["Change", "Facts", "ChangesReport", "ChangesSession", "changes"]


@dataclass(frozen=True)
class Facts(Result):
    """One side of a changed entry (``details=True``): what ``-l`` shows old -> new."""

    type: str
    mode: int
    uid: int
    gid: int
    size: int
    nlink: int
    mtime_ns: int
    ctime_ns: int
    atime_ns: int
    rdev: tuple[int, int] | None
    target: str | None
    xattrs: dict[str, bytes]


@dataclass(frozen=True)
class Change(Result):
    """One path that differs. ``change``: added, deleted, modified, metadata (or renamed, with ``renames``:
    ``renamed_from`` is the old path); ``type``: the entry's type (the old one for a deleted entry);
    ``fields``: what differs (see docs/cli.md). ``old``/``new`` are filled with ``details=True``."""

    path: str
    change: str
    type: str
    fields: tuple[str, ...] = ()
    renamed_from: str | None = None
    old: Facts | None = None
    new: Facts | None = None

    def as_dict(self) -> dict[str, Any]:
        """What ``--json`` prints: ``path``, ``change``, ``type``, ``fields`` (and ``from`` for a rename)."""
        out: dict[str, Any] = {"path": self.path, "change": self.change, "type": self.type, "fields": list(self.fields)}
        if self.renamed_from is not None:
            out["from"] = self.renamed_from
        return out


@dataclass(frozen=True)
class ChangesReport(Result):
    """The changes of ``disk`` against ``against`` (its backing file, or the other disk), sorted by path.
    ``method``: "overlay" (found from the blocks the overlays hold) or "full" (every entry compared: the disks
    share no backing file, or their filesystems are laid out differently; ``reason`` says why)."""

    disk: str
    against: str
    entries: tuple[Change, ...]
    method: str
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"disk": self.disk, "against": self.against, "entries": [e.as_dict() for e in self.entries]}


@dataclass
class _View:
    """One opened disk: its filesystem, the blocks its overlay holds, the identity of the file it stands on."""

    fs: FileSystem
    path: str
    written: Ranges | None  # filesystem blocks the COW file holds; None for a raw image
    base: tuple[int, int]  # (st_dev, st_ino) of its backing file (COW) or of itself (raw)
    base_path: str


def _written_bytes(img: CowImage) -> list[tuple[int, int]]:
    """Byte ranges ``[start, end)`` of the virtual disk the COW file holds: the one use of the engine's map."""
    return [(start, start + length) for start, length, source in img.extents() if source == "cow"]


def _blocks(fs: FileSystem, spans: list[tuple[int, int]]) -> Ranges:
    """Disk byte ranges as the filesystem blocks they touch (writes outside the filesystem dropped)."""
    volume = fs.volume
    bs, count = fs.block_size, fs.size // fs.block_size
    if not spans:
        return merge_ranges(np.zeros(0, np.int64), np.zeros(0, np.int64))
    raw = np.asarray(spans, dtype=np.int64) - volume.offset
    starts = np.clip(raw[:, 0] // bs, 0, count)
    ends = np.clip(-(-raw[:, 1] // bs), 0, count)
    return merge_ranges(starts, ends)


class _Model:
    """A backing file opened once for a session: its filesystem, and its index when first needed."""

    def __init__(self, view: _View, st: os.stat_result, journal: bool, cache: bool) -> None:
        self.view, self.st, self.journal, self.cache = view, st, journal, cache
        self._index: ModelIndex | None = None
        self.problem: str | None = None
        self.dirs = LRU(DIRS_KEPT)  # the model's directory entries, read once for all the session's overlays

    def index(self) -> ModelIndex:
        if self._index is None:
            fs = self.view.fs
            try:
                self._index = model_index(fs, self.st, journal=self.journal, cache=self.cache)
            except Corrupt as exc:
                raise fs.error(exc) from None
            self.problem = self._index.check()
        return self._index


class ChangesSession:
    """Opens disks and models for :meth:`report`; each model (backing file) is read and indexed once. A context
    manager: closing it closes every file it opened."""

    def __init__(self, *, backing: str | os.PathLike[str] | None = None, partition: int | None = None,
                 journal: bool = True, lock: bool = True, cache: bool = True) -> None:  # fmt: skip
        self.backing = None if backing is None else os.fspath(backing)
        self.partition, self.journal, self.lock, self.cache = partition, journal, lock, cache
        self._models: dict[tuple[int, int], _Model] = {}

    def __enter__(self) -> ChangesSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for model in self._models.values():
            model.view.fs.close()
        self._models.clear()

    # -- opening -------------------------------------------------------------------------------------

    def _volume(self, path: str, size: int, reader: Any, closer: Any) -> FileSystem:
        def pread(length: int, offset: int) -> bytes:
            buf = bytearray(length)
            return bytes(buf[: reader(memoryview(buf), offset)])

        return open_volume(pread, size, name=path, partition=self.partition, journal=self.journal,
                           preadinto=reader, closer=closer)  # fmt: skip

    def _open(self, path: str) -> _View:
        if _is_cow(path):
            img = CowImage(path, "r", backing=self.backing, lock=self.lock)
            try:
                written = _written_bytes(img)
                bst = os.fstat(img.fds[1])
                fs = self._volume(path, img.size, img.preadinto, img.close)
            except BaseException:
                img.close()
                raise
            return _View(fs, path, _blocks(fs, written), (bst.st_dev, bst.st_ino), img.backing_name)
        disk = open_disk(path, lock=self.lock)
        try:
            st = disk.files["image"]
            fs = self._volume(path, disk.size, disk.preadinto, disk.close)
        except BaseException:
            disk.close()
            raise
        return _View(fs, path, None, (st.st_dev, st.st_ino), path)

    def _model(self, base: tuple[int, int], path: str) -> _Model:
        """The backing file ``path`` (whose identity is ``base``), opened raw once per session."""
        model = self._models.get(base)
        if model is None:
            fd, st = open_file(path, os.O_RDONLY, what="backing file", error=BackingFileError)
            if (st.st_dev, st.st_ino) != base:
                os.close(fd)
                raise BackingFileError(path, "the backing file was replaced while it was being opened")

            def read(view: memoryview, offset: int) -> int:
                return pread_into(fd, view[: max(0, min(len(view), st.st_size - offset))], offset)

            try:
                fs = self._volume(path, st.st_size, read, lambda: os.close(fd))
            except BaseException:
                os.close(fd)
                raise
            model = self._models[base] = _Model(_View(fs, path, None, base, path), st, self.journal, self.cache)
        return model

    # -- comparing -----------------------------------------------------------------------------------

    def report(self, disk: str | os.PathLike[str], other: str | os.PathLike[str] | None = None,
               paths: Sequence[PathLike] | None = None, *, all_fields: bool = False, renames: bool = False,
               details: bool = False) -> ChangesReport:  # fmt: skip
        """The changes of ``disk`` against its backing file, or against ``other``; see :func:`changes`."""
        disk = os.fspath(disk)
        tops = _tops(paths)
        if other is None and not _is_cow(disk):
            raise NotACowFileError(
                disk,
                "a raw image has no backing file to compare with",
                fixes=(Fix("name the disk to compare it with", (("against", "PATH"),)),),
            )
        new = self._open(disk)
        try:
            if other is None:
                old = self._model(new.base, new.base_path).view
                return self._compare(old, new, new.base_path, tops, all_fields, renames, details)
            old = self._open(os.fspath(other))
            try:
                return self._compare(old, new, old.path, tops, all_fields, renames, details)
            finally:
                old.fs.close()
        finally:
            new.fs.close()

    def _compare(self, old: _View, new: _View, against: str, tops: list[bytes], all_fields: bool, renames: bool,
                 details: bool) -> ChangesReport:  # fmt: skip
        plan, old_fs, new_fs, reason = self._plan(old, new)
        model = self._models.get(old.base) if reason is None else None
        caches = [model.dirs if model is not None and fs is model.view.fs else None for fs in (old_fs, new_fs)]
        diffs = diff_trees(old_fs, new_fs, plan, tops, all_fields=all_fields, caches=caches)
        same_fs = old_fs.uuid == new_fs.uuid
        entries = _records(diffs, old_fs, new_fs, plan, renames and same_fs, details, all_fields)
        return ChangesReport(new.path, against, entries, "full" if reason else "overlay", reason)

    def _plan(self, old: _View, new: _View) -> tuple[Plan, FileSystem, FileSystem, str | None]:
        """The plan, and the filesystems to walk (the model's own when a side is the model itself)."""
        if old.base != new.base:
            return Plan(), old.fs, new.fs, "the disks do not share a backing file"
        model = self._model(old.base, old.base_path)
        index = model.index()
        if model.problem is not None:
            return Plan(), old.fs, new.fs, f"the backing file's filesystem is inconsistent ({model.problem})"
        mfs = model.view.fs
        for view in (old, new):
            if view.written is not None and not same_layout(model.view.fs, view.fs):
                return Plan(), old.fs, new.fs, f"{view.path}'s filesystem is laid out differently from its backing's"
        views = [(mfs, _empty()) if v.written is None else (v.fs, self._touched(v, mfs)) for v in (old, new)]
        plan = make_plan(mfs, index, views, model.dirs)
        return plan, views[0][0], views[1][0], None

    @staticmethod
    def _touched(view: _View, model: FileSystem) -> Ranges:
        """The blocks where the view may differ from the model: its overlay's, and both journals' replays."""
        assert view.written is not None
        replayed = np.concatenate((view.fs.volume.replayed_blocks, model.volume.replayed_blocks))
        return merge_ranges(
            np.concatenate((view.written[0], replayed)), np.concatenate((view.written[1], replayed + 1))
        )


def _is_cow(path: str) -> bool:
    """Whether ``path`` is a COW file (by its magic); errors opening it name it."""
    fd, _ = open_file(path, os.O_RDONLY, what="image")
    try:
        return has_cow_magic(os.pread(fd, 4, 0))
    finally:
        os.close(fd)


def _empty() -> Ranges:
    return np.zeros(0, np.int64), np.zeros(0, np.int64)


def _tops(paths: Sequence[PathLike] | None) -> list[bytes]:
    """The subtrees asked for, as absolute paths (``.`` and ``..`` taken lexically), none under another."""
    if not paths:
        return [b"/"]
    found = set()
    for path in paths:
        raw, _ = to_bytes(path)
        parts: list[bytes] = []
        for part in raw.split(b"/"):
            if part == b"..":
                parts = parts[:-1]
            elif part not in (b"", b"."):
                parts.append(part)
        found.add(b"/" + b"/".join(parts))
    ordered = sorted(found)
    return [p for p in ordered if not any(p.startswith(q.rstrip(b"/") + b"/") for q in ordered if q != p)]


def _facts(fs: FileSystem, inode: Inode) -> Facts:
    kind = inode.type
    with fs.reading():
        target = os.fsdecode(fs.inode_target(inode)) if kind == "symlink" else None
        xattrs = fs.inode_xattrs(inode)
    return Facts(kind, inode.mode & 0o7777, inode.uid, inode.gid, inode.size, inode.links, inode.mtime_ns,
                 inode.ctime_ns, inode.atime_ns, inode.rdev, target, xattrs)  # fmt: skip


def _identity(inode: Inode) -> tuple[int, int, int | None]:
    """What tells one file from another that later got its inode number: number, generation, creation time."""
    return inode.ino, inode.generation, inode.crtime_ns


_FS_CODEC = (sys.getfilesystemencoding(), sys.getfilesystemencodeerrors())  # os.fsdecode's, without its calls


def _records(diffs: list[Diff], old: FileSystem, new: FileSystem, plan: Plan, renames: bool, details: bool,
             all_fields: bool) -> tuple[Change, ...]:  # fmt: skip
    """The public records, sorted by path; with ``renames``, a deleted and an added entry of the same file paired."""
    diffs.sort(key=lambda d: d.path)
    paired: dict[bytes, Diff] = {}  # added path -> the deleted entry it pairs with
    if renames:
        deleted: dict[tuple[int, int, int | None], list[Diff]] = {}
        for d in diffs:
            if d.change == "deleted" and d.old is not None:
                deleted.setdefault(_identity(d.old), []).append(d)
        for d in diffs:
            if d.change == "added" and d.new is not None and deleted.get(_identity(d.new)):
                paired[d.path] = deleted[_identity(d.new)].pop(0)
    gone = {id(d) for d in paired.values()}
    out = []
    for d in diffs:
        if id(d) in gone:
            continue
        o, n = d.old, d.new
        change, fields, source = d.change, d.fields, None
        if d.path in paired:
            o = paired[d.path].old
            assert o is not None and n is not None
            change, source = "renamed", os.fsdecode(paired[d.path].path)
            fields = compare_entries(old, new, o, n, plan.blocks, all_fields)
        either = n if n is not None else o
        assert either is not None
        kind = either.type
        out.append(Change(d.path.decode(*_FS_CODEC), change, kind, fields, source,
                          _facts(old, o) if details and o is not None else None,
                          _facts(new, n) if details and n is not None else None))  # fmt: skip
    return tuple(out)


@overload
def changes(  # type: ignore[overload-overlap]
    disk: str | os.PathLike[str], other: str | os.PathLike[str] | None = None,
            paths: Sequence[PathLike] | None = None, *, backing: str | os.PathLike[str] | None = None,
            partition: int | None = None, journal: bool = True, all_fields: bool = False, renames: bool = False,
            details: bool = False, cache: bool = True, lock: bool = True) -> ChangesReport: ...  # fmt: skip
@overload
def changes(disk: Sequence[str | os.PathLike[str]], other: str | os.PathLike[str] | None = None,
            paths: Sequence[PathLike] | None = None, *, backing: str | os.PathLike[str] | None = None,
            partition: int | None = None, journal: bool = True, all_fields: bool = False, renames: bool = False,
            details: bool = False, cache: bool = True, lock: bool = True) -> list[ChangesReport]: ...  # fmt: skip
def changes(
    disk: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    other: str | os.PathLike[str] | None = None,
    paths: Sequence[PathLike] | None = None,
    *,
    backing: str | os.PathLike[str] | None = None,
    partition: int | None = None,
    journal: bool = True,
    all_fields: bool = False,
    renames: bool = False,
    details: bool = False,
    cache: bool = True,
    lock: bool = True,
) -> ChangesReport | list[ChangesReport]:
    """What changed in the filesystem of ``disk`` (a COW file) against its backing file's, or against ``other``'s
    (a COW file or a raw image); ``paths`` limits the report to those subtrees. A list of disks gives a list of
    reports, every one against its own backing file (or ``other``), each model read once.

    ``all_fields`` also reports directory times, ctime, atime and link counts; ``renames`` pairs a deleted and
    an added entry of the same file (same inode, generation and creation time) as "renamed"; ``details``
    fills each record's ``old`` and ``new`` facts. ``cache=False`` neither reads nor writes the model index
    cache (``$XDG_CACHE_HOME/ubdcow``). See docs/api.md.
    """
    disks: list[str | os.PathLike[str]] = [disk] if isinstance(disk, (str, os.PathLike)) else list(disk)
    many = not isinstance(disk, (str, os.PathLike))
    with ChangesSession(backing=backing, partition=partition, journal=journal, lock=lock, cache=cache) as session:
        reports = [session.report(d, other, paths, all_fields=all_fields, renames=renames, details=details)
                   for d in disks]  # fmt: skip
    return reports if many else reports[0]
