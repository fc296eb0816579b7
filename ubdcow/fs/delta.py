"""From blocks to inodes: which inodes and directories of a model two views of it may have changed.

The views (``ubdcow.changes``: an overlay's filesystem, another overlay's, the model's own) are the model
with some blocks replaced. For each view the caller names the blocks that may differ from the model
(those the overlay holds, those a journal replay replaces); :func:`make_plan` then

1. keeps the blocks that matter: inode-table blocks, and blocks the model's index says an inode owns;
2. compares them with the model's, byte for byte: the others cannot change what the tree shows (a block
   only becomes part of a file through a changed inode record or a changed block the file owned);
3. takes the inodes whose records differ (slot by slot) and the owners of the differing blocks:
   ``changed``, every inode whose name, type, content or attributes may differ;
4. reads the entries of the changed directories in each view, and climbs from each changed inode to the
   root in each view (the model's names, but the view's own entries for changed directories): ``marked``,
   the directories a walk must enter; ``by_parent``, the names under unchanged directories that lead to
   something changed.

``ubdcow.fs.treediff`` walks only there. The blocks to compare for file content (``blocks``) are all the
blocks the caller named, unrefined: two views may write the same free block with different bytes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields

import numpy as np

from . import layout as L
from .filesystem import FileSystem
from .index import ModelIndex, expand_ranges
from .inodes import Inode
from .superblock import Geometry
from .volume import LRU, Corrupt, Volume

__all__ = ["Plan", "Ranges", "make_plan", "merge_ranges", "same_layout", "CHUNK_BLOCKS"]

#: blocks read at once when comparing a view's blocks with the model's
CHUNK_BLOCKS = 256
#: the directories' entries kept while planning (beyond this, a changed directory is read again when walked)
ENTRIES_KEPT = 1 << 20
Ranges = tuple[np.ndarray, np.ndarray]  # [starts[i], ends[i]) sorted, not touching


@dataclass
class Plan:
    """Where two views may differ (see the module docstring). ``changed`` None: anywhere (unrelated filesystems:
    every entry is compared); ``blocks`` None: any block (content compared in full)."""

    changed: set[int] | None = None
    marked: set[int] = field(default_factory=set)
    by_parent: dict[int, list[tuple[bytes, int]]] = field(default_factory=dict)
    blocks: Ranges | None = None
    entries: list[dict[int, dict[bytes, int]]] = field(default_factory=list)  # per view: changed dir -> entries

    def must_visit(self, ino: int) -> bool:
        return self.changed is None or ino in self.changed or ino in self.marked


def merge_ranges(starts: np.ndarray, ends: np.ndarray) -> Ranges:
    """The union of ranges ``[starts[i], ends[i])`` (any order, empty ones dropped), sorted and coalesced."""
    starts, ends = np.asarray(starts, np.int64), np.asarray(ends, np.int64)
    keep = ends > starts
    starts, ends = starts[keep], ends[keep]
    if not len(starts):
        return starts, ends
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], ends[order]
    running = np.maximum.accumulate(ends)
    new = np.ones(len(starts), dtype=bool)
    new[1:] = starts[1:] > running[:-1]
    group = np.cumsum(new) - 1
    out_ends = np.zeros(int(group[-1]) + 1, np.int64)
    np.maximum.at(out_ends, group, ends)
    return starts[new], out_ends


def _intersect(a: Ranges, b: Ranges) -> Ranges:
    """The blocks in both sets of sorted, coalesced ranges."""
    (a_s, a_e), (b_s, b_e) = a, b
    if not len(a_s) or not len(b_s):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    first = np.maximum(np.searchsorted(b_s, a_s, "right") - 1, 0)
    last = np.searchsorted(b_s, a_e, "left")
    idx, which = expand_ranges(first, last)
    lo = np.maximum(a_s[which], b_s[idx])
    hi = np.minimum(a_e[which], b_e[idx])
    return merge_ranges(lo, hi)


_LAYOUT_FIELDS = [f.name for f in fields(Geometry) if f.name not in ("label", "state", "incompat", "journal_dev")]


def same_layout(model: FileSystem, view: FileSystem) -> bool:
    """Whether ``view`` is laid out as ``model`` (the same superblock geometry and features, the inode tables
    at the same places, the same volume offset): only then do block and inode numbers mean the same."""
    a, b = model.volume.geo, view.volume.geo
    assert a is not None and b is not None
    if model.volume.offset != view.volume.offset or any(getattr(a, k) != getattr(b, k) for k in _LAYOUT_FIELDS):
        return False
    if a.incompat & ~L.INCOMPAT_RECOVER != b.incompat & ~L.INCOMPAT_RECOVER:
        return False
    return bool(np.array_equal(table_starts(model.volume), table_starts(view.volume)))


def table_starts(volume: Volume) -> np.ndarray:
    """The first block of each group's inode table."""
    geo = volume.geo
    assert geo is not None
    return np.asarray([volume.inode_table(g) for g in range(geo.groups)], dtype=np.int64)


def _candidates(index: ModelIndex, tables: Ranges, blocks: Ranges) -> Ranges:
    """The blocks of ``blocks`` that an inode owns in the model, or that hold records of the model's tree (each
    sorted set intersected on its own: the index's runs are never merged or copied)."""
    shared = index.shared_block.astype(np.int64)
    parts = [_intersect(blocks, (index.run_start, index.run_start + index.run_len)), _intersect(blocks, tables),
             _intersect(blocks, (shared, shared + 1))]  # fmt: skip
    return merge_ranges(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


def _tree_records(model: FileSystem, index: ModelIndex, tables: np.ndarray) -> Ranges:
    """The inode-table blocks that hold the records of the model's tree. When one side is the model, only those
    need comparing: an inode outside the tree (free in the model, or unreachable) can only enter the view's
    tree through a directory entry, in a directory block that then differs, and the walk compares a changed
    directory's entries by name; an unchanged name pairs a model's inode, which is in the tree. So an
    overlay's zeroed or rewritten free slots (a guest's lazy inode-table initialization) cost nothing."""
    geo = model.volume.geo
    assert geo is not None
    inos = index.tree_inodes() - 1
    group, slot = np.divmod(inos, geo.inodes_per_group)
    blocks = np.unique(tables[group] + slot // geo.inodes_per_block)
    return merge_ranges(blocks, blocks + 1)


def _chunks(ranges: Ranges) -> Iterator[tuple[int, int]]:
    for start, end in zip(ranges[0].tolist(), ranges[1].tolist(), strict=True):
        for first in range(start, end, CHUNK_BLOCKS):
            yield first, min(CHUNK_BLOCKS, end - first)


def differing_blocks(view: Volume, model: Volume, ranges: Ranges) -> Ranges:
    """The blocks of ``ranges`` whose bytes differ between the view and the model."""
    bs = model.block_size
    found: list[np.ndarray] = []
    for first, count in _chunks(ranges):
        x, y = view.blocks(first, count), model.blocks(first, count)
        if x == y:  # (most chunks: one memcmp)
            continue
        a = np.frombuffer(x, np.uint8).reshape(count, bs)
        b = np.frombuffer(y, np.uint8).reshape(count, bs)
        found.append(first + np.flatnonzero((a != b).any(axis=1)))
    blocks = np.concatenate(found) if found else np.zeros(0, np.int64)
    return merge_ranges(blocks, blocks + 1)


def _changed_slots(view: Volume, model: Volume, tables: np.ndarray, differing: Ranges) -> set[int]:
    """The inodes whose records differ, in the inode-table blocks of ``differing`` (``tables``: each group's
    first table block, in group order)."""
    geo = model.geo
    assert geo is not None
    per_block, size, ipg = geo.inodes_per_block, geo.inode_size, geo.inodes_per_group
    order = np.argsort(tables, kind="stable")
    starts = tables[order]
    out: set[int] = set()
    for first, count in _chunks(_intersect(differing, (starts, starts + geo.itable_blocks))):
        a, b = view.blocks(first, count), model.blocks(first, count)
        for k in range(count):
            block = first + k
            at = int(np.searchsorted(starts, block, "right")) - 1
            group = int(order[at])
            base = group * ipg + (block - int(starts[at])) * per_block
            for slot in range(per_block):
                pos = (k * per_block + slot) * size
                if base + slot < (group + 1) * ipg and a[pos : pos + size] != b[pos : pos + size]:
                    out.add(base + slot + 1)
    return out


def make_plan(model: FileSystem, index: ModelIndex, views: Sequence[tuple[FileSystem, Ranges]],
              model_dirs: LRU | None = None) -> Plan:  # fmt: skip
    """The plan for comparing ``views[0]`` with ``views[1]`` (each with the blocks it may have changed; a view
    that is the model itself names no blocks). ``model_dirs``: the model's directory entries already read
    (a session's earlier overlays), kept there too. A problem is raised as the one-line error of the
    filesystem that has it."""
    with model.reading():
        tables = table_starts(model.volume)
    geo = model.volume.geo
    assert geo is not None
    if any(fs is model for fs, _ in views):  # (two overlays: an inode new in both may differ between them)
        table_ranges = _tree_records(model, index, tables)
    else:
        table_ranges = merge_ranges(tables, tables + geo.itable_blocks)
    changed: set[int] = set()
    everything = merge_ranges(np.concatenate([r[0] for _, r in views]), np.concatenate([r[1] for _, r in views]))
    for fs, ranges in views:
        if fs is model or not len(ranges[0]):
            continue
        with fs.reading():  # (a block past the end of a view cut short; the model's blocks were read before)
            differing = differing_blocks(fs.volume, model.volume, _candidates(index, table_ranges, ranges))
            changed |= _changed_slots(fs.volume, model.volume, tables, differing)
        changed |= index.owners(*differing)
    changed |= index.referrers(changed)
    plan = Plan(changed=changed, blocks=everything)
    plan.entries = [_changed_entries(fs, changed, model_dirs if fs is model else None) for fs, _ in views]
    _mark(plan, index)
    return plan


def _changed_entries(fs: FileSystem, changed: set[int], cache: LRU | None) -> dict[int, dict[bytes, int]]:
    """The entries of every changed inode that is a readable directory in ``fs`` (a free slot, garbage in a lazily
    initialized table or an unreadable directory is left out here: if the walk reaches it, reading it there
    reports the problem). ``cache``: the entries read before (and, under ``("-", ino)``, what is no directory)."""
    out: dict[int, dict[bytes, int]] = {}
    kept = 0
    todo = []
    for ino in sorted(changed):
        if cache is not None:
            if cache.get(("-", ino)):
                continue
            hit = cache.get(ino)
            if hit is not None:
                out[ino] = hit
                kept += len(hit)
                continue
        todo.append(ino)
    try:
        inodes = fs.inodes.peek_many(todo)
    except Corrupt:  # a table block that cannot be read (past the end of a view cut short): one by one
        inodes = [_peek(fs, ino) for ino in todo]
    for ino, inode in zip(todo, inodes, strict=True):
        if inode is None or not inode.is_dir:
            if cache is not None:
                cache.put(("-", ino), True, 1)
            continue
        if kept > ENTRIES_KEPT:
            continue
        try:
            found = {name: child for chunk in fs.inode_entries(inode) for name, child, _ in chunk}
        except Corrupt:
            continue
        if cache is not None:
            cache.put(ino, found, len(found) + 1)
        out[ino] = found
        kept += len(found)
    return out


def _peek(fs: FileSystem, ino: int) -> Inode | None:
    """Inode ``ino`` of a view if it is in use and readable."""
    try:
        return fs.inodes.get(ino)
    except Corrupt:
        return None


def _mark(plan: Plan, index: ModelIndex) -> None:
    """Fill ``marked`` (every directory on the way from the root to a changed inode, in either view) and
    ``by_parent`` (the names under unchanged directories of what the walk must reach)."""
    changed = plan.changed
    assert changed is not None
    reverse: defaultdict[int, list[int]] = defaultdict(list)  # child -> the changed directories naming it
    for entries in plan.entries:
        for directory, names in entries.items():
            for child in names.values():
                reverse[child].append(directory)
    links: dict[int, list[tuple[int, bytes]]] = {}  # ino -> its names in the model under unchanged directories

    def fetch(inos: list[int]) -> None:
        for ino, found in index.links_many([i for i in inos if i not in links]).items():
            links[ino] = [(p, name) for p, name in found if p not in changed]

    pending = sorted(changed)
    seen = set(changed)
    while pending:  # one level up at a time, the model's names of a whole level looked up at once
        fetch(pending)
        above = []
        for ino in pending:
            for parent in [p for p, _ in links[ino]] + reverse.get(ino, []):
                if parent not in seen:
                    seen.add(parent)
                    plan.marked.add(parent)
                    above.append(parent)
        pending = above
    plan.marked.add(L.ROOT_INO)
    by_parent: defaultdict[int, list[tuple[bytes, int]]] = defaultdict(list)
    for ino in seen:
        for parent, name in links[ino]:
            by_parent[parent].append((name, ino))
    plan.by_parent = dict(by_parent)
