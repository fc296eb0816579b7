"""Two trees compared path by path: what was added, deleted, modified, or changed only in its metadata.

The walk starts at the root (or at the paths asked for) of both trees at once. At each path present in
both it compares the two entries (:func:`compare_entries`); under a path present in one tree only, it
lists every entry of that side's subtree. Where a :class:`~ubdcow.fs.delta.Plan` says nothing changed
(an unchanged inode, not on the way to a changed one), it does not look: the same inode under an unchanged
directory is the same subtree. Without a plan's ``changed`` set (two unrelated filesystems) every
directory is read on both sides and every pair compared.

What counts, for an entry present in both trees (``fields``, in this order):

- ``type``; for two regular files ``content`` (the bytes: when both block maps are the same, only the
  blocks where the two disks may differ are read; else the whole files, up to the first difference);
  ``target`` for two symlinks; ``rdev`` for two devices;
- ``mode`` (the 12 permission bits), ``uid``, ``gid``, ``mtime`` (unless both are directories: a
  directory's times move whenever an entry is added), ``xattrs`` (names and values);
- with ``all_fields``: a directory's ``mtime`` too, and ``ctime``, ``atime``, ``nlink``.

The entry is "modified" when one of the first group differs, "metadata" when only the others do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from . import layout as L
from .delta import Plan, Ranges
from .filesystem import MAX_DEPTH, FileSystem
from .inodes import Inode
from .records import join
from .volume import LRU, Corrupt

__all__ = ["Diff", "diff_trees", "compare_entries", "CONTENT_FIELDS", "FIELDS"]

#: a difference in one of these makes an entry "modified"; in the others only, "metadata"
CONTENT_FIELDS = ("type", "content", "target", "rdev")
FIELDS = (*CONTENT_FIELDS, "mode", "uid", "gid", "mtime", "xattrs", "ctime", "atime", "nlink")
_CHUNK = 1 << 20
#: directory entries kept in a side's cache (a cost of one per entry, one per directory)
DIRS_KEPT = 1 << 18
_DEVICES = ("char", "block")
T = TypeVar("T")


def _on(fs: FileSystem, path: bytes, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, a problem reading ``fs`` raised as its one-line error naming ``path``."""
    with fs.reading(path):
        return fn(*args)


@dataclass(frozen=True)
class Diff:
    """One path that differs: ``change`` is added, deleted, modified or metadata; ``old``/``new`` its inodes."""

    path: bytes
    change: str
    old: Inode | None
    new: Inode | None
    fields: tuple[str, ...] = ()


class _Side:
    """One tree: inodes by number, directory entries (those the plan read, then a bounded cache). Problems are
    raised as the filesystem's one-line errors, naming the path."""

    def __init__(self, fs: FileSystem, known: dict[int, dict[bytes, int]], cache: LRU | None = None) -> None:
        self.fs = fs
        self.known = known
        self.cache = LRU(DIRS_KEPT) if cache is None else cache
        self.seen: set[int] = set()

    def get_many(self, inos: list[int], path: bytes) -> list[Inode]:
        return _on(self.fs, path, self.fs.inodes.get_many, inos)

    def entries(self, inode: Inode, path: bytes) -> dict[bytes, int]:
        found = self.known.get(inode.ino)
        if found is None:
            found = self.cache.get(inode.ino)
        if found is None:
            with self.fs.reading(path):
                found = {name: ino for chunk in self.fs.inode_entries(inode) for name, ino, _ in chunk}
            self.cache.put(inode.ino, found, len(found) + 1)
        return found

    def enter(self, inode: Inode, path: bytes) -> None:
        """A directory the walk goes into: twice is a loop (a corrupt tree)."""
        if inode.ino in self.seen:
            raise self.fs.error(Corrupt("a directory reached twice (a directory hard link or a loop)"), path)
        if path.count(b"/") > MAX_DEPTH:
            raise self.fs.error(Corrupt(f"directories nested deeper than {MAX_DEPTH} levels"), path)
        self.seen.add(inode.ino)

    def resolve(self, path: bytes) -> Inode | None:
        """The entry at ``path`` in the tree (symlinks are entries, never followed), or None."""
        (inode,) = self.get_many([L.ROOT_INO], b"/")
        for part in path.split(b"/"):
            if not part:
                continue
            if not inode.is_dir:
                return None
            ino = self.entries(inode, path).get(part)
            if ino is None:
                return None
            (inode,) = self.get_many([ino], path)
        return inode


class _Walker:
    def __init__(self, old: _Side, new: _Side, plan: Plan, all_fields: bool) -> None:
        self.old, self.new, self.plan, self.all_fields = old, new, plan, all_fields
        self.out: list[Diff] = []

    def run(self, path: bytes, o: Inode | None, n: Inode | None) -> None:
        stack: list[tuple[bytes, Inode | None, Inode | None]] = [(path, o, n)]
        while stack:
            path, o, n = stack.pop()
            if o is None or n is None:
                if o is not None or n is not None:
                    self.subtree(path, o, n, itself=True)
                continue
            self.pair(path, o, n)
            if o.is_dir and n.is_dir:
                self.old.enter(o, path)
                self.new.enter(n, path)
                stack += [(join(path, name), a, b) for name, a, b in self.children(path, o, n)]
            elif o.is_dir or n.is_dir:
                self.subtree(path, o if o.is_dir else None, n if n.is_dir else None, itself=False)

    def pair(self, path: bytes, o: Inode, n: Inode) -> None:
        changed = self.plan.changed
        if changed is not None and o.ino == n.ino and o.ino not in changed:
            return  # the same inode, unchanged
        fields = compare_entries(self.old.fs, self.new.fs, o, n, self.plan.blocks, self.all_fields, path)
        if fields:
            kind = "modified" if any(f in CONTENT_FIELDS for f in fields) else "metadata"
            self.out.append(Diff(path, kind, o, n, fields))

    def children(self, path: bytes, o: Inode, n: Inode) -> list[tuple[bytes, Inode | None, Inode | None]]:
        """The pairs of children to look at: all names of both directories, or, under an unchanged directory,
        the names that lead to something changed."""
        plan = self.plan
        if plan.changed is not None and o.ino == n.ino and o.ino not in plan.changed:
            names = plan.by_parent.get(o.ino, [])
            inos = [ino for _, ino in names]
            olds, news = self.old.get_many(inos, path), self.new.get_many(inos, path)
            return [(name, a, b) for (name, _), a, b in zip(names, olds, news, strict=True)]
        eo, en = self.old.entries(o, path), self.new.entries(n, path)
        pairs = []
        for name in eo.keys() | en.keys():
            a, b = eo.get(name), en.get(name)
            if plan.changed is not None and a == b and a is not None and not plan.must_visit(a):
                continue  # the same inode, unchanged, with nothing changed below it
            pairs.append((name, a, b))
        old_it = iter(self.old.get_many([a for _, a, _ in pairs if a is not None], path))
        new_it = iter(self.new.get_many([b for _, _, b in pairs if b is not None], path))
        return [(name, next(old_it) if a is not None else None, next(new_it) if b is not None else None)
                for name, a, b in pairs]  # fmt: skip

    def subtree(self, path: bytes, o: Inode | None, n: Inode | None, *, itself: bool) -> None:
        """Every entry of a subtree only one tree has (``itself``: its top too): deleted (old) or added (new)."""
        side, top, change = (self.old, o, "deleted") if o is not None else (self.new, n, "added")
        assert top is not None
        stack = [(path, top)]
        while stack:
            where, inode = stack.pop()
            if itself or where != path:
                self.out.append(Diff(where, change, inode if change == "deleted" else None,
                                     inode if change == "added" else None))  # fmt: skip
            if not inode.is_dir:
                continue
            side.enter(inode, where)
            names = side.entries(inode, where)
            children = side.get_many(list(names.values()), where)
            stack += [(join(where, name), child) for name, child in zip(names, children, strict=True)]


def diff_trees(old: FileSystem, new: FileSystem, plan: Plan, tops: Sequence[bytes] = (b"/",), *,
               all_fields: bool = False, caches: Sequence[LRU | None] = (None, None)) -> list[Diff]:  # fmt: skip
    """Every path under ``tops`` that differs between ``old`` and ``new``, unsorted. ``caches``: each side's
    directory entries read before (a model's, shared by a session's overlays), or None. A structure one side
    cannot read raises that filesystem's one-line error, naming the path."""
    known_old = plan.entries[0] if plan.entries else {}
    known_new = plan.entries[1] if len(plan.entries) > 1 else {}
    walker = _Walker(_Side(old, known_old, caches[0]), _Side(new, known_new, caches[1]), plan, all_fields)
    for top in tops:
        walker.run(top, walker.old.resolve(top), walker.new.resolve(top))
    return walker.out


def compare_entries(
    old: FileSystem,
    new: FileSystem,
    o: Inode,
    n: Inode,
    blocks: Ranges | None,
    all_fields: bool = False,
    path: bytes = b"",
) -> tuple[str, ...]:
    """The fields that differ between two entries at the same ``path`` (see the module docstring)."""
    found = []
    kind = o.type
    if kind != n.type:
        found.append("type")
    elif kind == "file" and _content_differs(old, new, o, n, blocks, path):
        found.append("content")
    elif kind == "symlink" and _on(old, path, old.inode_target, o) != _on(new, path, new.inode_target, n):
        found.append("target")
    elif kind in _DEVICES and o.rdev != n.rdev:
        found.append("rdev")
    for name, a, b in (("mode", o.mode & 0o7777, n.mode & 0o7777), ("uid", o.uid, n.uid), ("gid", o.gid, n.gid)):
        if a != b:
            found.append(name)
    if o.mtime_ns != n.mtime_ns and (all_fields or not (o.is_dir and n.is_dir)):
        found.append("mtime")
    if _on(old, path, old.inode_xattrs, o) != _on(new, path, new.inode_xattrs, n):
        found.append("xattrs")
    if all_fields:
        for name, a, b in (("ctime", o.ctime_ns, n.ctime_ns), ("atime", o.atime_ns, n.atime_ns),
                           ("nlink", o.links, n.links)):  # fmt: skip
            if a != b:
                found.append(name)
    return tuple(found)


def _content_differs(old: FileSystem, new: FileSystem, o: Inode, n: Inode, blocks: Ranges | None,
                     path: bytes) -> bool:  # fmt: skip
    """Whether two regular files hold different bytes (see the module docstring)."""
    if o.size != n.size:
        return True
    if o.size == 0:
        return False
    with old.reading(path):
        a = old.inode_content(o)
        runs_a = list(a.map.runs(0, -(-o.size // old.block_size))) if a.map is not None else None
    with new.reading(path):
        b = new.inode_content(n)
        runs_b = list(b.map.runs(0, -(-n.size // new.block_size))) if b.map is not None else None
    if blocks is not None and runs_a is not None and runs_a == runs_b:
        for at, length in _where(runs_a, blocks, old.block_size, o.size):
            if _on(old, path, a.read, length, at) != _on(new, path, b.read, length, at):
                return True
        return False
    buf_a, buf_b = bytearray(min(o.size, _CHUNK)), bytearray(min(o.size, _CHUNK))
    for at in range(0, o.size, _CHUNK):
        count = min(_CHUNK, o.size - at)
        va, vb = memoryview(buf_a)[:count], memoryview(buf_b)[:count]
        _on(old, path, a.readinto, va, at)
        _on(new, path, b.readinto, vb, at)
        if va != vb:
            return True
    return False


def _where(runs: list[tuple[int, int, int, bool]], blocks: Ranges, bs: int, size: int) -> Iterator[tuple[int, int]]:
    """``(offset, length)`` in the file of its blocks that lie in ``blocks``, in pieces of at most 1 MiB."""
    starts, ends = blocks
    for logical, physical, length, uninit in runs:
        if uninit:
            continue  # reads as zeros on both sides
        lo = int(np.searchsorted(ends, physical, "right"))
        hi = int(np.searchsorted(starts, physical + length, "left"))
        for s, e in zip(starts[lo:hi].tolist(), ends[lo:hi].tolist(), strict=True):
            first, last = max(s, physical), min(e, physical + length)
            at = (logical + first - physical) * bs
            stop = min((logical + last - physical) * bs, size)
            for piece in range(at, stop, _CHUNK):
                yield piece, min(_CHUNK, stop - piece)
