"""The index of a model filesystem: who owns each block, and the names of each inode.

``ubdcow.changes`` turns the blocks an overlay changed into the files that changed. Two questions need
the whole model, so they are answered once, by one walk of its tree, and kept (``ubdcow.fs.indexfile``
caches the index on disk):

- **which inodes own a block**: every block a reachable inode's content depends on (data, directory
  blocks, extent tree nodes, indirect blocks) as sorted runs ``(start, length, inode)``; extended
  attribute blocks, which inodes may share, apart as ``(block, inode)``; the blocks of ea_inodes (an
  attribute value in an inode of its own) as owned by the ea_inode, and ``(ea_inode, referrer)``;
- **the names of an inode**: one row ``(child, parent, name)`` per directory entry, sorted by child.

The arrays are numpy arrays (in memory after a build, or mapped from the cache file) and every query
is a ``searchsorted``: the work is bounded by the question, not by the model.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from . import layout as L
from .blockmap import block_map
from .dirs import iter_entries
from .files import is_fast_symlink
from .inodes import Inode, InodeTable
from .volume import Corrupt, Volume
from .xattrs import entries

__all__ = ["ModelIndex", "build_index", "expand_ranges", "ARRAYS"]

#: the arrays of an index and their dtypes (the cache file stores exactly these)
ARRAYS: dict[str, np.dtype[Any]] = {
    "link_child": np.dtype("<u4"),
    "link_parent": np.dtype("<u4"),
    "name_off": np.dtype("<u8"),
    "name_len": np.dtype("<u2"),
    "names": np.dtype("u1"),
    "run_start": np.dtype("<i8"),
    "run_len": np.dtype("<i8"),
    "run_owner": np.dtype("<u4"),
    "shared_block": np.dtype("<i8"),
    "shared_owner": np.dtype("<u4"),
    "ea_inode": np.dtype("<u4"),
    "ea_referrer": np.dtype("<u4"),
}
_MAPPED = (0o100000, 0o040000)  # regular files and directories have block maps (and slow symlinks)


class ModelIndex:
    """The arrays of :data:`ARRAYS`, checked (see :meth:`check`), and the queries on them."""

    def __init__(self, arrays: dict[str, np.ndarray], *, entries: int) -> None:
        self.arrays = arrays
        self.entries = entries
        for name in ARRAYS:
            setattr(self, name, arrays[name])
        self.link_child: np.ndarray
        self.link_parent: np.ndarray
        self.name_off: np.ndarray
        self.name_len: np.ndarray
        self.names: np.ndarray
        self.run_start: np.ndarray
        self.run_len: np.ndarray
        self.run_owner: np.ndarray
        self.shared_block: np.ndarray
        self.shared_owner: np.ndarray
        self.ea_inode: np.ndarray
        self.ea_referrer: np.ndarray

    def check(self) -> str | None:
        """What makes these arrays unusable (a damaged cache file), or None: sorted keys, names inside the blob,
        runs that do not overlap, equal lengths."""
        a = self.arrays
        pairs = (("link_child", "link_parent"), ("link_child", "name_off"), ("link_child", "name_len"),
                 ("run_start", "run_len"), ("run_start", "run_owner"), ("shared_block", "shared_owner"),
                 ("ea_inode", "ea_referrer"))  # fmt: skip
        for x, y in pairs:
            if len(a[x]) != len(a[y]):
                return f"{x} and {y} differ in length"
        for key in ("link_child", "run_start", "shared_block", "ea_inode"):
            if len(a[key]) > 1 and bool((np.diff(a[key].astype(np.int64)) < 0).any()):
                return f"{key} is not sorted"
        if len(self.name_off) and int((self.name_off + self.name_len).max()) > len(self.names):
            return "a name lies outside the names"
        if len(self.run_start):
            if bool((self.run_len <= 0).any()) or int(self.run_start.min()) < 0:
                return "an impossible run"
            if bool((self.run_start[1:] < self.run_start[:-1] + self.run_len[:-1]).any()):
                return "runs overlap"
        return None

    # -- queries ---------------------------------------------------------------------------------------

    def links(self, ino: int) -> list[tuple[int, bytes]]:
        """``(parent, name)`` of each directory entry naming inode ``ino`` in the model."""
        lo = int(np.searchsorted(self.link_child, ino, "left"))
        hi = int(np.searchsorted(self.link_child, ino, "right"))
        out = []
        for i in range(lo, hi):
            off, n = int(self.name_off[i]), int(self.name_len[i])
            out.append((int(self.link_parent[i]), self.names[off : off + n].tobytes()))
        return out

    def tree_inodes(self) -> np.ndarray:
        """Every inode of the model's tree (the root, every entry, the ea_inodes), sorted, once."""
        found: np.ndarray | None = getattr(self, "_tree_inodes", None)
        if found is None:
            parts = (
                np.asarray([L.ROOT_INO], np.int64),
                self.link_child.astype(np.int64),
                self.ea_inode.astype(np.int64),
            )
            found = self._tree_inodes = np.unique(np.concatenate(parts))
        return found

    def links_many(self, inos: Sequence[int]) -> dict[int, list[tuple[int, bytes]]]:
        """:meth:`links` of each of ``inos``, looked up at once."""
        out: dict[int, list[tuple[int, bytes]]] = {ino: [] for ino in inos}
        if not out:
            return out
        keys = np.asarray(inos, dtype=np.int64)
        lo = np.searchsorted(self.link_child, keys, "left")
        hi = np.searchsorted(self.link_child, keys, "right")
        idx, which = expand_ranges(lo, hi)
        names = self.names.data
        for w, parent, off, n in zip(which.tolist(), self.link_parent[idx].tolist(), self.name_off[idx].tolist(),
                                     self.name_len[idx].tolist(), strict=True):  # fmt: skip
            out[inos[w]].append((parent, bytes(names[off : off + n])))
        return out

    def owners(self, starts: np.ndarray, ends: np.ndarray) -> set[int]:
        """The inodes owning any block of the ranges ``[starts[i], ends[i])`` (sorted, not overlapping), and the
        inodes whose attributes live in an ea_inode among them."""
        found: set[int] = set()
        if len(starts):
            rs, rl = self.run_start, self.run_len
            first = np.maximum(np.searchsorted(rs, starts, "right") - 1, 0)
            last = np.searchsorted(rs, ends, "left")
            idx, which = expand_ranges(first, last)
            if len(idx):
                hit = (rs[idx] + rl[idx] > starts[which]) & (rs[idx] < ends[which])
                found.update(self.run_owner[idx[hit]].tolist())
            lo = np.searchsorted(self.shared_block, starts, "left")
            hi = np.searchsorted(self.shared_block, ends, "left")
            idx, _ = expand_ranges(lo, hi)
            found.update(self.shared_owner[idx].tolist())
        return found | self.referrers(found)

    def referrers(self, inos: Iterable[int]) -> set[int]:
        """The inodes whose extended attributes keep a value in one of the ea_inodes ``inos``."""
        keys = np.asarray(sorted(set(inos)), dtype=np.int64)
        if not len(keys) or not len(self.ea_inode):
            return set()
        lo = np.searchsorted(self.ea_inode, keys, "left")
        hi = np.searchsorted(self.ea_inode, keys, "right")
        idx, _ = expand_ranges(lo, hi)
        return set(self.ea_referrer[idx].tolist())


def expand_ranges(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The indices ``lo[i]..hi[i]-1`` of every i, concatenated, and for each the i it came from."""
    counts = np.maximum(np.asarray(hi, np.int64) - np.asarray(lo, np.int64), 0)
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    which = np.repeat(np.arange(len(counts)), counts)
    starts = np.cumsum(counts) - counts
    idx = np.arange(total) - starts[which] + np.asarray(lo, np.int64)[which]
    return idx, which


class _Builder:
    """The rows of an index, gathered in compact arrays during the walk."""

    def __init__(self, volume: Volume, table: InodeTable) -> None:
        geo = volume.geo
        assert geo is not None
        self.volume = volume
        self.table = table
        self.block_size = geo.block_size
        self.ea = geo.has_incompat(L.INCOMPAT_EA_INODE)
        self.link = (array("I"), array("I"), array("Q"), array("H"))  # child, parent, name offset, name length
        self.names = bytearray()
        self.runs = (array("q"), array("q"), array("I"))  # start, length, owner
        self.shared = (array("q"), array("I"))
        self.ea_refs = (array("I"), array("I"))
        self.owned: set[int] = set()  # inodes with several links (and ea_inodes) whose blocks are recorded

    def add_link(self, parent: int, name: bytes, child: int) -> None:
        child_a, parent_a, off_a, len_a = self.link
        child_a.append(child)
        parent_a.append(parent)
        off_a.append(len(self.names))
        len_a.append(len(name))
        self.names += name

    def own(self, inode: Inode) -> None:
        """Record the blocks ``inode``'s content, tree and attributes live in (once per inode)."""
        if inode.links > 1 or inode.has(L.FL_EA_INODE):
            if inode.ino in self.owned:
                return
            self.owned.add(inode.ino)
        ino = inode.ino
        if inode.file_acl:
            self.shared[0].append(inode.file_acl)
            self.shared[1].append(ino)
        if self.ea:
            self._ea_values(inode)
        kind = inode.mode & L.S_IFMT
        if inode.has(L.FL_INLINE_DATA):
            return
        if kind not in _MAPPED and not (kind == 0o120000 and not is_fast_symlink(inode, self.block_size)):
            return
        bmap = block_map(self.volume, inode)
        nodes: list[int] = []
        bmap.nodes = nodes
        starts, lengths, owners = self.runs
        for _, physical, length, _ in bmap.runs(0, -(-inode.size // self.block_size)):
            starts.append(physical)
            lengths.append(length)
            owners.append(ino)
        for node in nodes:
            starts.append(node)
            lengths.append(1)
            owners.append(ino)

    def _ea_values(self, inode: Inode) -> None:
        for entry in entries(self.volume, inode):
            if entry.inum:
                self.ea_refs[0].append(entry.inum)
                self.ea_refs[1].append(inode.ino)
                value = self.table.get(entry.inum)
                if not value.has(L.FL_EA_INODE):
                    raise Corrupt(f"an extended attribute's value points at inode {entry.inum}, not an ea_inode")
                self.own(value)

    def finish(self) -> ModelIndex:
        """The sorted arrays."""
        order = np.argsort(np.frombuffer(self.link[0], np.uint32), kind="stable")
        arrays = {
            "link_child": np.frombuffer(self.link[0], np.uint32)[order],
            "link_parent": np.frombuffer(self.link[1], np.uint32)[order],
            "name_off": np.frombuffer(self.link[2], np.uint64)[order],
            "name_len": np.frombuffer(self.link[3], np.uint16)[order],
            "names": np.frombuffer(bytes(self.names), np.uint8),
        }
        order = np.argsort(np.frombuffer(self.runs[0], np.int64), kind="stable")
        arrays["run_start"] = np.frombuffer(self.runs[0], np.int64)[order]
        arrays["run_len"] = np.frombuffer(self.runs[1], np.int64)[order]
        arrays["run_owner"] = np.frombuffer(self.runs[2], np.uint32)[order]
        order = np.argsort(np.frombuffer(self.shared[0], np.int64), kind="stable")
        arrays["shared_block"] = np.frombuffer(self.shared[0], np.int64)[order]
        arrays["shared_owner"] = np.frombuffer(self.shared[1], np.uint32)[order]
        order = np.argsort(np.frombuffer(self.ea_refs[0], np.uint32), kind="stable")
        arrays["ea_inode"] = np.frombuffer(self.ea_refs[0], np.uint32)[order]
        arrays["ea_referrer"] = np.frombuffer(self.ea_refs[1], np.uint32)[order]
        typed = {name: np.ascontiguousarray(value, dtype=ARRAYS[name]) for name, value in arrays.items()}
        return ModelIndex(typed, entries=len(self.link[0]))


def build_index(volume: Volume, table: InodeTable) -> ModelIndex:
    """Walk the model's whole tree once and index it (raises :class:`Corrupt` for a corrupt model; the index
    of a model whose blocks overlap says so through :meth:`ModelIndex.check`)."""
    builder = _Builder(volume, table)
    root = table.get(L.ROOT_INO)
    if not root.is_dir:
        raise Corrupt("the root inode is not a directory")
    builder.own(root)
    seen = {L.ROOT_INO}
    for parent, name, inode in _walk(volume, table, root):
        builder.add_link(parent, name, inode.ino)
        if inode.is_dir:
            if inode.ino in seen:
                raise Corrupt("a directory reached twice (a directory hard link or a loop)")
            seen.add(inode.ino)
        builder.own(inode)
    return builder.finish()


def _walk(volume: Volume, table: InodeTable, root: Inode) -> Iterator[tuple[int, bytes, Inode]]:
    """``(parent, name, inode)`` of every entry under ``root``, depth first, inodes read a batch at a time
    (the stack holds inode numbers: a directory of many folders costs 8 bytes each)."""
    stack = array("I", [root.ino])
    while stack:
        directory = table.get(stack.pop())
        for chunk in iter_entries(volume, directory):
            inodes = table.get_many([ino for _, ino, _ in chunk])
            for (name, _, _), inode in zip(chunk, inodes, strict=True):
                yield directory.ino, name, inode
                if inode.is_dir:
                    stack.append(inode.ino)
