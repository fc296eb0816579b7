"""Directories: entry blocks parsed along their rec_len chains, read linearly.

Reading every block in order covers linear, hashed (dir_index, htree) and large_dir directories alike:
an htree's leaves are ordinary entry blocks and its interior nodes look like one empty entry. Inline
directories (inline_data) keep their parent's inode number and entries in i_block and system.data.
Each entry is checked as the kernel checks it (rec_len, name length, inode number), and names may
not contain ``/`` or NUL. ``.`` and ``..`` are left out.
"""

from __future__ import annotations

from collections.abc import Iterator

from . import layout as L
from .blockmap import block_map
from .inodes import Inode
from .volume import Corrupt, Volume
from .xattrs import inline_data

__all__ = ["Entry", "parse_entries", "iter_entries", "CHUNK_BLOCKS"]

#: a directory entry: (name, inode number, file type byte: 0 when the filesystem has no filetype feature)
Entry = tuple[bytes, int, int]
#: blocks read at once from a contiguous run of a large directory
CHUNK_BLOCKS = 64
_MIN_REC_LEN = 12
_DOTS = (b".", b"..")


def parse_entries(
    data: bytes, start: int, end: int, *, filetype: bool, inodes_count: int, big_blocks: bool, where: str
) -> list[Entry]:
    """The entries of ``data[start:end]``: one directory block, or one region of an inline directory."""
    out: list[Entry] = []
    unpack = L.DIR_ENTRY_HEAD.unpack_from
    pos = start
    while pos < end:
        if pos + L.DIR_ENTRY_HEAD_SIZE > end:
            raise Corrupt(f"{where}: a directory entry at byte {pos - start} runs past the end")
        ino, rec_len, name_len, ftype = unpack(data, pos)
        if big_blocks:  # 64 KiB blocks: 0 and 65535 mean 65536, the two low bits hold bits 16 and 17
            rec_len = 1 << 16 if rec_len in (0, 0xFFFF) else (rec_len & 0xFFFC) | (rec_len & 3) << 16
        if rec_len < _MIN_REC_LEN or rec_len & 3 or pos + rec_len > end:
            raise Corrupt(f"{where}: a directory entry at byte {pos - start} has a bad rec_len {rec_len}")
        if not filetype:
            if ftype:  # the high byte of a 16-bit name length
                raise Corrupt(f"{where}: a directory entry at byte {pos - start} has a name longer than 255")
        if ino:
            if not name_len or rec_len < (name_len + 11) & ~3 or ino > inodes_count:
                raise Corrupt(f"{where}: a directory entry at byte {pos - start} is impossible "
                              f"(inode {ino}, name length {name_len}, rec_len {rec_len})")  # fmt: skip
            name = data[pos + 8 : pos + 8 + name_len]
            if b"/" in name or b"\0" in name:
                raise Corrupt(f"{where}: a directory entry at byte {pos - start} has '/' or NUL in its name")
            if name not in _DOTS:
                out.append((name, ino, ftype if filetype else 0))
        pos += rec_len
    return out


def iter_entries(volume: Volume, inode: Inode) -> Iterator[list[Entry]]:
    """The entries of directory ``inode``, a block (or a contiguous chunk of blocks) at a time."""
    geo = volume.geo
    assert geo is not None
    filetype = geo.has_incompat(L.INCOMPAT_FILETYPE)
    big = geo.block_size >= 1 << 16
    count = geo.inodes_count
    if inode.has(L.FL_INLINE_DATA):
        data = inline_data(volume, inode)
        if len(data) < 4:
            raise Corrupt("an inline directory is too small")
        yield parse_entries(data, 4, L.I_BLOCK_SIZE, filetype=filetype, inodes_count=count, big_blocks=big,
                            where="inline directory")  # fmt: skip
        if len(data) > L.I_BLOCK_SIZE:
            yield parse_entries(data, L.I_BLOCK_SIZE, len(data), filetype=filetype, inodes_count=count,
                                big_blocks=big, where="inline directory (system.data)")  # fmt: skip
        return
    bs = geo.block_size
    nblocks = -(-inode.size // bs)
    for logical, physical, length, uninit in block_map(volume, inode).runs(0, nblocks):
        if uninit:
            raise Corrupt(f"directory block {logical} is an uninitialized extent")
        for k in range(0, length, CHUNK_BLOCKS):
            n = min(CHUNK_BLOCKS, length - k)
            data = volume.block(physical + k, "a directory block") if n == 1 else volume.blocks(physical + k, n)
            out: list[Entry] = []
            for b in range(n):
                out += parse_entries(data, b * bs, (b + 1) * bs, filetype=filetype, inodes_count=count,
                                     big_blocks=big, where=f"directory block {logical + k + b}")  # fmt: skip
            yield out
