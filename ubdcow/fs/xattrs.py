"""Extended attributes: in the inode (after i_extra_isize), in an external block (i_file_acl), in ea_inodes.

:func:`entries` lists an inode's attributes as :class:`Entry` records, in the order the kernel lists
them (in-inode first). A value stored in an ea_inode is left to the caller (``value is None``,
``inum`` set), which reads that inode's content. :func:`inline_data` gives an inline_data inode's
bytes (i_block, then the ``system.data`` attribute). POSIX ACLs are stored in ext4's compact form;
:func:`acl_to_xattr` turns them into the form ``getxattr`` returns.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

from . import layout as L
from .inodes import Inode
from .volume import Corrupt, Volume

__all__ = ["Entry", "entries", "inline_data", "acl_to_xattr", "full_name", "MAX_VALUE"]

#: the largest value ext4 stores (in an ea_inode); the VFS itself stops at 64 KiB
MAX_VALUE = 1 << 24


class Entry(NamedTuple):
    prefix: int  # the name index: layout.XATTR_PREFIXES
    name: bytes  # without the prefix
    value: bytes | None  # None when it lives in an ea_inode
    inum: int  # the ea_inode holding the value, or 0
    size: int


def full_name(entry: Entry) -> bytes | None:
    """``user.foo`` and the like, or None for attributes the kernel does not list (system.data)."""
    prefix = L.XATTR_PREFIXES.get(entry.prefix)
    return None if prefix is None else prefix.encode() + entry.name


def _parse(region: bytes, start: int, value_base: int, where: str) -> Iterator[Entry]:
    """The entries from ``region[start:]``; value offsets count from ``value_base``."""
    end = len(region)
    pos = start
    found = []
    while True:
        if pos + 4 > end:
            raise Corrupt(f"{where}: the attribute entries run past the end")
        if region[pos : pos + 4] == b"\0\0\0\0":
            break
        if pos + L.XATTR_ENTRY_HEAD_SIZE > end:
            raise Corrupt(f"{where}: the attribute entries run past the end")
        name_len, index, offs, inum, size, _ = L.XATTR_ENTRY_HEAD.unpack_from(region, pos)
        step = (L.XATTR_ENTRY_HEAD_SIZE + name_len + 3) & ~3
        if pos + step > end:
            raise Corrupt(f"{where}: an attribute entry has a bad name length {name_len}")
        found.append((index, region[pos + 16 : pos + 16 + name_len], offs, inum, size))
        pos += step
    values_from = pos + 4  # values follow the terminating zero word
    for index, name, offs, inum, size in found:
        if size > MAX_VALUE:
            raise Corrupt(f"{where}: attribute value of {size} bytes is too large")
        if inum:
            yield Entry(index, name, None, inum, size)
            continue
        at = value_base + offs
        if size and (at < values_from or at + ((size + 3) & ~3) > end):
            raise Corrupt(f"{where}: an attribute value lies outside its block (offset {offs}, {size} bytes)")
        yield Entry(index, name, region[at : at + size], 0, size)


def _ibody(inode: Inode, inode_size: int) -> tuple[bytes, int] | None:
    start = L.GOOD_OLD_INODE_SIZE + inode.extra_isize
    if inode_size <= L.GOOD_OLD_INODE_SIZE or start + 4 > inode_size:
        return None
    region = inode.raw[start:inode_size]
    if int.from_bytes(region[:4], "little") != L.XATTR_MAGIC:
        return None
    return region, 4


def entries(volume: Volume, inode: Inode) -> list[Entry]:
    """All extended attributes of ``inode``: in-inode ones first, then the external block's."""
    geo = volume.geo
    assert geo is not None
    found: list[Entry] = []
    body = _ibody(inode, geo.inode_size)
    if body is not None:
        region, start = body
        found += _parse(region, start, start, "in-inode attributes")
    if inode.file_acl:
        volume.check_data(inode.file_acl, 1, "the extended attribute block")
        data = volume.block(inode.file_acl, "an extended attribute block")
        magic, _refs, nblocks = L.XATTR_BLOCK_HEAD.unpack_from(data, 0)
        if magic != L.XATTR_MAGIC or nblocks != 1:
            raise Corrupt(f"extended attribute block {inode.file_acl} has a bad header")
        found += _parse(data, L.XATTR_BLOCK_HEADER_SIZE, 0, f"extended attribute block {inode.file_acl}")
    return found


def inline_data(volume: Volume, inode: Inode) -> bytes:
    """An inline_data inode's content: its 60 bytes of i_block, then the value of system.data."""
    geo = volume.geo
    assert geo is not None
    extra = b""
    body = _ibody(inode, geo.inode_size)
    if body is not None:
        region, start = body
        for entry in _parse(region, start, start, "in-inode attributes"):
            if entry.prefix == L.XATTR_INDEX_SYSTEM and entry.name == L.XATTR_INLINE_DATA_NAME:
                if entry.value is None:
                    raise Corrupt("the inline data attribute points at an ea_inode")
                extra = entry.value
                break
    return inode.i_block + extra


def acl_to_xattr(value: bytes) -> bytes:
    """ext4's stored POSIX ACL (version 1, short entries for the owner/group/mask/other) as the
    ``system.posix_acl_*`` value ``getxattr`` returns (version 2, 8-byte entries)."""
    if len(value) < 4 or int.from_bytes(value[:4], "little") != L.EXT4_ACL_VERSION:
        raise Corrupt("a POSIX ACL has a bad version")
    out = bytearray(L.POSIX_ACL_XATTR_VERSION.to_bytes(4, "little"))
    pos = 4
    while pos < len(value):
        if pos + 4 > len(value):
            raise Corrupt("a POSIX ACL is truncated")
        tag = int.from_bytes(value[pos : pos + 2], "little")
        perm = value[pos + 2 : pos + 4]
        if tag in (L.ACL_USER, L.ACL_GROUP):
            if pos + 8 > len(value):
                raise Corrupt("a POSIX ACL is truncated")
            ident = value[pos + 4 : pos + 8]
            pos += 8
        elif tag in (L.ACL_USER_OBJ, L.ACL_GROUP_OBJ, L.ACL_MASK, L.ACL_OTHER):
            ident = L.ACL_UNDEFINED_ID.to_bytes(4, "little")
            pos += 4
        else:
            raise Corrupt(f"a POSIX ACL has an unknown tag {tag:#x}")
        out += tag.to_bytes(2, "little") + perm + ident
    return bytes(out)
